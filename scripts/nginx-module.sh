#!/usr/bin/env bash
# Builds Portico's nginx dynamic module (ngx_http_portico_module.so) for the nginx on this
# machine and prints the path of the .so on stdout (everything else goes to stderr).
#
#   scripts/nginx-module.sh
#
# Environment:
#   NGINX_SOURCE_DIR  an nginx source tree to build against (configured or not) instead of
#                     Debian's /usr/share/nginx/src; it must be the version of the nginx that
#                     will load the module, configured with the same flags (at least
#                     --with-compat), or nginx refuses the module.
#   NGINX_CONFIGURE_FLAGS  configure flags for NGINX_SOURCE_DIR when it has no objs/ yet
#                     (default: Debian's conf_flags when the tree has them).
#   NGINX_BIN         the nginx that will load the module (default: nginx on PATH, else
#                     /usr/sbin/nginx); its version must match the tree's.
#   PORTICO_PYTHON    the CPython to embed (default: python3 on PATH if it has a shared
#                     libpython, else Debian's).
#   CARGO_TARGET_DIR  as usual (default: target/ at the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'nginx-module.sh: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $*"; fi
}

apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} = 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

# nginx to load the module, its headers and configure script (nginx-dev), and clang for
# nginx-sys's bindgen.
apt_install nginx nginx-dev clang libclang-dev build-essential pkg-config

# --- the nginx source tree ------------------------------------------------------------------
if [ -n "${NGINX_SOURCE_DIR:-}" ]; then
  src="$(cd "$NGINX_SOURCE_DIR" && pwd)" || die "NGINX_SOURCE_DIR=$NGINX_SOURCE_DIR is not a directory"
else
  src="$root/target/nginx-src"
  stamp="$src/.portico-from"
  want="$(dpkg-query -W -f='${Version}' nginx-dev 2>/dev/null || echo unknown)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -f "$src/objs/ngx_auto_config.h" ]; then
    log "copying /usr/share/nginx/src (nginx-dev $want) to target/nginx-src"
    rm -rf "$src"
    mkdir -p "$root/target"
    cp -a /usr/share/nginx/src "$src"
    echo "$want" > "$stamp.tmp"
  fi
fi
[ -f "$src/src/core/nginx.h" ] || die "$src is not an nginx source tree (no src/core/nginx.h)"

if [ ! -f "$src/objs/ngx_auto_config.h" ]; then
  log "configuring nginx in $src (only objs/ headers are used; nginx itself is not compiled)"
  if [ -n "${NGINX_CONFIGURE_FLAGS:-}" ]; then
    # shellcheck disable=SC2206
    NGX_CONF_FLAGS=($NGINX_CONFIGURE_FLAGS)
  elif [ -f "$src/conf_flags" ]; then
    # shellcheck disable=SC1091
    source "$src/conf_flags"
  else
    NGX_CONF_FLAGS=(--with-compat --with-threads --with-http_v2_module)
  fi
  (cd "$src" && ./configure "${NGX_CONF_FLAGS[@]}" >"$src/configure.log" 2>&1) \
    || die "configure failed in $src: see $src/configure.log"
  [ -f "${stamp:-/nonexistent}.tmp" ] && mv "$stamp.tmp" "$stamp"
fi
grep -q 'NGX_COMPAT' "$src/objs/ngx_auto_config.h" \
  || log "warning: $src was configured without --with-compat; Debian's nginx will call the module not binary compatible"

# --- versions must match --------------------------------------------------------------------
tree_version="$(sed -n 's/^#define NGINX_VERSION *"\(.*\)"/\1/p' "$src/src/core/nginx.h")"
nginx_bin="${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}"
[ -x "$nginx_bin" ] || die "no nginx at $nginx_bin (set NGINX_BIN)"
bin_version="$("$nginx_bin" -v 2>&1 | sed -n 's|^nginx version: [^/]*/\([0-9.]*\).*|\1|p')"
if [ "$tree_version" != "$bin_version" ]; then
  die "version mismatch: $nginx_bin is nginx $bin_version but the source tree $src is nginx $tree_version; nginx refuses a module built for another version. Point NGINX_SOURCE_DIR at an nginx-$bin_version tree (or NGINX_BIN at an nginx $tree_version)."
fi
log "building against nginx $tree_version ($src) for $nginx_bin"

# --- the Python to embed --------------------------------------------------------------------
python_is_embeddable() {
  "$1" -c 'import sys, sysconfig; sys.exit(0 if sys.version_info >= (3, 9) and sysconfig.get_config_var("Py_ENABLE_SHARED") else 1)' 2>/dev/null
}
PY="${PORTICO_PYTHON:-$(command -v python3 || true)}"
if [ -z "$PY" ] || ! python_is_embeddable "$PY"; then
  apt_install python3 python3-dev
  PY=/usr/bin/python3
fi
PY="$("$PY" -c 'import sys; print(sys.executable)')"
python_is_embeddable "$PY" || die "$PY has no shared libpython; set PORTICO_PYTHON"

# --- the module -----------------------------------------------------------------------------
if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
  export PATH="$HOME/.cargo/bin:$PATH"
fi
target_dir="${CARGO_TARGET_DIR:-$root/target}"
log "building the module (release) with $("$PY" -V 2>&1)"
(
  cd nginx-module
  NGINX_BUILD_DIR="$src/objs" NGINX_SOURCE_DIR="$src" PYO3_PYTHON="$PY" \
    CARGO_TARGET_DIR="$target_dir" cargo build --release --locked >&2
)
so="$target_dir/release/libngx_http_portico_module.so"
[ -f "$so" ] || die "the build produced no $so"
out="$target_dir/release/ngx_http_portico_module.so"
cp -f "$so" "$out.tmp" && mv -f "$out.tmp" "$out"
echo "$out"
