"""Pooled apps under nginx (issue 5): the module's master starts a `portico pool` server for
the apps with `mode = "pool"`, nginx's workers forward their requests to it, and it lives
through reloads and crashed nginx workers and goes when nginx does. A pool run on its own
(`portico pool`, as systemd would) serves nginx and `portico serve` at once.

Real nginx, the real `portico` and `portico-worker` binaries, real CPython apps in temporary
directories, real HTTP clients over loopback; every state change polled with a deadline.

    .venv/bin/python -m pytest nginx-module/tests/test_nginx_pool.py -v
"""

import http.client
import shutil
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import BINARY, fill_connection_queue, free_port, wait_until  # noqa: E402
from test_nginx_lifecycle import (MODULE, NGINX, NOBODY_UID, Load, Nginx,  # noqa: E402
                                  assert_clean_log, children, public_site, public_tmp,
                                  write_app, write_conf)

pytestmark = [
    pytest.mark.skipif(not MODULE.is_file() or not os.access(NGINX, os.X_OK)
                       or not BINARY.is_file(),
                       reason="needs the built module (scripts/nginx-module.sh), nginx and "
                              "the portico binaries"),
    pytest.mark.skipif(os.geteuid() != 0, reason="runs nginx as root, as the other nginx tests"),
]


def portico_toml(path, app_dir, **extra):
    lines = ['[server]', 'listen = ["127.0.0.1:1"]', '[[app]]', 'name = "ver"',
             'target = "ver:application"', f'python_path = ["{app_dir}"]', 'mode = "pool"']
    for key, value in {"processes": 2, "threads": 4, **extra}.items():
        lines.append(f'{key} = {json.dumps(value)}')
    path.write_text("\n".join(lines) + "\n")
    return path


def pool_conf(prefix, port, toml, workers=2, user="root", **conf):
    # Two locations pass to the one app: the status page still lists its pool once.
    write_conf(prefix, port, """
        location / { portico_pass ver; }
        location /again/ { portico_pass ver; }
        location = /pool-status { portico_status; }
""", workers=workers, user=user, **conf, in_http=f"""
    portico_config {toml};
    portico_pool_binary {BINARY};
""")


def cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def watchdog_of(server):
    """The `portico pool --watchdog` process nginx's master started."""
    found = [p for p in children(server.proc.pid) if " pool " in cmdline(p)]
    assert len(found) == 1, [(p, cmdline(p)) for p in children(server.proc.pid)]
    assert " --watchdog " in cmdline(found[0]), cmdline(found[0])
    return found[0]


def pool_server_of(server):
    """The pool server: the `portico pool` process the watchdog runs."""
    watchdog = watchdog_of(server)
    found = [p for p in children(watchdog) if " pool " in cmdline(p) and alive(p)]
    assert len(found) == 1, [(p, cmdline(p)) for p in children(watchdog)]
    return found[0]


def pool_workers(pool_pid):
    return [p for p in children(pool_pid) if "portico-worker" in cmdline(p) and alive(p)]


def served_pids(server, n=12):
    pids = set()
    for _ in range(n):
        status, body = server.get("/pid")
        assert status == 200, body
        pids.add(int(body))
    return pids


def status(server):
    got, body = server.get("/pool-status")
    assert got == 200, body
    return json.loads(body)


def portico_status(*args):
    return subprocess.run([str(BINARY), "status", *args], capture_output=True, text=True,
                          timeout=30)


