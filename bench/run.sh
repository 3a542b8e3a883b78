#!/usr/bin/env bash
# Benchmarks portico against granian, uvicorn and gunicorn: one server worker pinned to CPU 0,
# the load tool pinned to CPU 1, in scenarios for WSGI and ASGI over HTTP/1.1 (wrk), HTTP/2
# (h2load, h2c with prior knowledge) and WebSocket echo (bench/wsload); and portico's nginx
# module (one nginx worker hosting the app) against nginx in front of granian (proxy_pass over
# a Unix socket) and of uWSGI (uwsgi_pass), all on CPU 0 too; and portico's pool mode
# (`mode = "pool"`: the app in portico-worker processes) with one worker against in-process
# hosting, and with two workers against granian --workers 2 and gunicorn -w 2, every process
# of each server on CPU 0 too. Prints one markdown table and writes it to
# bench/results/latest.md (raw load-tool output and server logs go to bench/results/logs/).
#
#   bench/run.sh
#   BENCH_ONLY=asgi,h2,ws BENCH_SECONDS=3 bench/run.sh
#   BENCH_ONLY=hello,asgi,pool bench/run.sh
#
# Environment:
#   BENCH_SECONDS    length of each measured run, in seconds (default 8)
#   BENCH_ONLY       comma-separated scenarios to run (default: all). A name selects the
#                    scenario of that name and those named NAME-something: hello, echo, asgi,
#                    h2 (h2-wsgi, h2-asgi), ws (ws, ws-pipelined), nginx (nginx-wsgi,
#                    nginx-asgi), pool (pool-1-wsgi, pool-1-asgi, pool-1-echo, pool-2-wsgi; pool-1 and
#                    pool-2 select by worker count); wsgi means hello,echo
#   BENCH_ROUNDS     runs of each server per scenario, in alternating order (default 1); the
#                    table shows each server's median run, the notes every run's figure. On a
#                    shared, noisy machine 3 or 5 make the ratios steadier
#   PORTICO_THREADS  portico's --threads for WSGI apps, its Python threads (default 2, its best
#                    here); also threads= of the nginx module's WSGI app
#   UWSGI_THREADS    uWSGI's --threads behind nginx (default 2)
#
# A benchmark, not a test: it asserts nothing about the numbers and is not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BENCH="$ROOT/bench"
VENV="$BENCH/.venv"
RESULTS="$BENCH/results"
LOGS="$RESULTS/logs"
WSLOAD_DIR="$BENCH/wsload"
WSLOAD="$WSLOAD_DIR/target/release/wsload"
STARTED=$SECONDS

DURATION="${BENCH_SECONDS:-8}"
ROUNDS="${BENCH_ROUNDS:-1}"
PORTICO_THREADS="${PORTICO_THREADS:-2}"
UWSGI_THREADS="${UWSGI_THREADS:-2}"
WARMUP=2          # seconds of unrecorded load before each measured run
CONNECTIONS=64    # wrk's connections, and wsload's in the ping-pong scenario
H2_CONNECTIONS=16 # h2load: connections ...
H2_STREAMS=16     # ... and concurrent streams on each (256 requests in flight)
WS_MESSAGE=32     # bytes of text per WebSocket message
WS_PIPE_CONNECTIONS=16 # ws-pipelined: connections ...
WS_PIPE_DEPTH=16       # ... and messages in flight on each
SERVER_CPU=0
LOAD_CPU=1
READY_TIMEOUT=30  # seconds a server gets to answer its first request
BODY_BYTES=65536  # must match bench/post64k.lua
BUSY_LIMIT=10     # percent; more on an idle benchmark CPU means something else is running
QUIET_WAIT=60     # seconds to wait for such other load to stop before measuring anyway

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { echo "bench/run.sh: $*" >&2; exit 1; }

[[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a whole number of seconds, got '$DURATION'"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer, got '$ROUNDS'"
[[ "$PORTICO_THREADS" =~ ^[1-9][0-9]*$ ]] || die "PORTICO_THREADS must be a positive integer, got '$PORTICO_THREADS'"
[[ "$UWSGI_THREADS" =~ ^[1-9][0-9]*$ ]] || die "UWSGI_THREADS must be a positive integer, got '$UWSGI_THREADS'"

cpus="$(nproc)"
[ "$cpus" -ge 2 ] || die "needs at least 2 CPUs (server on CPU $SERVER_CPU, load on CPU $LOAD_CPU); nproc says $cpus"

# --- scenarios -----------------------------------------------------------------------------

ALL_SCENARIOS=(hello echo asgi h2-wsgi h2-asgi ws ws-pipelined nginx-wsgi nginx-asgi
  pool-1-wsgi pool-1-asgi pool-1-echo pool-2-wsgi)

SCENARIOS=()
if [ -z "${BENCH_ONLY:-}" ]; then
  SCENARIOS=("${ALL_SCENARIOS[@]}")
else
  IFS=', ' read -r -a wanted <<<"$BENCH_ONLY"
  for w in "${wanted[@]}"; do [ "$w" = wsgi ] && wanted+=(hello echo); done
  for s in "${ALL_SCENARIOS[@]}"; do
    for w in "${wanted[@]}"; do
      if [ "$s" = "$w" ] || [[ "$s" == "$w"-* ]]; then SCENARIOS+=("$s"); break; fi
    done
  done
  for w in "${wanted[@]}"; do
    [ -z "$w" ] || [ "$w" = wsgi ] && continue
    ok=0
    for s in "${ALL_SCENARIOS[@]}"; do
      if [ "$s" = "$w" ] || [[ "$s" == "$w"-* ]]; then ok=1; fi
    done
    [ $ok = 1 ] || die "BENCH_ONLY: no scenario '$w' (scenarios: ${ALL_SCENARIOS[*]}; also h2, ws, nginx, pool, pool-1, pool-2, wsgi)"
  done
  [ ${#SCENARIOS[@]} -gt 0 ] || die "BENCH_ONLY='$BENCH_ONLY' selects no scenario"
fi

scenario_label() {
  case "$1" in
    hello) echo "WSGI hello (13 B GET)" ;;
    echo) echo "64 KiB POST echo (WSGI)" ;;
    asgi) echo "ASGI hello (13 B GET)" ;;
    h2-wsgi) echo "HTTP/2 WSGI hello (h2c)" ;;
    h2-asgi) echo "HTTP/2 ASGI hello (h2c)" ;;
    ws) echo "WebSocket echo ($WS_MESSAGE B, ping-pong)" ;;
    ws-pipelined) echo "WebSocket echo ($WS_MESSAGE B, $WS_PIPE_DEPTH in flight)" ;;
    nginx-wsgi) echo "nginx: WSGI hello (13 B GET)" ;;
    nginx-asgi) echo "nginx: ASGI hello (13 B GET)" ;;
    pool-1-wsgi) echo "pool, 1 worker: WSGI hello (13 B GET)" ;;
    pool-1-asgi) echo "pool, 1 worker: ASGI hello (13 B GET)" ;;
    pool-1-echo) echo "pool, 1 worker: 64 KiB POST echo (WSGI)" ;;
    pool-2-wsgi) echo "2 worker processes: WSGI hello (13 B GET)" ;;
  esac
}
scenario_target() {
  case "$1" in
    hello | h2-wsgi | nginx-wsgi | pool-*-wsgi) echo "hello:app" ;;
    echo | pool-*-echo) echo "echo:app" ;;
    asgi | h2-asgi | nginx-asgi | pool-*-asgi) echo "asgi_hello:app" ;;
    ws | ws-pipelined) echo "ws_echo:app" ;;
  esac
}
scenario_tool() {
  case "$1" in
    hello | echo | asgi | nginx-* | pool-*) echo wrk ;;
    h2-*) echo h2load ;;
    ws*) echo wsload ;;
  esac
}
scenario_servers() {
  case "$1" in
    # pingora-fixed: Pingora answering on its own, the floor under every portico row.
    hello) echo portico granian gunicorn-sync gunicorn-gthread pingora-fixed ;;
    echo) echo portico granian gunicorn-sync gunicorn-gthread ;;
    asgi) echo portico-asgi granian-asgi uvicorn ;;
    h2-wsgi) echo portico granian ;;
    h2-asgi) echo portico-asgi granian-asgi ;;
    ws | ws-pipelined)
      echo portico-asgi granian-asgi uvicorn-websockets uvicorn-sansio uvicorn-wsproto wsload-echo ;;
    # granian alone, without nginx: the reference of the "vs granian" column here too.
    nginx-wsgi) echo nginx-portico nginx-portico-pool granian nginx-granian nginx-uwsgi ;;
    nginx-asgi) echo nginx-portico-asgi granian-asgi nginx-granian-asgi ;;
    # Pool mode: one worker beside in-process hosting (the transport's cost) ...
    pool-1-wsgi) echo portico portico-pool1 ;;
    pool-1-asgi) echo portico-asgi portico-pool1-asgi ;;
    pool-1-echo) echo portico portico-pool1 ;;
    # ... and two workers beside the peers' two workers (in-process portico for reference).
    pool-2-wsgi) echo portico-pool2 granian-w2 gunicorn-sync-w2 gunicorn-gthread-w2 portico pingora-fixed ;;
  esac
}

