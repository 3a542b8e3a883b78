"""The Autobahn WebSocket testsuite (fuzzingclient) against the server under test serving the
echo app tests/apps/asgi_echo.py: cases 1-10 (framing, pings, closing, UTF-8, limits,
performance) and a subset of the permessage-deflate cases 12 and 13.

It needs Python 2.7 (scripts/autobahn.sh installs autobahntestsuite 0.8.2 into .work/autobahn).
Without one the tests fail, so that CI cannot pass without running the suite;
PORTICO_SKIP_AUTOBAHN=1 skips them on a machine that has no Python 2.7. PORTICO_AUTOBAHN_FULL=1 runs all of 12.* and 13.*
(minutes) instead of the subset. Time budgets: against uvicorn here, 1-10 take about 15 s and the
subset about 20 s; the budgets leave room for a slow machine."""

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, SERVER_UNDER_TEST, needs

SCRIPT = ROOT / "scripts" / "autobahn.sh"
_spec = importlib.util.spec_from_file_location("summarize", ROOT / "tests" / "autobahn" /
                                               "summarize.py")
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)

CORE_CASES = ",".join(f"{n}.*" for n in range(1, 11))
CORE_COUNT = 301
# Every deflate parameter set once (12.2-12.5, 13.2-13.7 differ in the offer and in message
# sizes) and the smaller messages of the default set; 12.1.9-10 and 14-18 (the same again with
# messages up to 128 KiB x 1000) take 2-5 s each and add nothing that the others do not test.
COMPRESSION_CASES = ",".join(
    [f"12.1.{i}" for i in (*range(1, 9), 11, 12, 13)] + ["12.2.1", "12.2.2", "12.3.1", "12.4.1",
                                                         "12.5.1"]
    + [f"13.1.{i}" for i in (*range(1, 9), 11, 12, 13)]
    + [f"13.{g}.1" for g in range(2, 8)])
COMPRESSION_COUNT = 33
if os.environ.get("PORTICO_AUTOBAHN_FULL"):
    COMPRESSION_CASES, COMPRESSION_COUNT = "12.*,13.*", 216


def python2():
    explicit = os.environ.get("AUTOBAHN_PYTHON")
    if explicit:
        return explicit
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions" / "2.7.18" / \
        "bin" / "python2.7"
    return str(pyenv) if pyenv.exists() else shutil.which("python2.7")


pytestmark = pytest.mark.skipif(os.environ.get("PORTICO_SKIP_AUTOBAHN") == "1",
                                reason="PORTICO_SKIP_AUTOBAHN=1")


@pytest.fixture(scope="module")
def wstest():
    assert python2(), ("no Python 2.7 for autobahntestsuite: install pyenv's 2.7.18 or set "
                       "AUTOBAHN_PYTHON (PORTICO_SKIP_AUTOBAHN=1 skips these tests)")
    done = subprocess.run([str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr


def run_suite(server, cases, outdir, budget, expect_compression=False):
    argv = [str(SCRIPT), "run", "--no-install", "--url", f"ws://127.0.0.1:{server.port}/",
            "--agent", SERVER_UNDER_TEST, "--cases", cases, "--outdir", str(outdir)]
    if expect_compression:
        argv.append("--expect-compression")
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=budget)
    elapsed = time.monotonic() - started
    print(done.stdout, done.stderr, f"took {elapsed:.1f}s", sep="\n")
    index = outdir / "reports" / "index.json"
    assert index.exists(), done.stderr
    result = summarize.summarize(summarize.load(index), expect_compression)
    assert result["bad"] == [], done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
    return result


def test_autobahn_cases_1_to_10(asgi_server, tmp_path, wstest):
    server = asgi_server("asgi_echo:app", ws_max_size="16M")
    result = run_suite(server, CORE_CASES, tmp_path / "core", budget=180)
    assert result["total"] == CORE_COUNT
    # Strict where the suite can tell: the NON-STRICT ones are only "failed fast vs. late".
    assert result["behavior"]["OK"] >= 280, summarize.render(result)


@needs("ws_deflate")
def test_autobahn_permessage_deflate(asgi_server, tmp_path, wstest):
    server = asgi_server("asgi_echo:app", ws_deflate=True)
    result = run_suite(server, COMPRESSION_CASES, tmp_path / "deflate", budget=240,
                       expect_compression=True)
    assert result["total"] == COMPRESSION_COUNT
    assert result["behavior"]["OK"] == COMPRESSION_COUNT, summarize.render(result)