def start_pooled(tmp_path, source=None, ready=b"v1", **extra):
    """nginx serving ver.py ("v1", or `source`, which answers `ready` at /) from the pool
    its master starts (two workers), ready; `extra` are more keys of the app's table.
    Returns (nginx, the pool server's pid, the app's directory, the portico.toml)."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1", source=source)
    port = free_port()
    toml = portico_toml(tmp_path / "portico.toml", app_dir, **extra)
    pool_conf(tmp_path, port, toml)
    server = Nginx(tmp_path, port)
    try:
        server.wait_serving(ready)
        pool = pool_server_of(server)
        wait_until(lambda: len(pool_workers(pool)) == 2, what="two pool workers")
    except BaseException:
        server.stop()
        raise
    return server, pool, app_dir, toml


def test_nginx_starts_the_pool_and_its_workers_serve(tmp_path):
    """nginx's master starts `portico pool`; requests are served by its workers, not by
    nginx's; `portico_status` lists them; a pool worker killed with SIGKILL is replaced."""
    server, pool, _, _ = start_pooled(tmp_path)
    try:
        workers = set(pool_workers(pool))
        assert served_pids(server) == workers, "both pool workers take requests"
        assert not workers & set(server.workers())

        [app] = status(server)
        assert app["app"] == "ver" and app["generation"] == 1
        assert app["server_pid"] == pool, "the pool server, not its watchdog or nginx"
        assert {w["pid"] for w in app["workers"]} == workers
        assert all(w["state"] == "serving" and w["rss_bytes"] > 0 for w in app["workers"])
        text = server.get("/pool-status?format=text")[1].decode()
        assert "app ver: generation 1" in text and str(min(workers)) in text
        # `portico status --nginx` finds the pool from nginx's pid file and asks it directly.
        pid_file = str(tmp_path / "logs" / "nginx.pid")
        shown = portico_status("--nginx", pid_file)
        assert shown.returncode == 0, shown.stderr
        head, *rows = shown.stdout.splitlines()
        assert head == (f"app ver: generation 1, 0 restart(s), 0 request(s) queued, "
                        f"supervised by pid {pool}"), head
        listed = {int(row.split()[0]) for row in rows if row.split()[0].isdigit()}
        assert listed == workers, shown.stdout
        shown = portico_status("--nginx", pid_file, "--json")
        [app] = json.loads(shown.stdout)
        assert app["server_pid"] == pool and {w["pid"] for w in app["workers"]} == workers
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/pool-status", body=b"x")
        answer = conn.getresponse()
        assert (answer.status, answer.getheader("Allow")) == (405, "GET, HEAD")
        conn.close()

        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()

        def whole():
            [app] = status(server)
            serving = {w["pid"] for w in app["workers"] if w["state"] == "serving"}
            return len(serving) == 2 and victim not in serving and app["restarts"] == 1 \
                and serving == set(pool_workers(pool))
        wait_until(whole, timeout=5, what="the pool to report the killed worker replaced")
        healed = time.monotonic() - killed
        assert healed < 1.0, f"the pool took {healed:.2f}s to heal"
        assert victim not in served_pids(server)
        [app] = status(server)
        assert any(f"worker {victim} was killed by signal 9" in e for e in app["events"]), app
        print(f"pool healed in {healed * 1000:.0f} ms under nginx")
    finally:
        server.stop()
    assert_clean_log(server.error_log())


@pytest.mark.parametrize("settings", ["same", "changed"])
def test_nginx_reload_under_load_loses_no_request_and_loads_the_new_code(tmp_path, settings):
    """`nginx -s reload` while six clients hammer a pooled app: no request fails, every
    client ends on the new code, and the old workers go. With the same pool settings the
    pool server (the same process) starts a new generation; with changed ones a new pool
    server takes the new nginx workers while the old one serves the old until they exit."""
    server, pool, app_dir, toml = start_pooled(tmp_path)
    load = None
    try:
        old = set(pool_workers(pool))
        old_watchdog = watchdog_of(server)

        load = Load(server.port).start()
        began = time.monotonic()
        wait_until(lambda: load.count() >= 200 and time.monotonic() - began >= 1.0,
                   timeout=10, what="a second of load")
        write_app(app_dir, "v2-reloaded")
        if settings == "changed":
            toml.write_text(toml.read_text().replace("threads = 4", "threads = 3"))
        server.signal("reload")
        wait_until(lambda: load.latest() == [b"v2-reloaded"] * len(load.threads),
                   timeout=20, what="every client to be answered by the new code")
        switched = time.monotonic()
        before = load.count()
        wait_until(lambda: load.count() >= before + 300 and time.monotonic() - switched >= 1.0,
                   timeout=10, what="a second more load after the switch")
        load.finish()

        bodies = load.assert_switched(b"v1", b"v2-reloaded", switched)

        if settings == "same":
            assert pool_server_of(server) == pool, "a reload keeps the pool server"
            wait_until(lambda: not old & set(pool_workers(pool)), timeout=15,
                       what="the old generation to go")
            assert len(pool_workers(pool)) == 2
            [app] = status(server)
            assert app["generation"] == 2
        else:
            # Its watchdog too: until then nginx's master has two.
            wait_until(lambda: not alive(pool) and not any(alive(p) for p in old)
                       and not alive(old_watchdog),
                       timeout=15, what="the old pool server and its watchdog to go")
            assert len(pool_workers(pool_server_of(server))) == 2
        print(f"reload under load ({settings} settings): {len(bodies)} requests, 0 failed")
    finally:
        if load is not None:
            load.finish()
        server.stop()
    assert_clean_log(server.error_log())


def test_touching_a_touch_reload_file_reloads_the_pool_nginx_started(tmp_path):
    """A developer who may not run `nginx -s reload` (its master is root's) deploys with
    `touch`, as with Passenger's tmp/restart.txt: the pool server nginx started loads the new
    code in a new generation, and the old workers go. nginx itself is not reloaded."""
    restart = tmp_path / "restart.txt"
    restart.touch()
    server, pool, app_dir, _ = start_pooled(tmp_path, touch_reload=[str(restart)])
    try:
        old = set(pool_workers(pool))
        nginx_workers = set(server.workers())
        write_app(app_dir, "v2-touched")
        os.utime(restart, (time.time() + 5, time.time() + 5))
        wait_until(lambda: server.get("/")[1] == b"v2-touched", timeout=15,
                   what="the new code after the touch")
        wait_until(lambda: not old & set(pool_workers(pool)), timeout=15,
                   what="the old generation to go")
        assert pool_server_of(server) == pool
        assert set(server.workers()) == nginx_workers, "nginx was not reloaded"
        [app] = status(server)
        assert app["generation"] == 2, app
        assert any(e.endswith(f"Z {restart} was touched: reloading") for e in app["events"]), \
            app["events"]
    finally:
        server.stop()
    assert f"app `ver`: {restart} was touched: reloading (touch_reload)" in server.error_log()
    assert_clean_log(server.error_log())