uses_nginx() { # whether a selected scenario runs nginx
  local s
  for s in "${SCENARIOS[@]}"; do [[ "$s" == nginx-* ]] && return 0; done
  return 1
}

uses_pool() { # whether a selected scenario is a pool one
  local s
  for s in "${SCENARIOS[@]}"; do [[ "$s" == pool-* ]] && return 0; done
  return 1
}

uses_server() { # SERVER: whether a selected scenario runs it
  local s
  for s in "${SCENARIOS[@]}"; do [[ " $(scenario_servers "$s") " == *" $1 "* ]] && return 0; done
  return 1
}

uses_tool() { # TOOL: whether a selected scenario needs it
  local s
  for s in "${SCENARIOS[@]}"; do [ "$(scenario_tool "$s")" = "$1" ] && return 0; done
  return 1
}

# --- setup ---------------------------------------------------------------------------------

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run: $*"; fi
}

# need COMMAND PACKAGE...: install the Debian packages if COMMAND is not on PATH.
apt_updated=0
need() {
  local cmd="$1"; shift
  command -v "$cmd" >/dev/null && return 0
  log "installing Debian packages for $cmd: $*"
  if [ $apt_updated = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  command -v "$cmd" >/dev/null || die "$cmd still missing after installing $*"
}

# need_pkgs PACKAGE...: install those of the Debian packages that are not installed.
need_pkgs() {
  local pkg missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} = 0 ] && return 0
  log "installing Debian packages: ${missing[*]}"
  if [ $apt_updated = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

log "building portico (scripts/setup.sh)"
scripts/setup.sh >&2
PY="$(cat target/release/.portico-python)"
PORTICO="$ROOT/target/release/portico"
[ -x "$PORTICO" ] || die "$PORTICO was not built"

need taskset util-linux
need curl curl
uses_tool wrk && need wrk wrk
uses_tool h2load && need h2load nghttp2-client

NGINX="" NGINX_MODULE="" UWSGI="" RUNTMP=""
if uses_nginx; then
  # Installs Debian's nginx (and what the build needs) and builds the module for it, embedding
  # the CPython portico embeds, so that bench/.venv can be its python home.
  log "building the nginx module (scripts/nginx-module.sh)"
  NGINX_MODULE="$(PORTICO_PYTHON="$PY" scripts/nginx-module.sh)" \
    || die "scripts/nginx-module.sh failed to build the nginx module"
  [ -f "$NGINX_MODULE" ] || die "scripts/nginx-module.sh printed '$NGINX_MODULE', which is no file"
  NGINX="${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}"
  [ -x "$NGINX" ] || die "no nginx at $NGINX"
  # uWSGI with its python3 plugin: it embeds Debian's python3, not bench/.venv's.
  need_pkgs uwsgi uwsgi-plugin-python3
  UWSGI="$(command -v uwsgi || echo /usr/bin/uwsgi)"
  [ -x "$UWSGI" ] || die "no uwsgi at $UWSGI after installing uwsgi"
  # The Unix sockets between nginx and the app servers (short paths: sun_path is 108 bytes).
  RUNTMP="$(mktemp -d /tmp/portico-bench.XXXXXX)"
fi

FIXED_RESPONSE="$ROOT/target/release/examples/fixed_response"
if uses_server pingora-fixed; then
  command -v cargo >/dev/null || [ ! -x "$HOME/.cargo/bin/cargo" ] || export PATH="$HOME/.cargo/bin:$PATH"
  log "building the pingora-fixed row (proxy/examples/fixed_response.rs)"
  PYO3_PYTHON="$PY" cargo build --release --locked --quiet --example fixed_response -p portico-proxy >&2
  [ -x "$FIXED_RESPONSE" ] || die "$FIXED_RESPONSE was not built"
fi

if uses_tool wsload; then
  command -v cargo >/dev/null || [ ! -x "$HOME/.cargo/bin/cargo" ] || export PATH="$HOME/.cargo/bin:$PATH"
  command -v cargo >/dev/null || die "cargo is needed to build bench/wsload"
  log "building bench/wsload"
  cargo build --release --quiet --manifest-path "$WSLOAD_DIR/Cargo.toml" \
    --target-dir "$WSLOAD_DIR/target" >&2
  [ -x "$WSLOAD" ] || die "$WSLOAD was not built"
fi

realpath_of() { "$1" -c 'import os, sys; print(os.path.realpath(sys._base_executable))'; }
if [ ! -x "$VENV/bin/python" ] || [ "$(realpath_of "$VENV/bin/python" 2>/dev/null)" != "$(realpath_of "$PY")" ]; then
  log "creating bench/.venv with $PY"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
log "installing the peers into bench/.venv"
"$VENV/bin/pip" install -q --disable-pip-version-check -r "$BENCH/requirements.txt" >&2

rm -rf "$LOGS"
mkdir -p "$LOGS"
BODY_FILE="$LOGS/body.bin"
head -c "$BODY_BYTES" /dev/zero | tr '\0' x >"$BODY_FILE"

# From here on this script, curl, the RSS sampler and the load tools all run on the load CPU,
# so the server has its CPU to itself.
taskset -p -c "$LOAD_CPU" $$ >/dev/null

# --- servers -------------------------------------------------------------------------------

is_h2() { [[ "$1" == h2-* ]]; }
is_ws() { [[ "$1" == ws* ]]; }

# server_exec SERVER SCENARIO PORT: becomes the server (run it in a subshell). SERVER-w2 is
# SERVER with two worker processes instead of one (granian, gunicorn); all of its processes
# (master and workers) are pinned to CPU 0 like every other server's.
server_exec() {
  local server="$1" scenario="$2" port="$3" target http=() workers=1
  target="$(scenario_target "$scenario")"
  is_h2 "$scenario" && http=(--http 2)
  if [[ "$server" == *-w2 ]]; then workers=2 server="${server%-w2}"; fi
  cd "$BENCH/apps"
  case "$server" in
    portico)
      PORTICO_LOG=warn exec taskset -c "$SERVER_CPU" "$PORTICO" run "$target" \
        --python-path "$BENCH/apps" --bind "127.0.0.1:$port" --access-log off \
        --threads "$PORTICO_THREADS" ;;
    portico-asgi)
      # --python-home: the bench venv, so that --loop auto finds uvloop there, as the peers do.
      PORTICO_LOG=warn exec taskset -c "$SERVER_CPU" "$PORTICO" run "$target" --interface asgi \
        --python-path "$BENCH/apps" --python-home "$VENV" --bind "127.0.0.1:$port" \
        --access-log off ;;
    portico-pool1 | portico-pool1-asgi | portico-pool2)
      # Pool mode is configured only through a portico.toml: `portico serve` starts the
      # workers (portico-worker, beside portico), its children, so pinned to CPU 0 with it.
      local conf="$LOGS/$scenario-$server.toml" processes=1 app_conf
      [ "$server" = portico-pool2 ] && processes=2
      if [ "$server" = portico-pool1-asgi ]; then
        # The bench venv as the python home, as the in-process ASGI row (uvloop).
        app_conf="interface = \"asgi\"
