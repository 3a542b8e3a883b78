#!/usr/bin/env bash
# Builds Portico and serves the example app at http://127.0.0.1:8000 (Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec target/release/portico run hello:app --python-path examples --bind "${PORTICO_BIND:-127.0.0.1:8000}"