def test_a_reload_with_new_pool_settings_replaces_the_pool_server(tmp_path):
    """`processes` 2 -> 3 and `nginx -s reload`: a new pool server with three workers takes
    over, and the old one (with its workers and its socket directory) goes."""
    server, old, app_dir, toml = start_pooled(tmp_path)
    try:
        old_workers = pool_workers(old)
        old_watchdog = watchdog_of(server)
        toml.write_text(toml.read_text().replace("processes = 2", "processes = 3"))
        server.signal("reload")
        # Its watchdog too: until then nginx's master has two.
        wait_until(lambda: not alive(old) and not alive(old_watchdog), timeout=15,
                   what="the old pool server and its watchdog to go")
        new = pool_server_of(server)
        assert new != old
        wait_until(lambda: len(pool_workers(new)) == 3, what="three pool workers")
        assert not any(alive(p) for p in old_workers)
        assert served_pids(server, 18) == set(pool_workers(new))
        assert len([p for p in Path("/tmp").glob("portico-nginx-*")
                    if (p / "ver.sock").exists()]) >= 1
    finally:
        server.stop()
    assert_clean_log(server.error_log())


def test_the_pool_outlives_a_crashed_nginx_worker_and_goes_with_nginx(tmp_path):
    server, pool, _, _ = start_pooled(tmp_path)
    try:
        workers = set(pool_workers(pool))
        watchdog = watchdog_of(server)
        nginx_workers = [p for p in server.workers() if p != watchdog]
        os.kill(nginx_workers[0], signal.SIGKILL)
        wait_until(lambda: nginx_workers[0] not in server.workers()
                   and len([p for p in server.workers() if p != watchdog]) == 2,
                   what="nginx to replace its worker")
        for _ in range(10):
            assert server.get("/")[0:2] == (200, b"v1")
        assert pool_server_of(server) == pool and set(pool_workers(pool)) == workers, \
            "a crashed nginx worker does not touch the pool"

        sockets = [p for p in Path("/tmp").glob("portico-nginx-*") if (p / "ver.sock").exists()]
        assert sockets, "the pool's socket directory"
        server.stop()
        assert server.proc.returncode == 0
        # nginx's master waits for its pool before it exits.
        assert not alive(watchdog) and not alive(pool) and not any(alive(p) for p in workers)
        assert "stopping: no new connections" in server.error_log()
        assert not any(p.exists() for p in sockets), "the socket directory is removed"
    finally:
        server.stop()


def test_the_pool_goes_when_nginx_is_killed_outright(tmp_path):
    """SIGKILL to nginx's master and workers: no hook runs, yet the pool goes with the last
    nginx process (it watches a pipe they hold)."""
    server, pool, _, _ = start_pooled(tmp_path)
    try:
        workers = pool_workers(pool)
        watchdog = watchdog_of(server)
        nginx_workers = [p for p in server.workers() if p != watchdog]
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        assert alive(pool), "the nginx workers still hold the pool"
        for pid in nginx_workers:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not alive(watchdog) and not alive(pool)
                   and not any(alive(p) for p in workers), timeout=15,
                   what="the pool to go with the last nginx process")
        assert "the processes that started this pool are gone" in server.error_log()
    finally:
        server.stop()