python_home = \"$VENV\""
      else
        app_conf="threads = $PORTICO_THREADS"
      fi
      cat >"$conf" <<EOF
[server]
listen = ["127.0.0.1:$port"]
access_log = "off"

[[app]]
name = "bench"
target = "$target"
mode = "pool"
processes = $processes
python_path = ["$BENCH/apps"]
$app_conf
EOF
      PORTICO_LOG=warn exec taskset -c "$SERVER_CPU" "$PORTICO" serve --config "$conf" ;;
    granian)
      exec taskset -c "$SERVER_CPU" "$VENV/bin/granian" --interface wsgi "${http[@]}" \
        --workers "$workers" --blocking-threads 1 --host 127.0.0.1 --port "$port" --no-ws \
        --no-access-log --log-level warning "$target" ;;
    granian-asgi)
      exec taskset -c "$SERVER_CPU" "$VENV/bin/granian" --interface asgi "${http[@]}" \
        --workers 1 --host 127.0.0.1 --port "$port" --no-access-log --log-level warning \
        "$target" ;;
    gunicorn-sync)
      exec taskset -c "$SERVER_CPU" "$VENV/bin/gunicorn" --workers "$workers" \
        --bind "127.0.0.1:$port" --log-level warning "$target" ;;
    gunicorn-gthread)
      exec taskset -c "$SERVER_CPU" "$VENV/bin/gunicorn" --workers "$workers" --worker-class gthread \
        --threads 4 --bind "127.0.0.1:$port" --log-level warning "$target" ;;
    uvicorn | uvicorn-websockets | uvicorn-sansio | uvicorn-wsproto)
      local ws=()
      case "$server" in
        uvicorn-websockets) ws=(--ws websockets) ;;
        uvicorn-sansio) ws=(--ws websockets-sansio) ;;
        uvicorn-wsproto) ws=(--ws wsproto) ;;
      esac
      exec taskset -c "$SERVER_CPU" "$VENV/bin/uvicorn" --loop uvloop --http httptools "${ws[@]}" \
        --workers 1 --no-access-log --log-level warning --host 127.0.0.1 --port "$port" \
        "$target" ;;
    wsload-echo)
      exec taskset -c "$SERVER_CPU" "$WSLOAD" --serve "127.0.0.1:$port" ;;
    pingora-fixed)
      exec taskset -c "$SERVER_CPU" "$FIXED_RESPONSE" "127.0.0.1:$port" ;;
    nginx-*)
      # nginx with one worker; behind it, where there is one, the app server on a Unix socket,
      # started first as a child of this shell, so of nginx's master once it replaces the
      # shell: the server's process tree (RSS, stop) is the whole stack.
      local prefix="$LOGS/$scenario-$server.nginx" sock="$RUNTMP/$scenario-$server.sock"
      local module="" http_conf="" location="" backend="" deadline
      rm -f "$sock"
      case "$server" in
        nginx-portico)
          module="$NGINX_MODULE"
          location="portico_app $target interface=wsgi threads=$PORTICO_THREADS python_path=$BENCH/apps;" ;;
        nginx-portico-pool)
          # The app in a pool the module's master starts (`portico pool --watchdog` and one
          # portico-worker, children of the master, so on CPU 0 too): nginx's worker forwards
          # each request to the pool server, which hands it on to its worker.
          module="$NGINX_MODULE"
          cat >"$prefix.toml" <<EOF
[server]
listen = ["127.0.0.1:1"]

[[app]]
name = "bench"
target = "$target"
mode = "pool"
processes = 1
threads = $PORTICO_THREADS
python_path = ["$BENCH/apps"]
EOF
          http_conf="portico_config $prefix.toml;
    portico_pool_binary $PORTICO;"
          location="portico_pass bench;" ;;
        nginx-portico-asgi)
          # The bench venv as the python home, as portico's own ASGI rows (uvloop).
          module="$NGINX_MODULE"
          http_conf="portico_python_home $VENV;"
          location="portico_app $target interface=asgi python_path=$BENCH/apps;" ;;
        nginx-granian | nginx-granian-asgi)
          local interface=wsgi opts=(--blocking-threads 1 --no-ws)
          [ "$server" = nginx-granian-asgi ] && interface=asgi opts=()
          taskset -c "$SERVER_CPU" "$VENV/bin/granian" --interface "$interface" --workers 1 \
            "${opts[@]}" --uds "$sock" --no-access-log --log-level warning "$target" &
          backend=$!
          # Keep-alive to the upstream, as a tuned proxy runs: as many idle connections as
          # the load tool has.
          http_conf="upstream granian {
        server unix:$sock;
        keepalive $CONNECTIONS;
        keepalive_requests 100000;
    }"
          location="proxy_pass http://granian;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host \$host;" ;;
        nginx-uwsgi)
          # Debian's uWSGI with its python3 plugin: a master and one worker process with
          # UWSGI_THREADS threads; its own python3, so only bench/apps on the path.
          taskset -c "$SERVER_CPU" "$UWSGI" --plugin python3 --master --processes 1 \
            --threads "$UWSGI_THREADS" --socket "$sock" --pythonpath "$BENCH/apps" \
            --module "$target" --single-interpreter --need-app --disable-logging &
          backend=$!
          # Debian's uwsgi_params, inline.
          location="uwsgi_pass unix:$sock;
            uwsgi_param QUERY_STRING \$query_string;
            uwsgi_param REQUEST_METHOD \$request_method;
            uwsgi_param CONTENT_TYPE \$content_type;
            uwsgi_param CONTENT_LENGTH \$content_length;
            uwsgi_param REQUEST_URI \$request_uri;
            uwsgi_param PATH_INFO \$document_uri;
            uwsgi_param DOCUMENT_ROOT \$document_root;
            uwsgi_param SERVER_PROTOCOL \$server_protocol;
            uwsgi_param REQUEST_SCHEME \$scheme;
            uwsgi_param HTTPS \$https if_not_empty;
            uwsgi_param REMOTE_ADDR \$remote_addr;
            uwsgi_param REMOTE_PORT \$remote_port;
            uwsgi_param SERVER_PORT \$server_port;
            uwsgi_param SERVER_NAME \$server_name;
            uwsgi_param HTTP_HOST \$host;" ;;
        *) echo "unknown server $server" >&2; exit 2 ;;
      esac
      nginx_conf "$prefix" "$port" "$module" "$http_conf" "$location"
      # nginx starts once the app server has its socket (else its first answers are 502s).
      deadline=$((SECONDS + READY_TIMEOUT))
      while [ -n "$backend" ] && [ ! -S "$sock" ]; do
        if ! kill -0 "$backend" 2>/dev/null || ((SECONDS >= deadline)); then
          echo "bench/run.sh: the app server behind nginx made no socket $sock" >&2
          kill "$backend" 2>/dev/null
          exit 1
        fi
        sleep 0.05
      done
      exec taskset -c "$SERVER_CPU" "$NGINX" -p "$prefix" -c nginx.conf -e stderr ;;
    *) echo "unknown server $server" >&2; exit 2 ;;
  esac
}

