#!/usr/bin/env bash
# Runs the Autobahn WebSocket testsuite's fuzzing client against a WebSocket server.
#
#   scripts/autobahn.sh install
#       only install autobahntestsuite 0.8.2 (Python 2.7) into .work/autobahn
#   scripts/autobahn.sh run --url ws://127.0.0.1:9001/ [--cases '1.*,2.1.1'] [--exclude '9.*']
#                       [--outdir DIR] [--agent NAME] [--expect-compression] [--no-install]
#       run the cases (default: 1-10), write the reports under DIR (default: a new temp dir),
#       print a summary and exit 1 on any FAILED case (with --expect-compression, also on an
#       UNIMPLEMENTED case in 12.* or 13.*, the permessage-deflate cases).
#
# Environment: AUTOBAHN_PYTHON is the Python 2.7 to use (default: pyenv's 2.7.18, else python2.7
# on PATH); AUTOBAHN_HOME is where the suite is installed (default: .work/autobahn in the repo).
# The suite's newest release does not run on Python 3; 0.8.2 is the last that works on 2.7.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
AUTOBAHN_HOME="${AUTOBAHN_HOME:-$ROOT/.work/autobahn}"

find_python2() {
  if [ -n "${AUTOBAHN_PYTHON:-}" ]; then echo "$AUTOBAHN_PYTHON"; return; fi
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}/versions/2.7.18/bin/python2.7" "$(command -v python2.7 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  echo "autobahn.sh: no Python 2.7 found; set AUTOBAHN_PYTHON" >&2
  exit 3
}

PY2="$(find_python2)"
WSTEST="$AUTOBAHN_HOME/bin/wstest"

install() {
  if [ -x "$WSTEST" ] && PYTHONUSERBASE="$AUTOBAHN_HOME" "$PY2" -c 'import autobahntestsuite' 2>/dev/null; then
    return 0
  fi
  echo "==> installing autobahntestsuite 0.8.2 into $AUTOBAHN_HOME (with $PY2)" >&2
  mkdir -p "$AUTOBAHN_HOME"
  # A user-site install under a project-local base: nothing goes to the user's home.
  PYTHONUSERBASE="$AUTOBAHN_HOME" PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore \
    "$PY2" -m pip install -q --user --no-warn-script-location autobahntestsuite==0.8.2 >&2
  [ -x "$WSTEST" ] || { echo "autobahn.sh: wstest missing after install" >&2; exit 3; }
}

cmd="${1:-}"
shift || true
case "$cmd" in
  install) install; exit 0 ;;
  run) ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac

url="" cases="1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,9.*,10.*" exclude="" outdir="" agent="server"
expect_compression=0 do_install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --url) url="$2"; shift 2 ;;
    --cases) cases="$2"; shift 2 ;;
    --exclude) exclude="$2"; shift 2 ;;
    --outdir) outdir="$2"; shift 2 ;;
    --agent) agent="$2"; shift 2 ;;
    --expect-compression) expect_compression=1; shift ;;
    --no-install) do_install=0; shift ;;
    *) echo "autobahn.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$url" ] || { echo "autobahn.sh: --url is required" >&2; exit 2; }
[ $do_install = 1 ] && install
[ -x "$WSTEST" ] || { echo "autobahn.sh: not installed; run: scripts/autobahn.sh install" >&2; exit 3; }
[ -n "$outdir" ] || outdir="$(mktemp -d -t autobahn.XXXXXX)"
mkdir -p "$outdir"

# The spec file: JSON written by Python so that case patterns need no shell quoting rules.
python3 - "$outdir/fuzzingclient.json" "$url" "$agent" "$cases" "$exclude" "$outdir/reports" <<'PYEOF'
import json, sys
path, url, agent, cases, exclude, reports = sys.argv[1:]
split = lambda s: [c.strip() for c in s.split(",") if c.strip()]
json.dump({"outdir": reports, "servers": [{"agent": agent, "url": url}],
           "cases": split(cases), "exclude-cases": split(exclude), "exclude-agent-cases": {}},
          open(path, "w"), indent=2)
PYEOF

echo "==> wstest -m fuzzingclient against $url (cases: $cases${exclude:+; excluded: $exclude}), reports in $outdir/reports" >&2
start=$(date +%s)
(cd "$outdir" && PYTHONUSERBASE="$AUTOBAHN_HOME" PYTHONWARNINGS=ignore \
  "$PY2" "$WSTEST" -m fuzzingclient -s "$outdir/fuzzingclient.json" > "$outdir/wstest.log" 2>&1) || {
  echo "autobahn.sh: wstest failed; its log:" >&2; tail -n 40 "$outdir/wstest.log" >&2; exit 3; }
echo "==> wstest took $(( $(date +%s) - start ))s" >&2

summary_args=("$outdir/reports/index.json")
[ $expect_compression = 1 ] && summary_args+=(--expect-compression)
exec python3 "$ROOT/tests/autobahn/summarize.py" "${summary_args[@]}"