def test_a_killed_pool_server_is_started_again_by_its_watchdog(tmp_path):
    """SIGKILL to the pool server (not a worker): its watchdog starts another at once, which
    starts its own workers. The watchdog kept the listening socket the first one handed it
    (FDSTORE=1) and hands it down (LISTEN_FDS), so nginx's workers are never refused: the
    requests they send meanwhile wait in the socket's queue and are served by the new one.
    Only a request the dead one had in flight gets 502 (one at most here: they are sent one
    by one). Killed again soon after, the next one comes after a pause. The watchdog and
    nginx's master are untouched, and the last pool server goes with nginx as the first
    would have."""
    server, pool, _, _ = start_pooled(tmp_path)
    try:
        watchdog = watchdog_of(server)
        old_workers = pool_workers(pool)
        log_from = len(server.error_log().encode())
        os.kill(pool, signal.SIGKILL)
        killed = time.monotonic()
        seen = []

        def served_again():
            code, body = server.get("/")
            seen.append(code)
            return (code, body) == (200, b"v1")
        wait_until(served_again, timeout=10, what="a new pool server to serve")
        healed = time.monotonic() - killed
        assert set(seen) <= {200, 502}, seen
        assert seen.count(502) <= 1, seen

        assert watchdog_of(server) == watchdog
        fresh = pool_server_of(server)
        assert fresh != pool and not alive(pool)
        wait_until(lambda: len(pool_workers(fresh)) == 2, what="the new pool's two workers")
        fresh_workers = pool_workers(fresh)
        wait_until(lambda: not any(alive(p) for p in old_workers),
                   what="the dead pool server's workers to go")
        assert served_pids(server) == set(fresh_workers)
        # The new pool's status tells what happened to the one before.
        [app] = status(server)
        assert app["server_pid"] == fresh
        assert any(e.endswith(f" pool server {pool} was killed by signal 9; pool server {fresh} "
                              "started in its place by the watchdog") for e in app["events"]), app
        log = server.error_log(log_from)
        assert f"the pool server {pool} was killed by signal 9; starting another now" in log, log
        assert f"pool server {fresh} started" in log, log
        assert "listening on the inherited socket" in log, log
        print(f"\nnginx served the pool's app again {healed * 1000:.0f} ms after its pool "
              f"server was killed ({seen.count(502)} answers of 502 meanwhile)")

        # Killed again young: the next one comes after a pause (no spawn storm), and serves.
        log_from = len(server.error_log().encode())
        os.kill(fresh, signal.SIGKILL)
        wait_until(lambda: server.get("/") == (200, b"v1"), timeout=10,
                   what="a third pool server to serve")
        log = server.error_log(log_from)
        assert f"the pool server {fresh} was killed by signal 9; starting another in 100ms" \
            in log, log
        fresh = pool_server_of(server)
        wait_until(lambda: len(pool_workers(fresh)) == 2, what="the third pool's two workers")
        fresh_workers = pool_workers(fresh)
        server.stop()
        assert server.proc.returncode == 0
        assert not alive(watchdog) and not alive(fresh)
        assert not any(alive(p) for p in fresh_workers)
    finally:
        server.stop()
    assert_clean_log(server.error_log())


BIG_APP = """
def application(environ, start_response):
    n = int(environ["QUERY_STRING"] or 0)
    if not n:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"v1"]
    # A whole response in one list item, made in memory (every page touched).
    start_response("200 OK", [("Content-Length", str(n))])
    return [b"x" * n]
"""


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_large_response_for_a_slow_client_waits_in_the_pool_worker(tmp_path):
    """One list item of 128 MiB, for a client that reads nothing: the pool worker sends it as
    the pool server takes it, and the pool server as nginx's worker does, so it waits in the
    app's process (where it was made), not in the pool server's or nginx's as well. Then the
    client gets it all."""
    size = 128 * 1024 * 1024
    server, pool, _, _ = start_pooled(tmp_path, source=BIG_APP)
    try:
        workers = pool_workers(pool)
        nginx_workers = server.workers()
        before = {p: rss_kib(p) for p in [*workers, pool, *nginx_workers]}
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
            client.sendall(f"GET /?{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            wait_until(lambda: any(rss_kib(p) - before[p] > size // 1024 for p in workers),
                       what="the app to make its body")
            # Sent unpaced, the whole body would be in both in well under this.
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                assert rss_kib(pool) - before[pool] < 32 * 1024, "in the pool server"
                for p in nginx_workers:
                    assert rss_kib(p) - before[p] < 32 * 1024, f"in nginx's worker {p}"
                time.sleep(0.05)
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(65536)
            head, rest = head.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 200"), head
            got, xs = len(rest), rest.count(b"x")
            while got < size:
                piece = client.recv(1 << 20)
                assert piece, f"the response ended after {got} bytes"
                got, xs = got + len(piece), xs + piece.count(b"x")
            assert (got, xs) == (size, size)
    finally:
        server.stop()
    assert_clean_log(server.error_log())


def start_pool_on_its_own(tmp_path, toml, sock):
    """`portico pool --config TOML`, as systemd runs it; returns once `sock` is there."""
    log = open(tmp_path / "pool.log", "wb")
    pool = subprocess.Popen([str(BINARY), "pool", "--config", str(toml)], stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: sock.exists() or pool.poll() is not None, timeout=30,
                   what="the pool's socket")
        assert pool.poll() is None, (tmp_path / "pool.log").read_text()
    except BaseException:
        stop_pool(pool)
        raise
    return pool


def stop_pool(pool):
    """SIGTERM, as systemd stops it; fails if it lingers (then killed)."""
    pool.send_signal(signal.SIGCONT)
    pool.terminate()
    try:
        pool.wait(30)
    except subprocess.TimeoutExpired:
        pool.kill()
        raise