# nginx_conf PREFIX PORT MODULE HTTP LOCATION: writes PREFIX/nginx.conf, the same for every
# nginx row but for the module it loads (none for the proxies), the extra http-level
# directives and what serves `location /`. One worker; no access log; errors (and what the
# app writes to standard error) to nginx's standard error, the server log; keep-alive
# connections from the load tool are not closed after nginx's default of 1000 requests.
nginx_conf() {
  local prefix="$1" port="$2" module="$3" http_conf="$4" location="$5" d user="" load=""
  for d in logs body proxy fastcgi uwsgi scgi; do mkdir -p "$prefix/$d"; done
  # Workers must read the embedded Python and bench/.venv, wherever they are (pyenv's under
  # /root): as root, they run as root.
  [ "$(id -u)" = 0 ] && user="user root;"
  [ -n "$module" ] && load="load_module $module;"
  cat >"$prefix/nginx.conf" <<EOF
$load
$user
daemon off;
master_process on;
worker_processes 1;
error_log stderr warn;
pid $prefix/logs/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 100000;
    client_body_temp_path $prefix/body;
    proxy_temp_path $prefix/proxy;
    fastcgi_temp_path $prefix/fastcgi;
    uwsgi_temp_path $prefix/uwsgi;
    scgi_temp_path $prefix/scgi;
    $http_conf
    server {
        listen 127.0.0.1:$port;
        location / {
            $location
        }
    }
}
EOF
}

server_label() { # SERVER SCENARIO
  local h2="" alone="" inproc=""
  is_h2 "$2" && h2=", --http 2"
  [[ "$2" == nginx-* ]] && alone=" alone"
  [[ "$2" == pool-* ]] && inproc="in-process, "
  case "$1" in
    portico) echo "portico (${inproc}--threads $PORTICO_THREADS)" ;;
    portico-asgi) echo "portico (${inproc}asgi)" ;;
    portico-pool1) echo "portico pool (processes = 1, threads = $PORTICO_THREADS)" ;;
    portico-pool1-asgi) echo "portico pool (asgi, processes = 1)" ;;
    portico-pool2) echo "portico pool (processes = 2, threads = $PORTICO_THREADS)" ;;
    granian-w2) echo "granian (wsgi, --workers 2, --blocking-threads 1)" ;;
    gunicorn-sync-w2) echo "gunicorn sync (-w 2)" ;;
    gunicorn-gthread-w2) echo "gunicorn gthread (-w 2, --threads 4)" ;;
    granian) echo "granian$alone (wsgi$h2, --blocking-threads 1)" ;;
    granian-asgi) echo "granian$alone (asgi$h2)" ;;
    gunicorn-sync) echo "gunicorn sync" ;;
    gunicorn-gthread) echo "gunicorn gthread (--threads 4)" ;;
    uvicorn) echo "uvicorn (httptools)" ;;
    uvicorn-websockets) echo "uvicorn (--ws websockets)" ;;
    uvicorn-sansio) echo "uvicorn (--ws websockets-sansio)" ;;
    uvicorn-wsproto) echo "uvicorn (--ws wsproto)" ;;
    wsload-echo) echo "wsload's Rust echo server (load-tool ceiling, not a peer)" ;;
    pingora-fixed) echo "Pingora alone, a fixed response from request_filter (portico's floor, not a peer)" ;;
    nginx-portico) echo "nginx + portico module (in the worker, threads=$PORTICO_THREADS)" ;;
    nginx-portico-asgi) echo "nginx + portico module (in the worker, asgi)" ;;
    nginx-portico-pool) echo "nginx + portico pool (portico_pass; processes = 1, threads = $PORTICO_THREADS)" ;;
    nginx-granian) echo "nginx → granian (proxy_pass, Unix socket; wsgi, --blocking-threads 1)" ;;
    nginx-granian-asgi) echo "nginx → granian (proxy_pass, Unix socket; asgi)" ;;
    nginx-uwsgi) echo "nginx → uWSGI (uwsgi_pass, Unix socket; 1 process, --threads $UWSGI_THREADS)" ;;
  esac
}

# cpu_busy: percent busy of the server and load CPUs over half a second, as "S L". Checked
# before each server starts, when nothing of ours is running, to catch other load on the box.
cpu_busy() {
  local a b
  a="$(grep -E "^cpu($SERVER_CPU|$LOAD_CPU) " /proc/stat)"
  sleep 0.5
  b="$(grep -E "^cpu($SERVER_CPU|$LOAD_CPU) " /proc/stat)"
  printf '%s\n%s\n' "$a" "$b" | awk -v s="cpu$SERVER_CPU" -v l="cpu$LOAD_CPU" '
    {
      total = 0
      for (i = 2; i <= NF; i++) total += $i
      idle = $5 + $6
      if ($1 in t0) { pct[$1] = 100 * (1 - (idle - i0[$1]) / (total - t0[$1] + 1e-9)) }
      else { t0[$1] = total; i0[$1] = idle }
    }
    END { printf "%.0f %.0f", pct[s], pct[l] }'
}

# wait_quiet: waits up to QUIET_WAIT s for both CPUs to be idle; prints the last "S L" busy
# figures and fails if they never were.
wait_quiet() {
  local deadline=$((SECONDS + QUIET_WAIT)) busy warned=0
  while :; do
    busy="$(cpu_busy)"
    if [ "${busy% *}" -le "$BUSY_LIMIT" ] && [ "${busy#* }" -le "$BUSY_LIMIT" ]; then
      echo "$busy"; return 0
    fi
    if ((SECONDS >= deadline)); then echo "$busy"; return 1; fi
    if [ $warned = 0 ]; then
      log "CPUs busy with other work ($busy %); waiting up to ${QUIET_WAIT}s for them to go idle"
      warned=1
    fi
  done
}

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# descendants PID: PID and every process below it, one a line.
descendants() {
  ps -e -o pid=,ppid= | awk -v root="$1" '
    { parent[$1] = $2 }
    END {
      for (p in parent) {
        q = p; n = 0
        while (q != root && (q in parent) && n < 64) { q = parent[q]; n++ }
        if (q == root) print p
      }
    }'
}

# tree_rss_kb PID: summed RSS of PID and its descendants, in KiB.
tree_rss_kb() {
  ps -e -o pid=,ppid=,rss= | awk -v root="$1" '
    { parent[$1] = $2; rss[$1] = $3 }
    END {
      total = 0
      for (p in parent) {
        q = p; n = 0
        while (q != root && (q in parent) && n < 64) { q = parent[q]; n++ }
        if (q == root) total += rss[p]
      }
      print total
    }'
}

