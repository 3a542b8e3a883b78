#!/usr/bin/env bash
# Benchmarks portico against granian and gunicorn: one server worker pinned to CPU 0, wrk
# pinned to CPU 1, a few WSGI scenarios. Prints one markdown table and writes it to
# bench/results/latest.md (raw wrk output and server logs go to bench/results/logs/).
#
#   bench/run.sh
#
# Environment:
#   BENCH_SECONDS    length of each measured wrk run, in seconds (default 8)
#   PORTICO_THREADS  portico's --threads, its Python threads (default 2, its best here)
#
# A benchmark, not a test: it asserts nothing about the numbers and is not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
BENCH="$ROOT/bench"
VENV="$BENCH/.venv"
RESULTS="$BENCH/results"
LOGS="$RESULTS/logs"

DURATION="${BENCH_SECONDS:-8}"
PORTICO_THREADS="${PORTICO_THREADS:-2}"
WARMUP=2          # seconds of unrecorded load before each measured run
CONNECTIONS=64
SERVER_CPU=0
LOAD_CPU=1
READY_TIMEOUT=30  # seconds a server gets to answer its first request
BODY_BYTES=65536  # must match bench/post64k.lua
BUSY_LIMIT=10     # percent; more on an idle benchmark CPU means something else is running
QUIET_WAIT=60     # seconds to wait for such other load to stop before measuring anyway

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { echo "bench/run.sh: $*" >&2; exit 1; }

[[ "$DURATION" =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a whole number of seconds, got '$DURATION'"
[[ "$PORTICO_THREADS" =~ ^[1-9][0-9]*$ ]] || die "PORTICO_THREADS must be a positive integer, got '$PORTICO_THREADS'"

cpus="$(nproc)"
[ "$cpus" -ge 2 ] || die "needs at least 2 CPUs (server on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU); nproc says $cpus"

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

log "building portico (scripts/setup.sh)"
scripts/setup.sh >&2
PY="$(cat target/release/.portico-python)"
PORTICO="$ROOT/target/release/portico"
[ -x "$PORTICO" ] || die "$PORTICO was not built"

need wrk wrk
need taskset util-linux
need curl curl

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

# From here on this script, curl, the RSS sampler and wrk all run on the load CPU, so the
# server has its CPU to itself.
taskset -p -c "$LOAD_CPU" $$ >/dev/null

# --- servers -------------------------------------------------------------------------------

SERVERS=(portico granian gunicorn-sync gunicorn-gthread)

# server_exec SERVER MODULE:CALLABLE PORT: becomes the server (run it in a subshell).
server_exec() {
  local server="$1" target="$2" port="$3"
  cd "$BENCH/apps"
  case "$server" in
    portico)
      PORTICO_LOG=warn exec taskset -c "$SERVER_CPU" "$PORTICO" run "$target" \
        --python-path "$BENCH/apps" --bind "127.0.0.1:$port" --access-log off \
        --threads "$PORTICO_THREADS" ;;
    granian)
      exec taskset -c "$SERVER_CPU" "$VENV/bin/granian" --interface wsgi --workers 1 \
        --blocking-threads 1 --host 127.0.0.1 --port "$port" --no-ws --no-access-log \
        --log-level warning "$target" ;;
    gunicorn-sync)
      exec taskset -c "$SERVER_CPU" "$VENV/bin/gunicorn" --workers 1 \
        --bind "127.0.0.1:$port" --log-level warning "$target" ;;
    gunicorn-gthread)
      exec taskset -c "$SERVER_CPU" "$VENV/bin/gunicorn" --workers 1 --worker-class gthread \
        --threads 4 --bind "127.0.0.1:$port" --log-level warning "$target" ;;
    *) echo "unknown server $server" >&2; exit 2 ;;
  esac
}

server_label() {
  case "$1" in
    portico) echo "portico (--threads $PORTICO_THREADS)" ;;
    granian) echo "granian (wsgi, --blocking-threads 1)" ;;
    gunicorn-sync) echo "gunicorn sync" ;;
    gunicorn-gthread) echo "gunicorn gthread (--threads 4)" ;;
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
WRK_PID=""

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
  if [ -n "$WRK_PID" ]; then kill "$WRK_PID" 2>/dev/null || true; wait "$WRK_PID" 2>/dev/null || true; fi
  stop_sampler
  stop_server
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_ready PID PORT: 0 once GET / answers 2xx, 1 if the server dies or the deadline passes.
wait_ready() {
  local pid="$1" port="$2" deadline=$((SECONDS + READY_TIMEOUT))
  while ((SECONDS < deadline)); do
    kill -0 "$pid" 2>/dev/null || return 1
    if curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null; then
      return 0
    fi
    sleep 0.05
  done
  return 1
}