def test_a_pool_on_its_own_serves_nginx_and_portico_serve(tmp_path):
    """`portico pool --config FILE` (as under systemd) with `pool_socket`: nginx and
    `portico serve` both connect to it and are served by the same workers; SIGHUP reloads it,
    and `portico status` reads it from its socket."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    sock = tmp_path / "ver.sock"
    serve_port = free_port()
    toml = portico_toml(tmp_path / "portico.toml", app_dir, pool_socket=str(sock))
    toml.write_text(toml.read_text().replace('"127.0.0.1:1"', f'"127.0.0.1:{serve_port}"'))
    pool = start_pool_on_its_own(tmp_path, toml, sock)
    serve = nginx = None
    try:
        workers = set(pool_workers(pool.pid))
        assert len(workers) == 2

        port = free_port()
        (tmp_path / "nginx").mkdir()
        pool_conf(tmp_path / "nginx", port, toml)
        nginx = Nginx(tmp_path / "nginx", port)
        nginx.wait_serving(b"v1")
        assert not [p for p in nginx.workers() if " pool " in cmdline(p)], \
            "nginx starts no pool of its own for an app with pool_socket"
        serve = subprocess.Popen([str(BINARY), "serve", "--config", str(toml)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        serve_client = Nginx.__new__(Nginx)
        serve_client.port = serve_port

        def serve_ok():
            try:
                return serve_client.get("/", timeout=2) == (200, b"v1")
            except OSError:
                return False
        wait_until(serve_ok, timeout=20, what="portico serve to answer")

        assert served_pids(nginx) == workers
        assert served_pids(serve_client) == workers

        done = subprocess.run([str(BINARY), "status", "--config", str(toml), "--json"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        [app] = json.loads(done.stdout)
        assert {w["pid"] for w in app["workers"]} == workers
        assert sum(w["served"] for w in app["workers"]) >= 24
        assert app["server_pid"] == pool.pid

        write_app(app_dir, "v2-reloaded")
        pool.send_signal(signal.SIGHUP)
        wait_until(lambda: nginx.get("/") == (200, b"v2-reloaded")
                   and serve_client.get("/") == (200, b"v2-reloaded"),
                   timeout=20, what="both hosts to get the new code")
        wait_until(lambda: not workers & set(pool_workers(pool.pid)), timeout=15,
                   what="the old generation to go")
    finally:
        # Each stops whatever happened to the others.
        if serve is not None:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(15)
            except subprocess.TimeoutExpired:
                serve.kill()
        if nginx is not None:
            nginx.stop()
        stop_pool(pool)
    assert not sock.exists(), "the pool removes its socket when it stops"


def test_a_pool_server_that_accepts_nothing_does_not_hold_the_nginx_worker(tmp_path):
    """A pool on its own that takes no connection (stopped, its queue of pending connections
    full): nginx's worker does not wait for it in connect. Requests to the app get 502 at
    once, with the reason in the error log, and the worker's other locations are served
    meanwhile; once the pool accepts again, nginx is served by it."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    sock = tmp_path / "ver.sock"
    toml = portico_toml(tmp_path / "portico.toml", app_dir, pool_socket=str(sock))
    pool = start_pool_on_its_own(tmp_path, toml, sock)
    nginx = None
    queued = []
    try:
        port = free_port()
        (tmp_path / "nginx").mkdir()
        write_conf(tmp_path / "nginx", port, """
        location / { portico_pass ver; }
        location = /plain { return 200 "plain nginx"; }
""", workers=1, in_http=f"""
    portico_config {toml};
    portico_pool_binary {BINARY};
""")
        nginx = Nginx(tmp_path / "nginx", port)
        nginx.wait_serving(b"plain nginx", path="/plain")

        pool.send_signal(signal.SIGSTOP)
        queued = fill_connection_queue(sock)
        # The worker connects on its first request to the app, which is now.
        assert nginx.get("/", timeout=10)[0] == 502
        assert "its queue of connections is full" in nginx.error_log()
        assert nginx.get("/plain", timeout=10) == (200, b"plain nginx")

        pool.send_signal(signal.SIGCONT)
        for s in queued:
            s.close()
        nginx.wait_serving(b"v1")
    finally:
        for s in queued:
            s.close()
        if nginx is not None:
            nginx.stop()
        stop_pool(pool)


def test_with_nginx_as_nobody_the_pool_workers_run_as_nobody(public_tmp):
    """`user nobody nogroup;`: the pool server (root, as the master) gives its sockets to
    nobody, mode 0600, in a directory only root may list, and runs the app's workers as
    nobody, as mod_wsgi's daemon processes run as Apache's user."""
    wrapper, app_dir, prefix, port = public_site(public_tmp)
    toml = portico_toml(public_tmp / "portico.toml", app_dir)
    pool_conf(prefix, port, toml, user="nobody nogroup")
    server = Nginx(prefix, port, wrapper)
    try:
        server.wait_serving(b"v1")
        code, body = server.get("/whoami")
        assert code == 200, body
        assert json.loads(body) == {"version": "v1", "uid": NOBODY_UID, "gid": NOBODY_UID}
        pool = pool_server_of(server)
        assert Path(f"/proc/{pool}/status").read_text().count("Uid:\t0\t") == 1
        [sock] = [p / "ver.sock" for p in Path("/tmp").glob("portico-nginx-*")
                  if f"--socket-dir {p} " in cmdline(pool)]
        info = sock.stat()
        assert (info.st_uid, info.st_mode & 0o777) == (NOBODY_UID, 0o600)
        assert sock.parent.stat().st_mode & 0o777 == 0o711
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert_clean_log(server.error_log())