# sample_rss PID FILE: every 0.2 s, writes the highest tree RSS seen so far (KiB) to FILE.
sample_rss() {
  local pid="$1" file="$2" max=0 cur
  while kill -0 "$pid" 2>/dev/null; do
    cur="$(tree_rss_kb "$pid")"
    if [ "${cur:-0}" -gt "$max" ]; then max="$cur"; echo "$max" >"$file"; fi
    sleep 0.2
  done
}

SERVER_PID=""
SAMPLER_PID=""
LOAD_PID=""

stop_sampler() {
  [ -n "$SAMPLER_PID" ] || return 0
  kill "$SAMPLER_PID" 2>/dev/null || true
  wait "$SAMPLER_PID" 2>/dev/null || true
  SAMPLER_PID=""
}

# Stops the running server: SIGINT (an immediate stop for every server here; SIGTERM would
# make portico wait out its graceful_timeout), up to 10 s to exit, then SIGKILL for the tree.
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  local pid="$SERVER_PID" tree i
  tree="$(descendants "$pid")"
  kill -INT "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "bench/run.sh: server $pid ignored SIGINT for 10 s; killing it" >&2
  fi
  # Whatever is left of the tree (workers a master failed to reap included).
  # shellcheck disable=SC2086
  kill -KILL $tree 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  SERVER_PID=""
}

cleanup() {
  if [ -n "$LOAD_PID" ]; then kill "$LOAD_PID" 2>/dev/null || true; wait "$LOAD_PID" 2>/dev/null || true; fi
  stop_sampler
  stop_server
  if [ -n "$RUNTMP" ]; then rm -rf "$RUNTMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# probe SCENARIO PORT: one quick request the way the scenario's load tool will speak.
probe() {
  local scenario="$1" port="$2"
  if is_ws "$scenario"; then
    "$WSLOAD" --check "ws://127.0.0.1:$port/" >/dev/null 2>&1
  elif is_h2 "$scenario"; then
    curl -fsS -o /dev/null --max-time 1 --http2-prior-knowledge "http://127.0.0.1:$port/" 2>/dev/null
  else
    curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null
  fi
}

# wait_ready PID SCENARIO PORT: 0 once the probe succeeds, 1 if the server dies or the deadline
# passes.
wait_ready() {
  local pid="$1" scenario="$2" port="$3" deadline=$((SECONDS + READY_TIMEOUT))
  while ((SECONDS < deadline)); do
    kill -0 "$pid" 2>/dev/null || return 1
    probe "$scenario" "$port" && return 0
    sleep 0.05
  done
  return 1
}

# check_response SCENARIO PORT: one request by hand, to make sure the load tool measures the
# right thing.
check_response() {
  local scenario="$1" port="$2" got
  case "$scenario" in
    hello | asgi | nginx-* | pool-*-wsgi | pool-*-asgi)
      got="$(curl -fsS --max-time 5 "http://127.0.0.1:$port/")" || return 1
      [ "$got" = "Hello, world!" ] ;;
    h2-*)
      got="$(curl -fsS --max-time 5 --http2-prior-knowledge -w ' HTTP/%{http_version}' "http://127.0.0.1:$port/")" || return 1
      [ "$got" = "Hello, world! HTTP/2" ] ;;
    echo | pool-*-echo)
      curl -fsS --max-time 5 -H 'Expect:' -H 'Content-Type: application/octet-stream' \
        --data-binary "@$BODY_FILE" "http://127.0.0.1:$port/" -o "$LOGS/echo-check.bin" || return 1
      cmp -s "$BODY_FILE" "$LOGS/echo-check.bin" ;;
    ws*)
      "$WSLOAD" --check "ws://127.0.0.1:$port/" ;;
  esac
}

# load_cmd SCENARIO SECONDS PORT NAME: prints the load tool's command line, one word a line.
# h2load and wsload warm up inside the same run (-> WARMUP); wrk gets a separate warm-up run.
load_cmd() {
  local scenario="$1" seconds="$2" port="$3" name="$4"
  case "$(scenario_tool "$scenario")" in
    wrk)
      printf '%s\n' wrk -t1 "-c$CONNECTIONS" "-d${seconds}s" --latency
      [[ "$scenario" == echo || "$scenario" == pool-*-echo ]] && printf '%s\n' -s "$BENCH/post64k.lua"
      echo "http://127.0.0.1:$port/" ;;
    h2load)
      printf '%s\n' h2load -t1 -c "$H2_CONNECTIONS" -m "$H2_STREAMS" -D "$seconds" \
        --warm-up-time "$WARMUP" --log-file "$LOGS/$name.h2load.tsv" "http://127.0.0.1:$port/" ;;
    wsload)
      local c="$CONNECTIONS" k=1
      [ "$scenario" = ws-pipelined ] && c="$WS_PIPE_CONNECTIONS" k="$WS_PIPE_DEPTH"
      printf '%s\n' "$WSLOAD" -c "$c" -k "$k" -s "$WS_MESSAGE" -w "$WARMUP" -d "$seconds" \
        "ws://127.0.0.1:$port/" ;;
  esac
}

load_run() { # SCENARIO SECONDS OUTPUT PORT NAME
  local scenario="$1" seconds="$2" out="$3" port="$4" name="$5" cmd=()
  mapfile -t cmd < <(load_cmd "$scenario" "$seconds" "$port" "$name")
  rm -f "$LOGS/$name.h2load.tsv" # h2load appends to its log file
  # In the background so that a signal to this script is handled at once, not after the run.
  taskset -c "$LOAD_CPU" "${cmd[@]}" >"$out" 2>&1 &
  LOAD_PID=$!
  local status=0
  wait "$LOAD_PID" || status=$?
  LOAD_PID=""
  return "$status"
}

# percentiles_ms FILE: "p50 p99" in ms of column 3 (microseconds) of an h2load --log-file.
percentiles_ms() {
  cut -f3 "$1" | sort -n | awk '
    { v[NR] = $1 }
    END {
      if (NR == 0) { print "- -"; exit }
      i50 = int(NR * 0.50); if (i50 < NR * 0.50) i50++; if (i50 < 1) i50 = 1
      i99 = int(NR * 0.99); if (i99 < NR * 0.99) i99++; if (i99 < 1) i99 = 1
      printf "%.2fms %.2fms\n", v[i50] / 1000, v[i99] / 1000
    }'
}

