#!/usr/bin/env bash
# Installs what Portico needs on a Debian machine and builds it in release mode.
#   scripts/setup.sh            build deps + the portico binary
#   scripts/setup.sh --tests    also a virtualenv (.venv) with what the tests need
# Environment: PORTICO_PYTHON names the CPython to embed (default: python3 on PATH, if it was
# built with a shared libpython; else Debian's python3).
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[ "${1:-}" = "--tests" ] && want_tests=1

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "need root to run: $*" >&2; exit 1; fi
}

apt_updated=0
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} = 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  if [ $apt_updated = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Pingora's zlib-ng needs cmake; pyo3 and the C parts need a C toolchain.
apt_install build-essential cmake pkg-config ca-certificates curl

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; else
    apt_install cargo rustc; fi
fi

python_is_embeddable() {
  "$1" -c 'import sys, sysconfig; sys.exit(0 if sys.version_info >= (3, 9) and sysconfig.get_config_var("Py_ENABLE_SHARED") else 1)' 2>/dev/null
}

PY="${PORTICO_PYTHON:-$(command -v python3 || true)}"
if [ -z "$PY" ] || ! python_is_embeddable "$PY"; then
  apt_install python3 python3-dev python3-venv
  PY=/usr/bin/python3
fi
# Resolve pyenv shims and the like to the real interpreter.
PY="$("$PY" -c 'import sys; print(sys.executable)')"
log "embedding $("$PY" -V 2>&1) from $PY"
python_is_embeddable "$PY" || { echo "$PY has no shared libpython; set PORTICO_PYTHON" >&2; exit 1; }
"$PY" -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv

log "building portico (release)"
PYO3_PYTHON="$PY" cargo build --release --workspace --locked
echo "$PY" > target/release/.portico-python

if [ $want_tests = 1 ]; then
  venv_base="$(.venv/bin/python -c 'import sys; print(sys._base_executable)' 2>/dev/null || true)"
  if [ -z "$venv_base" ] || [ "$(readlink -f "$venv_base")" != "$(readlink -f "$PY")" ]; then
    log "creating .venv"
    rm -rf .venv
    "$PY" -m venv .venv
  fi
  log "installing test requirements into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
fi

if [ $want_tests = 1 ]; then
  # The Autobahn WebSocket testsuite (0.8.2, the last release that runs: on Python 2.7).
  scripts/autobahn.sh install
fi