ENV_APP = """
import os, sys

print("printed by the app at import")


def application(environ, start_response):
    if environ["PATH_INFO"] == "/raise":
        raise RuntimeError("raised in a pooled app")
    if environ["PATH_INFO"] == "/print":
        print("printed by a request")
        sys.stdout.flush()
        body = b"printed"
    else:
        body = os.environ.get(environ["QUERY_STRING"], "(unset)").encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""


def test_a_daemonized_nginx_leaves_its_pool_nothing_of_the_shell_it_was_started_from(
        tmp_path):
    """As nginx's own workers: the pool has a session of its own (a Ctrl-C or `timeout`
    aimed at the starter's process group does not stop it), keeps none of the starter's
    descriptors (`nginx | cat` returns once nginx daemonizes), sends what apps print to the
    error log (a closed pipe cannot fail a request), and gets nginx's workers' environment:
    `env` directives reach a pooled app, the starter's other variables do not."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "", source=ENV_APP)
    port = free_port()
    toml = portico_toml(tmp_path / "portico.toml", app_dir)
    pool_conf(tmp_path, port, toml, daemon=True, before_http="env APP_GREETING=bonjour;")
    starter = subprocess.Popen(
        [NGINX, "-p", str(tmp_path), "-c", "nginx.conf"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "PORTICO_TEST_FROM_THE_SHELL": "leaked"})
    pid_file = tmp_path / "logs" / "nginx.pid"

    def get(path):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        except OSError:
            return None
        finally:
            conn.close()
    try:
        # Both pipes end once the last process holding them (nginx or its pool) lets go.
        out, err = starter.communicate(timeout=30)
        assert starter.returncode == 0, err
        master = int(pid_file.read_text())
        wait_until(lambda: get("/?APP_GREETING") == (200, b"bonjour"), timeout=30,
                   what="the pooled app, with nginx's env")
        assert get("/?PORTICO_TEST_FROM_THE_SHELL") == (200, b"(unset)")
        assert get("/print") == (200, b"printed")
        log = tmp_path / "logs" / "error.log"
        wait_until(lambda: "printed by a request" in log.read_text(), what="the print in the log")
        assert "printed by the app at import" in log.read_text()
        [watchdog] = [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                      if f"--config {toml} " in cmdline(p) and " --watchdog " in cmdline(p)]
        assert os.getsid(watchdog) == watchdog
        assert os.getsid(watchdog) != os.getsid(master)
    finally:
        if starter.poll() is None:
            os.killpg(starter.pid, signal.SIGKILL)
        if pid_file.exists():
            master = int(pid_file.read_text())
            os.kill(master, signal.SIGQUIT)
            wait_until(lambda: not alive(master), what="nginx to stop")
    wait_until(lambda: not any(f"--config {toml} " in cmdline(p)
                               for p in map(int, filter(str.isdigit, os.listdir("/proc")))),
               what="the pool to go with nginx")


def test_the_pool_follows_its_error_log_through_nginx_s_reopen(tmp_path):
    """logrotate renames error.log and runs `nginx -s reopen`: the pool's server and its
    workers then write to the new file, as nginx's own processes do, and not on into the
    renamed one until the next restart."""
    server, pool, _, _ = start_pooled(tmp_path, source=ENV_APP, ready=b"(unset)")
    try:
        log = tmp_path / "logs" / "error.log"
        log.rename(tmp_path / "logs" / "error.log.1")
        os.kill(server.proc.pid, signal.SIGUSR1)
        wait_until(log.exists, what="nginx to reopen its error log")

        def traceback_in_the_new_log():
            assert server.get("/raise")[0] == 500
            return "RuntimeError: raised in a pooled app" in log.read_text()
        wait_until(traceback_in_the_new_log, timeout=10, interval=0.2,
                   what="a worker's traceback in the new error.log")
        victim = min(pool_workers(pool))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: f"worker {victim} was killed by signal 9" in log.read_text(),
                   what="the pool server's line about it in the new error.log")
    finally:
        server.stop()