# parse_load SCENARIO OUTPUT NAME: sets RPS, P50, P99 and NOTE from the load tool's output, and
# ERRORS to what of NOTE is errors the load tool counted (socket errors, non-2xx responses,
# failed requests or connections): a row with those gets a ! after its rate.
parse_load() {
  local scenario="$1" out="$2" name="$3" errors non2xx failed pct
  RPS="" P50="" P99="" NOTE="" ERRORS=""
  case "$(scenario_tool "$scenario")" in
    wrk)
      RPS="$(awk '$1 == "Requests/sec:" { printf "%.0f", $2 }' "$out")"
      P50="$(awk '$1 == "50%" { print $2; exit }' "$out")"
      P99="$(awk '$1 == "99%" { print $2; exit }' "$out")"
      errors="$(awk -F': *' '$1 ~ /Socket errors/ { print $2 }' "$out")"
      non2xx="$(awk -F': *' '$1 ~ /Non-2xx or 3xx responses/ { print $2 }' "$out")"
      [ -n "$errors" ] && NOTE="wrk socket errors: $errors"
      [ -n "$non2xx" ] && NOTE="${NOTE:+$NOTE; }$non2xx non-2xx responses" ;;
    h2load)
      RPS="$(awk '$1 == "finished" && $2 == "in" { printf "%.0f", $4 }' "$out")"
      failed="$(awk '$1 == "requests:" { f = $10 + $12 + $14; if (f > 0) printf "%s failed, %s errored, %s timed out", $10, $12, $14 }' "$out")"
      non2xx="$(awk '$1 == "status" && $2 == "codes:" { n = $5 + $7 + $9; if (n > 0) print n }' "$out")"
      [ -n "$failed" ] && NOTE="h2load: $failed"
      [ -n "$non2xx" ] && NOTE="${NOTE:+$NOTE; }$non2xx non-2xx responses"
      if [ -s "$LOGS/$name.h2load.tsv" ]; then
        pct="$(percentiles_ms "$LOGS/$name.h2load.tsv")"
        P50="${pct% *}" P99="${pct#* }"
        rm -f "$LOGS/$name.h2load.tsv" # a line per request: tens of MB
      fi ;;
    wsload)
      RPS="$(awk '$1 == "msg/s:" { print $2 }' "$out")"
      P50="$(awk '$1 == "p50:" { print $2 }' "$out")"
      P99="$(awk '$1 == "p99:" { print $2 }' "$out")"
      errors="$(awk '$1 == "errors:" && $2 != 0 { print $2 }' "$out")"
      [ -n "$errors" ] && NOTE="wsload: $errors connections failed ($(awk -F': ' '$1 == "first error" { print $2 }' "$out"))" ;;
  esac
  ERRORS="$NOTE"
  [ -n "$RPS" ] || NOTE="${NOTE:+$NOTE; }could not read the rate from the load tool's output"
}

