#!/usr/bin/env bash
# Sets up everything the tests need, then runs them all: formatting, lints, Rust unit tests,
# and the integration tests that boot the real portico binary and the real nginx with
# Portico's module.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests
PY="$(cat target/release/.portico-python)"
export PYO3_PYTHON="$PY"

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --release --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --release --workspace --locked
echo "==> nginx module (build against this machine's nginx, fmt, clippy)"
PORTICO_PYTHON="$PY" scripts/nginx-module.sh >/dev/null
cargo fmt --manifest-path nginx-module/Cargo.toml -- --check
(cd nginx-module && NGINX_BUILD_DIR="$PWD/../target/nginx-src/objs" \
  NGINX_SOURCE_DIR="$PWD/../target/nginx-src" CARGO_TARGET_DIR="$PWD/../target" \
  cargo clippy --release --locked -- -D warnings)
echo "==> integration tests"
.venv/bin/python -m pytest tests nginx-module/tests "$@"