def test_nginx_t_says_when_the_pool_program_cannot_be_found(tmp_path):
    """No `portico_pool_binary` and no `portico` on PATH: `nginx -t` fails and says what to
    set, instead of a start that fails later."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    toml = portico_toml(tmp_path / "portico.toml", app_dir)
    write_conf(tmp_path, free_port(), "        location / { portico_pass ver; }\n",
               in_http=f"    portico_config {toml};\n")
    done = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", "nginx.conf"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert done.returncode != 0, done.stderr
    assert "the pooled apps need the `portico` program" in done.stderr, done.stderr
    assert "portico_pool_binary" in done.stderr


def test_nginx_t_says_when_portico_worker_or_tmpdir_is_missing(tmp_path):
    """A `portico` copied alone (without `portico-worker` beside it), or a TMPDIR that is not
    there, would only fail once nginx starts its pool: `nginx -t` says so first."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    toml = portico_toml(tmp_path / "portico.toml", app_dir)
    alone = tmp_path / "bin"
    alone.mkdir()
    shutil.copy(BINARY, alone / "portico")
    write_conf(tmp_path, free_port(), "        location / { portico_pass ver; }\n",
               in_http=f"    portico_config {toml};\n    portico_pool_binary {alone / 'portico'};\n")
    done = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", "nginx.conf"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stderr
    assert (f"the pooled apps need `portico-worker` beside \"{alone / 'portico'}\", and there "
            f"is none at \"{alone / 'portico-worker'}\"") in done.stderr, done.stderr
    write_conf(tmp_path, free_port(), "        location / { portico_pass ver; }\n",
               in_http=f"    portico_config {toml};\n    portico_pool_binary {BINARY};\n")
    done = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", "nginx.conf"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TMPDIR": str(tmp_path / "no-such-dir")})
    assert done.returncode != 0, done.stderr
    assert (f"the pool's sockets go in a directory made in {tmp_path / 'no-such-dir'} (TMPDIR)"
            in done.stderr), done.stderr


def nginx_with_apps_one_and_two(tmp_path, toml):
    """nginx passing / to the app `one` of `toml` and /two/ to `two`."""
    port = free_port()
    write_conf(tmp_path, port, """
        location / { portico_pass one; }
        location /two/ { portico_pass two; }
""", in_http=f"    portico_config {toml};\n    portico_pool_binary {BINARY};\n")
    return Nginx(tmp_path, port)


def test_apps_of_a_portico_toml_need_no_mount_of_their_own_under_nginx(tmp_path):
    """nginx's locations route (`portico_pass` mounts an app at its location), so the apps of
    a portico.toml written for nginx may all leave `mount` at its default, `/`: neither
    nginx nor the pool it starts holds that against them."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    toml = tmp_path / "portico.toml"
    toml.write_text("".join(
        f'[[app]]\nname = "{name}"\ntarget = "ver:application"\npython_path = ["{app_dir}"]\n'
        'mode = "pool"\nprocesses = 1\n' for name in ("one", "two")))
    server = nginx_with_apps_one_and_two(tmp_path, toml)
    try:
        server.wait_serving(b"v1")
        assert server.get("/two/")[0:2] == (200, b"v1")
    finally:
        server.stop()
    assert server.proc.returncode == 0


@pytest.mark.parametrize("level,logged", [("error", True), ("crit", False)])
def test_tracebacks_follow_the_error_log_level(tmp_path, level, logged):
    """An app's traceback is an `error`: written with `error_log ... error`, left out with
    `crit`, as nginx's own [error] lines are, for an in-process app and a pooled one alike.
    (Each is written before the 500 goes out, so the log is read right after it.)"""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "", source=ENV_APP)
    toml = portico_toml(tmp_path / "portico.toml", app_dir)
    port = free_port()
    write_conf(tmp_path, port, f"""
        location / {{ portico_pass ver; }}
        location /in/ {{ portico_app ver python_path={app_dir} threads=2; }}
""", in_http=f"    portico_config {toml};\n    portico_pool_binary {BINARY};\n",
               log_level=level)
    server = Nginx(tmp_path, port)
    try:
        server.wait_serving(b"(unset)")
        for path in ("/raise", "/in/raise"):
            assert server.get(path)[0] == 500
            found = server.error_log().count("RuntimeError: raised in a pooled app")
            assert found == (1 if logged else 0), (path, server.error_log())
            (tmp_path / "logs" / "error.log").write_text("")
    finally:
        server.stop()


PREFIX_APP = """
import sys


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [sys.prefix.encode()]
"""


def test_each_pooled_app_may_have_a_virtualenv_of_its_own(tmp_path):
    """A pool's workers have an interpreter of their own, so two pooled apps of one nginx
    may each name their own `python_home` (one virtualenv per app, as with Passenger, uWSGI
    or mod_wsgi's daemons); only in-process apps must share one."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "prefix.py").write_text(PREFIX_APP)
    venvs = {name: tmp_path / f"venv-{name}" for name in ("one", "two")}
    for venv in venvs.values():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                       timeout=60)
    toml = tmp_path / "portico.toml"
    toml.write_text("".join(
        f'[[app]]\nname = "{name}"\ntarget = "prefix:application"\n'
        f'python_path = ["{app_dir}"]\nmode = "pool"\nprocesses = 1\n'
        f'python_home = "{venv}"\n' for name, venv in venvs.items()))
    server = nginx_with_apps_one_and_two(tmp_path, toml)
    try:
        server.wait_serving(str(venvs["one"]).encode())
        assert server.get("/two/")[0:2] == (200, str(venvs["two"]).encode())
    finally:
        server.stop()