# kb_of PID: VmRSS of PID in KiB, from /proc/PID/status (0 if it is gone).
kb_of() { awk '$1 == "VmRSS:" { print $2; found = 1 } END { if (!found) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# nginx_rss MASTER: right after the load, sets NGINX_RSS to "worker W MB (pid P); master M MB"
# and, when something runs behind nginx, "; behind it B MB" (the summed RSS of the master's
# other descendants: the app server's processes).
nginx_rss() {
  local master="$1" worker worker_kb master_kb behind_kb
  worker="$(ps -o pid=,comm= --ppid "$master" | awk '$2 == "nginx" { print $1; exit }')"
  if [ -z "$worker" ]; then NGINX_RSS="no nginx worker found under the master $master"; return; fi
  worker_kb="$(kb_of "$worker")" master_kb="$(kb_of "$master")"
  behind_kb=$(($(tree_rss_kb "$master") - worker_kb - master_kb))
  NGINX_RSS="worker $(mb "$worker_kb") MB (pid $worker); master $(mb "$master_kb") MB"
  if ((behind_kb > 0)); then NGINX_RSS="$NGINX_RSS; behind it $(mb "$behind_kb") MB"; fi
}

# One row per (scenario, server), filled by bench_one.
ROW_SCENARIO=() ROW_SERVER=() ROW_RPS=() ROW_P50=() ROW_P99=() ROW_RSS=() ROW_LOOP=() ROW_BUSY=()
ROW_ERRORS=()
ROW_NGINX_RSS=()
NOTES=()

# bench_one SCENARIO SERVER: boots the server, warms it up, measures, stops it; adds a row.
bench_one() {
  local scenario="$1" server="$2" port pid name="$1-$2" label
  local server_log="$LOGS/$name.server.log" out="$LOGS/$name.load.txt" rss_file="$LOGS/$name.rss"
  local rps="" p50="" p99="" rss="" note="" errors="" busy loop busy_note="" nginx_rss_line=""
  label="$(scenario_label "$scenario") / $(server_label "$server" "$scenario")"
  busy="$(wait_quiet)" || {
    echo "bench/run.sh: warning: other load on the machine before $scenario / $server (busy: CPU $SERVER_CPU ${busy% *}%, CPU $LOAD_CPU ${busy#* }%)" >&2
    busy_note="before the run CPU $SERVER_CPU was ${busy% *}% busy, CPU $LOAD_CPU ${busy#* }%"
  }
  port="$(free_port)"
  log "$scenario / $server on 127.0.0.1:$port"
  (server_exec "$server" "$scenario" "$port") </dev/null >"$server_log" 2>&1 &
  SERVER_PID=$!
  pid=$SERVER_PID

  if ! wait_ready "$pid" "$scenario" "$port"; then
    note="did not start within ${READY_TIMEOUT}s"
    kill -0 "$pid" 2>/dev/null || note="exited before answering"
  elif ! check_response "$scenario" "$port"; then
    note="wrong response to a check request"
  else
    echo 0 >"$rss_file"
    sample_rss "$pid" "$rss_file" &
    SAMPLER_PID=$!
    if [ "$(scenario_tool "$scenario")" = wrk ] &&
      ! load_run "$scenario" "$WARMUP" "$LOGS/$name.warmup.txt" "$port" "$name"; then
      note="wrk warm-up failed"
      cat "$LOGS/$name.warmup.txt" >&2
    elif ! load_run "$scenario" "$DURATION" "$out" "$port" "$name"; then
      note="$(scenario_tool "$scenario") failed"
      cat "$out" >&2
    else
      parse_load "$scenario" "$out" "$name"
      rps="$RPS" p50="$P50" p99="$P99" note="$NOTE" errors="$ERRORS"
      if [ -n "$errors" ]; then
        echo "bench/run.sh: warning: $scenario / $server: the load tool counted errors: $errors" >&2
      fi
      kill -0 "$pid" 2>/dev/null || note="${note:+$note; }server died during the run"
      if [[ "$server" == nginx-* ]] && kill -0 "$pid" 2>/dev/null; then
        nginx_rss "$pid"
        nginx_rss_line="$NGINX_RSS"
      fi
    fi
    stop_sampler
    rss="$(awk '{ printf "%.1f", $1 / 1024 }' "$rss_file")"
  fi
  stop_server
  # Which event loop the ASGI app ran on (bench/apps/*.py print it once).
  loop="$(awk '$1 == "bench-loop:" { print $2; exit }' "$server_log")"
  # Load that shows up right after the run most likely overlapped it.
  if [ -n "$rps" ]; then
    busy="$(cpu_busy)"
    if [ "${busy% *}" -gt "$BUSY_LIMIT" ] || [ "${busy#* }" -gt "$BUSY_LIMIT" ]; then
      echo "bench/run.sh: warning: other load on the machine right after $scenario / $server (busy: CPU $SERVER_CPU ${busy% *}%, CPU $LOAD_CPU ${busy#* }%)" >&2
      busy_note="${busy_note:+$busy_note; }right after it CPU $SERVER_CPU was ${busy% *}% busy, CPU $LOAD_CPU ${busy#* }%"
    fi
  fi
  if [ -n "$busy_note" ]; then
    NOTES+=("$label: other load on the machine ($busy_note); the row is unreliable")
  fi

  if [ -z "$rps" ]; then
    echo "bench/run.sh: $scenario / $server failed: $note; its log ($server_log):" >&2
    sed 's/^/    /' "$server_log" >&2
    rps="failed" p50="" p99=""
  fi
  ROW_SCENARIO+=("$scenario") ROW_SERVER+=("$server") ROW_RPS+=("$rps") ROW_P50+=("$p50")
  ROW_P99+=("$p99") ROW_RSS+=("$rss") ROW_LOOP+=("$loop") ROW_BUSY+=("${busy_note:+*}")
  ROW_ERRORS+=("${errors:+!}")
  ROW_NGINX_RSS+=("$nginx_rss_line")
  [ -n "$note" ] && NOTES+=("$label: $note")
  return 0
}

# keep_medians SCENARIO FIRST: of the rows from index FIRST on (ROUNDS runs of each of the
# scenario's servers), keeps one per server: its median run by req/s (a failed run counts as
# the slowest), and notes every run's figure.
keep_medians() {
  local scenario="$1" first="$2" server i kept=() runs name
  for server in $(scenario_servers "$scenario"); do
    runs=()
    for ((i = first; i < ${#ROW_SCENARIO[@]}; i++)); do
      [ "${ROW_SERVER[$i]}" = "$server" ] && runs+=("${ROW_RPS[$i]} $i")
    done
    [ ${#runs[@]} -gt 0 ] || continue
    # Sorted slowest first ("failed" as 0); the middle one, the lower for an even count.
    mapfile -t runs < <(printf '%s\n' "${runs[@]}" | awk '{ print ($1 ~ /^[0-9]+$/ ? $1 : 0), $2, $1 }' | sort -n -k1,1)
    kept+=("$(echo "${runs[$(((${#runs[@]} - 1) / 2))]}" | awk '{ print $2 }')")
    NOTES+=("$(scenario_label "$scenario") / $(server_label "$server" "$scenario"): the median of $ROUNDS runs, alternating the servers' order; req/s of each, slowest first: $(printf '%s\n' "${runs[@]}" | awk '{ print $3 }' | paste -sd, | sed 's/,/, /g')")
  done
  for name in ROW_SCENARIO ROW_SERVER ROW_RPS ROW_P50 ROW_P99 ROW_RSS ROW_LOOP ROW_BUSY \
    ROW_ERRORS ROW_NGINX_RSS; do
    local -n rows="$name"
    local chosen=("${rows[@]:0:first}")
    for i in "${kept[@]}"; do chosen+=("${rows[$i]}"); done
    rows=("${chosen[@]}")
    unset -n rows
  done
}

for scenario in "${SCENARIOS[@]}"; do
  first=${#ROW_SCENARIO[@]}
  read -ra servers <<<"$(scenario_servers "$scenario")"
  for ((round = 1; round <= ROUNDS; round++)); do
    # Every other round in reverse, so that no server always runs first or last.
    order=("${servers[@]}")
    if ((round % 2 == 0)); then
      order=()
      for ((i = ${#servers[@]} - 1; i >= 0; i--)); do order+=("${servers[$i]}"); done
    fi
    for server in "${order[@]}"; do
      bench_one "$scenario" "$server"
    done
  done
  if ((ROUNDS > 1)); then keep_medians "$scenario" "$first"; fi
done

# --- report --------------------------------------------------------------------------------

# base_rps SCENARIO PEER: the reference figure of PEER (granian, uvicorn) in SCENARIO: the
# granian row, or the fastest uvicorn row (there are several in the WebSocket scenarios);
# prints "RPS SERVER", nothing if there is none.
base_rps() {
  local i best="" best_server=""
  for i in "${!ROW_SCENARIO[@]}"; do
    [ "${ROW_SCENARIO[$i]}" = "$1" ] || continue
    [[ "${ROW_SERVER[$i]}" == "$2" || "${ROW_SERVER[$i]}" == "$2"-* ]] || continue
    [[ "${ROW_RPS[$i]}" =~ ^[0-9]+$ ]] || continue
    if [ -z "$best" ] || [ "${ROW_RPS[$i]}" -gt "$best" ]; then
      best="${ROW_RPS[$i]}" best_server="${ROW_SERVER[$i]}"
    fi
  done
  [ -n "$best" ] && echo "$best $best_server"
  return 0
}

# is_reference SERVER: whether the row is a ceiling or floor shown for reference (the load
# tool's own echo server, Pingora answering on its own), compared with nothing.
is_reference() { [ "$1" = wsload-echo ] || [ "$1" = pingora-fixed ]; }

# ratio SCENARIO ROW PEER: "1.08x", "n/a" (failed), or "-" (no such peer in this scenario,
# or the row is not a server being compared).
ratio() {
  local scenario="$1" i="$2" peer="$3" base rps="${ROW_RPS[$2]}"
  is_reference "${ROW_SERVER[$i]}" && { echo "-"; return; }
  if ! server_in "$scenario" "$peer"; then echo "-"; return; fi
  base="$(base_rps "$scenario" "$peer")"
  base="${base% *}"
  if [[ "$rps" =~ ^[0-9]+$ && "$base" =~ ^[0-9]+$ && "$base" != 0 ]]; then
    awk -v a="$rps" -v b="$base" 'BEGIN { printf "%.2fx", a / b }'
  else
    echo "n/a"
  fi
}

# ratio_to SCENARIO ROW SERVER: like ratio, against the row of exactly SERVER in SCENARIO.
ratio_to() {
  local scenario="$1" i="$2" j rps="${ROW_RPS[$2]}" base=""
  is_reference "${ROW_SERVER[$i]}" && { echo "-"; return; }
  for j in "${!ROW_SCENARIO[@]}"; do
    [ "${ROW_SCENARIO[$j]}" = "$scenario" ] && [ "${ROW_SERVER[$j]}" = "$3" ] && base="${ROW_RPS[$j]}"
  done
  if ! [[ " $(scenario_servers "$scenario") " == *" $3 "* ]]; then
    echo "-"
  elif [[ "$rps" =~ ^[0-9]+$ && "$base" =~ ^[0-9]+$ && "$base" != 0 ]]; then
    awk -v a="$rps" -v b="$base" 'BEGIN { printf "%.2fx", a / b }'
  else
    echo "n/a"
  fi
}

# inproc_of SCENARIO: the in-process portico row of a pool scenario, the baseline of its
# "vs in-process" column; nothing for other scenarios.
inproc_of() {
  case "$1" in
    pool-*-wsgi | pool-*-echo) echo portico ;;
    pool-*-asgi) echo portico-asgi ;;
  esac
}

server_in() { # SCENARIO PEER: whether a server of that peer runs in the scenario
  local s
  for s in $(scenario_servers "$1"); do [[ "$s" == "$2" || "$s" == "$2"-* ]] && return 0; done
  return 1
}

version_of() { "$VENV/bin/python" -c "from importlib.metadata import version; print(version('$1'))" 2>/dev/null || echo "?"; }

elapsed() {
  local s=$((SECONDS - STARTED))
  printf '%dm%02ds' $((s / 60)) $((s % 60))
}

report() {
  local i s base line commit tools=()
  commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  git -C "$ROOT" diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
  uses_tool wrk && tools+=("$( (wrk -v 2>&1 || true) | head -1 | awk '{ print $1, $2 }')")
  uses_tool h2load && tools+=("$( (h2load --version 2>&1 || true) | head -1)")
  uses_tool wsload && tools+=("bench/wsload (tokio-tungstenite $(awk '/^name = "tokio-tungstenite"/ { getline; gsub(/[^0-9.]/, ""); print; exit }' "$WSLOAD_DIR/Cargo.lock" 2>/dev/null))")
  echo "# Portico benchmark"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); the run took $(elapsed)"
  echo "- nproc: $cpus ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null))"
  echo "- python: $("$PY" -V 2>&1) ($PY)"
  echo "- portico: $("$PORTICO" --version 2>/dev/null | awk '{ print $2 }') at $commit;" \
    "granian $(version_of granian); uvicorn $(version_of uvicorn) (uvloop $(version_of uvloop)," \
    "httptools $(version_of httptools), websockets $(version_of websockets), wsproto $(version_of wsproto));" \
    "gunicorn $(version_of gunicorn)"
  local joined
  joined="$(IFS=';'; echo "${tools[*]}")"
  echo "- load tools: ${joined//;/; }"
  echo "- each server: one worker pinned to CPU $SERVER_CPU; the load tool pinned to CPU $LOAD_CPU;" \
    "${DURATION}s measured after ${WARMUP}s of unrecorded warm-up;" \
    "peak RSS is the server's whole process tree, sampled every 0.2 s"
  if ((ROUNDS > 1)); then
    echo "- rounds: each server ran $ROUNDS times per scenario, the servers' order reversed every" \
      "other round; each row is that server's median run (every run's req/s is in the notes)"
  fi
  uses_tool wrk && echo "- HTTP/1.1 load: \`wrk -t1 -c$CONNECTIONS --latency\` (warm-up: a separate wrk run)"
  uses_tool h2load && echo "- HTTP/2 load: \`h2load -t1 -c$H2_CONNECTIONS -m$H2_STREAMS --warm-up-time $WARMUP\`" \
    "(h2c with prior knowledge; p50/p99 computed from its per-request log)"
  uses_tool wsload && echo "- WebSocket load: \`wsload -c$CONNECTIONS -k1 -s$WS_MESSAGE\` (ping-pong) and" \
    "\`wsload -c$WS_PIPE_CONNECTIONS -k$WS_PIPE_DEPTH -s$WS_MESSAGE\` (pipelined), warm-up in the same run;" \
    "p50/p99 are message round trips"
  if uses_nginx; then
    echo "- nginx: $("$NGINX" -v 2>&1 | sed 's/^nginx version: //') ($NGINX), \`worker_processes 1\`," \
      "no access log, \`keepalive_requests 100000\`; the module \`${NGINX_MODULE#"$ROOT"/}\`;" \
      "uWSGI $("$UWSGI" --version 2>/dev/null) with Debian's $(/usr/bin/python3 -V 2>&1);" \
      "nginx and the app server behind it share CPU $SERVER_CPU, and peak RSS counts all their processes"
  fi
  if uses_pool; then
    echo "- pool: \`portico serve\` with a portico.toml of the script's own (\`mode = \"pool\"\`," \
      "\`processes\` workers; WSGI \`threads = $PORTICO_THREADS\` as the in-process row, ASGI with the" \
      "bench venv as \`python_home\`), in \`bench/results/logs/SCENARIO-SERVER.toml\`; the host process and" \
      "its portico-worker processes all on CPU $SERVER_CPU. The two-worker rows pin every process of each" \
      "server (master or host and both workers) to CPU $SERVER_CPU as well, so that no server gets more CPU" \
      "than another and none shares the load tool's: they measure what the extra processes cost on one core," \
      "not scaling across cores"
  fi
  echo "- event loop: the class of the running loop, as the ASGI app saw it; a rate marked * had" \
    "other load on the machine around its run (see the notes); a rate marked ! had errors counted" \
    "by the load tool (socket errors, non-2xx responses, failed requests; see the notes)"
  echo
  local head="| scenario | server | req/s or msg/s | p50 | p99 | peak RSS MB | event loop | vs granian | vs uvicorn |"
  local rule="|---|---|---:|---:|---:|---:|---|---:|---:|"
  uses_nginx && head="$head vs nginx → granian | vs nginx → uWSGI |" rule="$rule---:|---:|"
  uses_pool && head="$head vs in-process |" rule="$rule---:|"
  echo "$head"
  echo "$rule"
  for i in "${!ROW_SCENARIO[@]}"; do
    s="${ROW_SCENARIO[$i]}"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |' "$(scenario_label "$s")" \
      "$(server_label "${ROW_SERVER[$i]}" "$s")" "${ROW_RPS[$i]}${ROW_BUSY[$i]}${ROW_ERRORS[$i]}" "${ROW_P50[$i]:--}" \
      "${ROW_P99[$i]:--}" "${ROW_RSS[$i]:--}" "${ROW_LOOP[$i]:--}" \
      "$(ratio "$s" "$i" granian)" "$(ratio "$s" "$i" uvicorn)"
    uses_nginx && printf ' %s | %s |' "$(ratio "$s" "$i" nginx-granian)" "$(ratio "$s" "$i" nginx-uwsgi)"
    if uses_pool; then
      if [ -n "$(inproc_of "$s")" ]; then
        printf ' %s |' "$(ratio_to "$s" "$i" "$(inproc_of "$s")")"
      else
        printf ' - |'
      fi
    fi
    echo
  done
  echo
  echo "Portico against the reference peers (req/s or msg/s divided by the peer's in the same scenario;" \
    "vs uvicorn is against its fastest row there):"
  echo
  for i in "${!ROW_SCENARIO[@]}"; do
    [[ "${ROW_SERVER[$i]}" == portico* || "${ROW_SERVER[$i]}" == nginx-portico* ]] || continue
    s="${ROW_SCENARIO[$i]}"
    if [[ "$s" == pool-* ]]; then
      # The pool rows against in-process portico and, with two workers, the peers' two workers.
      [ "${ROW_SERVER[$i]}" = "$(inproc_of "$s")" ] && continue
      line="- $(scenario_label "$s"), $(server_label "${ROW_SERVER[$i]}" "$s"):"
      if server_in "$s" granian; then
        line="$line $(ratio "$s" "$i" granian) $(server_label granian-w2 "$s"),"
        line="$line $(ratio_to "$s" "$i" gunicorn-sync-w2) $(server_label gunicorn-sync-w2 "$s"),"
        line="$line $(ratio_to "$s" "$i" gunicorn-gthread-w2) $(server_label gunicorn-gthread-w2 "$s"),"
      fi
      echo "$line $(ratio_to "$s" "$i" "$(inproc_of "$s")") in-process"
      continue
    fi
    line="- $(scenario_label "$s"): $(ratio "$s" "$i" granian) granian"
    if [[ "$s" == nginx-* ]]; then
      line="- $(scenario_label "$s"), $(server_label "${ROW_SERVER[$i]}" "$s"): $(ratio "$s" "$i" granian) granian alone"
      server_in "$s" nginx-granian && line="$line, $(ratio "$s" "$i" nginx-granian) nginx → granian"
      server_in "$s" nginx-uwsgi && line="$line, $(ratio "$s" "$i" nginx-uwsgi) nginx → uWSGI"
    fi
    if server_in "$s" uvicorn; then
      base="$(base_rps "$s" uvicorn)"
      [ -n "$base" ] && base="$(server_label "${base#* }" "$s")"
      line="$line, $(ratio "$s" "$i" uvicorn) uvicorn${base:+ ${base#uvicorn }}"
    fi
    echo "$line"
  done
  if uses_nginx; then
    echo
    echo "RSS of the nginx worker (VmRSS in /proc/PID/status of the nginx master's child), read right" \
      "after the measured run; the master, and the app server behind nginx, are not in it:"
    echo
    for i in "${!ROW_SCENARIO[@]}"; do
      [[ "${ROW_SERVER[$i]}" == nginx-* ]] || continue
      s="${ROW_SCENARIO[$i]}"
      echo "- $(scenario_label "$s") / $(server_label "${ROW_SERVER[$i]}" "$s"): ${ROW_NGINX_RSS[$i]:-not measured (the row failed)}"
    done
  fi
  if [ ${#NOTES[@]} -gt 0 ]; then
    echo
    echo "Notes:"
    for i in "${!NOTES[@]}"; do echo "- ${NOTES[$i]}"; done
  fi
}

report >"$RESULTS/latest.md"
cat "$RESULTS/latest.md"
log "written to bench/results/latest.md in $(elapsed); raw load-tool output and server logs in bench/results/logs/"
