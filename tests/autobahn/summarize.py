#!/usr/bin/env python3
"""Summarises an Autobahn fuzzingclient report (reports/index.json).

    summarize.py reports/index.json [--expect-compression]

Prints the counts of each verdict (OK, NON-STRICT, INFORMATIONAL, UNIMPLEMENTED, FAILED) for
`behavior` (the messages) and `behaviorClose` (the closing handshake), per case group and in
all, then every case that is neither OK nor INFORMATIONAL. Exits 1 when a case FAILED (or its
close was WRONG CODE, UNCLEAN or FAILED BY CLIENT), or, with
--expect-compression, when a permessage-deflate case (12.*, 13.*) is UNIMPLEMENTED, which
means the server did not negotiate the extension."""

import argparse
import collections
import json
import sys

VERDICTS = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
# What behaviorClose may say besides the above; each of these is a failure too.
CLOSE_FAILURES = ("WRONG CODE", "UNCLEAN", "FAILED BY CLIENT")
FAILING = {"FAILED", *CLOSE_FAILURES}
COMPRESSION_GROUPS = ("12", "13")


def case_key(case_id):
    return tuple(int(part) for part in case_id.split("."))


def load(index_path):
    """Returns {case id: result dict} for the single agent in the report."""
    with open(index_path) as f:
        index = json.load(f)
    if len(index) != 1:
        raise SystemExit(f"expected one agent in {index_path}, found {sorted(index)}")
    (results,) = index.values()
    return results


def summarize(results, expect_compression=False):
    """Counts verdicts; returns a dict with `total`, `behavior`, `behaviorClose` (Counters),
    `groups` ({group: (Counter of behavior, summed duration in ms)}), `bad` (the cases that
    make the run fail) and `notable` (every case that is not OK or INFORMATIONAL)."""
    behavior = collections.Counter()
    behavior_close = collections.Counter()
    groups = {}
    bad, notable = [], []
    for case_id in sorted(results, key=case_key):
        r = results[case_id]
        group = case_id.split(".")[0]
        behavior[r["behavior"]] += 1
        behavior_close[r["behaviorClose"]] += 1
        counts, duration = groups.get(group, (collections.Counter(), 0))
        counts[r["behavior"]] += 1
        groups[group] = (counts, duration + int(r.get("duration") or 0))
        verdicts = {r["behavior"], r["behaviorClose"]}
        if not verdicts <= {"OK", "INFORMATIONAL"}:
            notable.append((case_id, r["behavior"], r["behaviorClose"], r.get("remoteCloseCode")))
        if verdicts & FAILING or (expect_compression and group in COMPRESSION_GROUPS
                                    and "UNIMPLEMENTED" in verdicts):
            bad.append(case_id)
    return {"total": len(results), "behavior": behavior, "behaviorClose": behavior_close,
            "groups": groups, "bad": bad, "notable": notable}


def counts_line(counter):
    shown = list(VERDICTS) + [v for v in counter if v not in VERDICTS]
    return ", ".join(f"{v} {counter.get(v, 0)}" for v in shown)


def render(summary):
    lines = []
    for group in sorted(summary["groups"], key=int):
        counts, duration = summary["groups"][group]
        lines.append(f"  {group:>2}.*  {sum(counts.values()):4d} cases  {duration / 1000:7.1f}s  "
                     f"{counts_line(counts)}")
    lines.append(f"behavior:      {counts_line(summary['behavior'])}")
    lines.append(f"behaviorClose: {counts_line(summary['behaviorClose'])}")
    for case_id, b, bc, code in summary["notable"]:
        lines.append(f"  {case_id}: behavior {b}, behaviorClose {bc}, remote close code {code}")
    verdict = "FAILED: " + " ".join(summary["bad"]) if summary["bad"] else "passed"
    lines.append(f"autobahn: {summary['total']} cases, {verdict}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("index")
    parser.add_argument("--expect-compression", action="store_true")
    args = parser.parse_args(argv)
    summary = summarize(load(args.index), args.expect_compression)
    print(render(summary))
    return 1 if summary["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