def test_nginx_t_checks_a_pooled_app_as_the_user_its_workers_run_as(tmp_path):
    """The import check of a pooled app runs as the app's `user`, as its workers will: code
    only root can read fails `nginx -t` (with nginx itself running as root), naming that
    user, instead of a start that fails later with a bare ModuleNotFoundError."""
    app_dir = tmp_path / "private"
    app_dir.mkdir(mode=0o700)
    write_app(app_dir, "v1")
    toml = portico_toml(tmp_path / "portico.toml", app_dir, user="nobody")
    write_conf(tmp_path, free_port(), "        location / { portico_pass ver; }\n",
               in_http=f"    portico_config {toml};\n    portico_pool_binary {BINARY};\n")
    done = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", "nginx.conf"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0, done.stderr
    assert f"as the workers' user nobody (uid {NOBODY_UID}, the app's `user`)" in done.stderr, \
        done.stderr


QUEUE_APP = """
import os, time

HERE = os.path.dirname(os.path.abspath(__file__))


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/hold":
        # Runs until the test writes `release`.
        open(os.path.join(HERE, "started"), "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(HERE, "release")) and time.monotonic() < deadline:
            time.sleep(0.01)
    elif path == "/quick":
        time.sleep(0.1)
    body = b"v1" if path == "/" else str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""


def test_a_request_waits_in_the_pool_for_the_first_free_worker(tmp_path):
    """Under nginx too, a request that finds every worker thread busy waits in the pool
    server's one queue for the first thread to come free: with one worker held by a slow
    request, concurrent quick ones are all served by the other, none behind the slow one."""
    server, pool, app_dir, _ = start_pooled(tmp_path, source=QUEUE_APP, threads=1)
    held = {}
    holder = threading.Thread(target=lambda: held.setdefault("r", server.get("/hold", timeout=30)))
    results = []
    quick = [threading.Thread(target=lambda: results.append(server.get("/quick")))
             for _ in range(6)]
    try:
        holder.start()
        wait_until((app_dir / "started").exists, what="the slow request")
        for t in quick:
            t.start()
        deadline = time.monotonic() + 15
        for t in quick:
            t.join(max(0.0, deadline - time.monotonic()))
        assert [r[0] for r in results] == [200] * 6, \
            f"{len(results)} of 6 quick requests served beside the slow one"
        assert len({r[1] for r in results}) == 1 and "r" not in held
    finally:
        (app_dir / "release").touch()
        holder.join(30)
        for t in quick:
            t.join(30)
        server.stop()
    assert held["r"][0] == 200


def test_a_request_its_client_left_keeps_its_thread_until_the_app_lets_go(tmp_path):
    """A client that leaves (nginx sees it at once) does not free the thread that runs its
    request: WSGI cannot stop the app. The pool counts it until the worker says the app let
    go, so the next requests go to the other worker rather than wait behind it."""
    server, pool, app_dir, _ = start_pooled(tmp_path, source=QUEUE_APP, threads=1)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until((app_dir / "started").exists, what="the slow request")
            # Closed with a reset: nginx sees the client gone at once.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_until(lambda: all(w["in_flight"] == 0 for w in status(server)[0]["workers"]),
                   what="the pool to give the request up")
        served = [server.get("/pid", timeout=5) for _ in range(6)]
        assert [r[0] for r in served] == [200] * 6
        assert len({r[1] for r in served}) == 1, "a request went to the worker still held"
    finally:
        (app_dir / "release").touch()
        server.stop()


def test_a_stuck_worker_is_replaced_though_its_client_gave_up(tmp_path):
    """A client that leaves before `request_timeout` (a health check, a load balancer with a
    shorter timeout) does not save a stuck worker: its thread is still in the app, so the
    worker is replaced, as uWSGI's harakiri would. Else the pool, seeing nothing in flight
    there, goes on giving it requests that hang."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    port = free_port()
    pool_conf(tmp_path, port, portico_toml(tmp_path / "portico.toml", app_dir,
                                            request_timeout="1s"))
    server = Nginx(tmp_path, port)
    try:
        server.wait_serving(b"v1")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /slow/stuck HTTP/1.1\r\nHost: x\r\n\r\n")
            wait_until((app_dir / "started-stuck").exists, what="the request to reach the app")
            # Closed with a reset: nginx sees the client gone at once.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_until(lambda: "replaced (a request ran past request_timeout (1s) and its thread is "
                           "still in the app)" in server.error_log(), timeout=15,
                   what="the stuck worker replaced")
    finally:
        server.stop()