# check_response SCENARIO PORT: one request by hand, to make sure wrk measures the right thing.
check_response() {
  local scenario="$1" port="$2" got
  case "$scenario" in
    hello)
      got="$(curl -fsS --max-time 5 "http://127.0.0.1:$port/")" || return 1
      [ "$got" = "Hello, world!" ] ;;
    echo)
      curl -fsS --max-time 5 -H 'Expect:' -H 'Content-Type: application/octet-stream' \
        --data-binary "@$BODY_FILE" "http://127.0.0.1:$port/" -o "$LOGS/echo-check.bin" || return 1
      cmp -s "$BODY_FILE" "$LOGS/echo-check.bin" ;;
  esac
}

wrk_run() { # SECONDS OUTPUT SCENARIO PORT
  local seconds="$1" out="$2" scenario="$3" port="$4" script=()
  [ "$scenario" = echo ] && script=(-s "$BENCH/post64k.lua")
  # In the background so that a signal to this script is handled at once, not after wrk.
  taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${seconds}s" --latency "${script[@]}" \
    "http://127.0.0.1:$port/" >"$out" 2>&1 &
  WRK_PID=$!
  local status=0
  wait "$WRK_PID" || status=$?
  WRK_PID=""
  return "$status"
}

# --- scenarios -----------------------------------------------------------------------------

SCENARIOS=(hello echo)
scenario_label() {
  case "$1" in
    hello) echo "WSGI hello (13 B GET)" ;;
    echo) echo "64 KiB POST echo" ;;
  esac
}
scenario_target() {
  case "$1" in
    hello) echo "hello:app" ;;
    echo) echo "echo:app" ;;
  esac
}

# One row per (scenario, server), filled by bench_one.
ROW_SCENARIO=() ROW_SERVER=() ROW_RPS=() ROW_P99=() ROW_RSS=() NOTES=()

# bench_one SCENARIO SERVER: boots the server, warms it up, measures, stops it; adds a row.
bench_one() {
  local scenario="$1" server="$2" port pid name="$1-$2"
  local server_log="$LOGS/$name.server.log" wrk_out="$LOGS/$name.wrk.txt" rss_file="$LOGS/$name.rss"
  local rps="" p99="" rss="" note="" errors non2xx busy
  busy="$(wait_quiet)" || {
    echo "bench/run.sh: warning: other load on the machine before $scenario / $server (busy: CPU $SERVER_CPU ${busy% *}%, CPU $LOAD_CPU ${busy#* }%)" >&2
    NOTES+=("$(scenario_label "$scenario") / $(server_label "$server"): other load on the machine before the run (CPU $SERVER_CPU ${busy% *}% busy, CPU $LOAD_CPU ${busy#* }%); this row is unreliable")
  }
  port="$(free_port)"
  log "$scenario / $server on 127.0.0.1:$port"
  (server_exec "$server" "$(scenario_target "$scenario")" "$port") </dev/null >"$server_log" 2>&1 &
  SERVER_PID=$!
  pid=$SERVER_PID

  if ! wait_ready "$pid" "$port"; then
    note="did not start within ${READY_TIMEOUT}s"
    kill -0 "$pid" 2>/dev/null || note="exited before answering"
  elif ! check_response "$scenario" "$port"; then
    note="wrong response to a check request"
  else
    echo 0 >"$rss_file"
    sample_rss "$pid" "$rss_file" &
    SAMPLER_PID=$!
    if ! wrk_run "$WARMUP" "$LOGS/$name.warmup.txt" "$scenario" "$port"; then
      note="wrk warm-up failed"
      cat "$LOGS/$name.warmup.txt" >&2
    elif ! wrk_run "$DURATION" "$wrk_out" "$scenario" "$port"; then
      note="wrk failed"
      cat "$wrk_out" >&2
    else
      rps="$(awk '$1 == "Requests/sec:" { printf "%.0f", $2 }' "$wrk_out")"
      p99="$(awk '$1 == "99%" { print $2; exit }' "$wrk_out")"
      errors="$(awk -F': *' '$1 ~ /Socket errors/ { print $2 }' "$wrk_out")"
      non2xx="$(awk -F': *' '$1 ~ /Non-2xx or 3xx responses/ { print $2 }' "$wrk_out")"
      [ -n "$errors" ] && note="wrk socket errors: $errors"
      [ -n "$non2xx" ] && note="${note:+$note; }$non2xx non-2xx responses"
      [ -n "$rps" ] || note="could not read Requests/sec from wrk"
      kill -0 "$pid" 2>/dev/null || note="${note:+$note; }server died during the run"
    fi
    stop_sampler
    rss="$(awk '{ printf "%.1f", $1 / 1024 }' "$rss_file")"
  fi
  stop_server
  # Load that shows up right after the run most likely overlapped it.
  if [ -n "$rps" ]; then
    busy="$(cpu_busy)"
    if [ "${busy% *}" -gt "$BUSY_LIMIT" ] || [ "${busy#* }" -gt "$BUSY_LIMIT" ]; then
      echo "bench/run.sh: warning: other load on the machine right after $scenario / $server (busy: CPU $SERVER_CPU ${busy% *}%, CPU $LOAD_CPU ${busy#* }%)" >&2
      NOTES+=("$(scenario_label "$scenario") / $(server_label "$server"): other load on the machine right after the run (CPU $SERVER_CPU ${busy% *}% busy, CPU $LOAD_CPU ${busy#* }%); this row is unreliable")
    fi
  fi

  if [ -z "$rps" ]; then
    echo "bench/run.sh: $scenario / $server failed: $note; its log ($server_log):" >&2
    sed 's/^/    /' "$server_log" >&2
    rps="failed" p99="" rss="${rss:-}"
  fi
  ROW_SCENARIO+=("$scenario") ROW_SERVER+=("$server") ROW_RPS+=("$rps") ROW_P99+=("$p99")
  ROW_RSS+=("$rss")
  [ -n "$note" ] && NOTES+=("$(scenario_label "$scenario") / $(server_label "$server"): $note")
  return 0
}

