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
# The same cases against Portico's other host: nginx with the module just built, serving the
# same portico.toml (tests/conftest.py; what nginx cannot do is skipped with the reason).
# test_cli.py is the portico binary's own and stays out.
echo "==> integration tests against nginx with the module (PORTICO_TEST_HOST=nginx)"
PORTICO_TEST_HOST=nginx .venv/bin/python -m pytest tests/test_wsgi.py tests/test_errors.py \
  tests/test_asgi.py tests/test_websocket.py tests/test_http2.py tests/test_frameworks.py \
  tests/test_frameworks_asgi.py tests/test_autobahn.py "$@"
# And again with every app in a pool of one worker process (mode = "pool"): the pool is a
# transport around the same execution path, so the same cases must hold.
echo "==> integration tests with the apps in pool workers (PORTICO_TEST_MODE=pool)"
PORTICO_TEST_MODE=pool .venv/bin/python -m pytest tests/test_wsgi.py tests/test_errors.py \
  tests/test_asgi.py tests/test_websocket.py tests/test_http2.py tests/test_autobahn.py "$@"
echo "==> the same, against nginx, whose master starts the pool (both variables)"
PORTICO_TEST_HOST=nginx PORTICO_TEST_MODE=pool .venv/bin/python -m pytest tests/test_wsgi.py \
  tests/test_errors.py tests/test_asgi.py tests/test_websocket.py tests/test_http2.py \
  tests/test_autobahn.py "$@"
