#!/usr/bin/env bash
# Sets up everything the tests need, then runs them all: formatting, lints, Rust unit tests,
# and the integration tests that boot the real portico binary.
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
echo "==> integration tests"
.venv/bin/python -m pytest tests "$@"