for scenario in "${SCENARIOS[@]}"; do
  for server in "${SERVERS[@]}"; do
    bench_one "$scenario" "$server"
  done
done

# --- report --------------------------------------------------------------------------------

granian_rps() { # SCENARIO
  local i
  for i in "${!ROW_SCENARIO[@]}"; do
    if [ "${ROW_SCENARIO[$i]}" = "$1" ] && [ "${ROW_SERVER[$i]}" = granian ]; then
      echo "${ROW_RPS[$i]}"; return
    fi
  done
}

version_of() { "$VENV/bin/python" -c "from importlib.metadata import version; print(version('$1'))" 2>/dev/null || echo "?"; }

report() {
  local i rps base ratio commit
  commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  git -C "$ROOT" diff --quiet HEAD 2>/dev/null || commit="$commit (with uncommitted changes)"
  echo "# Portico benchmark"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- nproc: $cpus ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo 2>/dev/null))"
  echo "- python: $("$PY" -V 2>&1) ($PY)"
  echo "- portico: $("$PORTICO" --version 2>/dev/null | awk '{ print $2 }') at $commit;" \
    "granian $(version_of granian); gunicorn $(version_of gunicorn);" \
    "$(wrk -v 2>&1 | head -1 | awk '{ print $1, $2 }')"
  echo "- each server: one worker pinned to CPU $SERVER_CPU; load:" \
    "\`taskset -c $LOAD_CPU wrk -t1 -c$CONNECTIONS -d${DURATION}s --latency\` after an unrecorded ${WARMUP}s warm-up;" \
    "peak RSS is the server's whole process tree, sampled every 0.2 s"
  echo
  echo "| scenario | server | req/s | p99 | peak RSS MB | vs granian |"
  echo "|---|---|---:|---:|---:|---:|"
  for i in "${!ROW_SCENARIO[@]}"; do
    rps="${ROW_RPS[$i]}"
    base="$(granian_rps "${ROW_SCENARIO[$i]}")"
    ratio="n/a"
    if [[ "$rps" =~ ^[0-9]+$ && "$base" =~ ^[0-9]+$ && "$base" != 0 ]]; then
      ratio="$(awk -v a="$rps" -v b="$base" 'BEGIN { printf "%.2fx", a / b }')"
    fi
    printf '| %s | %s | %s | %s | %s | %s |\n' "$(scenario_label "${ROW_SCENARIO[$i]}")" \
      "$(server_label "${ROW_SERVER[$i]}")" "$rps" "${ROW_P99[$i]:--}" "${ROW_RSS[$i]:--}" "$ratio"
  done
  if [ ${#NOTES[@]} -gt 0 ]; then
    echo
    echo "Notes:"
    for i in "${!NOTES[@]}"; do echo "- ${NOTES[$i]}"; done
  fi
}

report >"$RESULTS/latest.md"
cat "$RESULTS/latest.md"
log "written to bench/results/latest.md; raw wrk output and server logs in bench/results/logs/"
