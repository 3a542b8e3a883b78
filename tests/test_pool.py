"""Pooled apps (`mode = "pool"`): the app runs in `portico-worker` processes that the server
starts and supervises, through the same core as in-process hosting. The faults a pool exists
for are shown with real processes: a worker killed with SIGKILL under load, a worker that dies
mid-request, an app that cannot be imported."""

import json
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import (APPS, BINARY, VENV, Server, app_table, asgi_table, fill_connection_queue,
                      embedded_libpython, free_port, needs, public_tmp, python_view,  # noqa: F401
                      readable_by_nobody,
                      status_kib, wait_until)

pytestmark = needs("binary")


def pool_app(name="pool", target="pool_app:application", processes=2, **extra):
    return app_table(name, target, mode="pool", processes=processes, **extra)


def child_pids(pid):
    """The children of a process, started from any of its threads, oldest first."""
    pids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            path = f"/proc/{pid}/task/{task}/children"
            if os.path.exists(path):
                pids += [int(p) for p in open(path).read().split()]
    except FileNotFoundError:
        pass
    return sorted(set(pids))


def worker_pids(server):
    """The pool workers the server started (its children running portico-worker)."""
    return [p for p in child_pids(server.proc.pid)
            if os.path.exists(f"/proc/{p}/cmdline")
            and b"portico-worker" in open(f"/proc/{p}/cmdline", "rb").read()]


class pool_proc:
    """A `portico pool` process, where `worker_pids` looks for workers."""

    def __init__(self, proc):
        self.proc = proc


def test_requests_are_served_by_the_worker_processes(portico):
    server = portico(pool_app())
    wait_until(lambda: len(worker_pids(server)) == 2, what="two pool workers")
    pids = {int(server.get("/pid")[2]) for _ in range(8)}
    assert pids == set(worker_pids(server)), "idle workers share the requests"
    assert server.proc.pid not in pids
    status, headers, body = server.get("/hello")
    assert (status, body) == (200, b"Hello from a pool worker")
    assert int(headers["X-Pid"]) in pids


def test_bodies_stream_both_ways_through_the_pool(portico):
    server = portico(pool_app())
    payload = os.urandom(5 * 1024 * 1024)
    status, _, body = server.request("POST", "/echo", body=payload)
    assert status == 200 and body == payload
    status, headers, body = server.get("/stream")
    assert status == 200 and body == b"piece 0;piece 1;piece 2;"
    assert headers["Transfer-Encoding"] == "chunked"


def read_chars(pid):
    """Bytes the process has read with read(2) and its kind (`rchar` in /proc/PID/io)."""
    for line in open(f"/proc/{pid}/io"):
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{pid}/io")


def test_a_file_response_is_read_as_the_client_takes_it(portico, tmp_path):
    """A file the app answers with (`wsgi.file_wrapper`) is read a piece at a time as the
    host's window opens, as an in-process host streams it: for a client that reads nothing,
    neither the worker nor the host holds the file in memory. Then the client gets it all."""
    size = 128 * 1024 * 1024
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(size)  # sparse: read at memory speed
    server = portico(app_table("m", "misbehaving:application", mode="pool", processes=1))
    [worker] = worker_pids(server)
    host_rss, worker_read = status_kib(server.proc.pid), read_chars(worker)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        client.sendall(f"GET /file?{big} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_until(lambda: read_chars(worker) - worker_read > 1024 * 1024,
                   what="the worker to start reading the file")
        # Read whole, the file would be in the worker's queue and the host's in well under
        # this; paced, the worker stops at the window plus what the sockets buffer.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert read_chars(worker) - worker_read < 32 * 1024 * 1024
            assert status_kib(server.proc.pid) - host_rss < 32 * 1024
            time.sleep(0.05)
        got, head = 0, b""
        while b"\r\n\r\n" not in head:
            head += client.recv(65536)
        head, rest = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        got = len(rest)
        while got < size - 10:
            piece = client.recv(1 << 20)
            assert piece, f"the response ended after {got} bytes"
            got += len(piece)
        assert got == size - 10  # the app seeks to offset 10


def read_response(client, size):
    """Reads a response with a body of `size` bytes from `client`: its head and its body."""
    head = b""
    while b"\r\n\r\n" not in head:
        piece = client.recv(65536)
        assert piece, f"the connection ended in the head: {head!r}"
        head += piece
    head, body = head.split(b"\r\n\r\n", 1)
    body = bytearray(body)
    while len(body) < size:
        piece = client.recv(1 << 20)
        assert piece, f"the response ended after {len(body)} bytes"
        body += piece
    return head, bytes(body)


def test_a_body_piece_larger_than_the_window_waits_in_the_worker(portico):
    """One list item of 128 MiB, for a client that reads nothing: the worker sends it as the
    host's window opens, so it waits in the app's process (where it was made), not in the
    server's as well. Then the client gets it all."""
    size = 128 * 1024 * 1024
    server = portico(app_table("m", "misbehaving:application", mode="pool", processes=1))
    [worker] = worker_pids(server)
    host_rss, worker_rss = status_kib(server.proc.pid), status_kib(worker)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
        client.sendall(f"GET /one-big-item?{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        wait_until(lambda: status_kib(worker) - worker_rss > size // 1024,
                   what="the app to make its body")
        # Sent unpaced, the whole body would be in the host in well under this.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert status_kib(server.proc.pid) - host_rss < 32 * 1024
            time.sleep(0.05)
        head, body = read_response(client, size)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert body == b"x" * size


def test_an_asgi_app_in_a_pool(portico):
    server = portico(asgi_table("asgi", "asgi_probe:app", mode="pool", processes=1))
    status, _, body = server.request("POST", "/echo", body=b"x" * 200_000)
    assert status == 200 and body == b"x" * 200_000
    size = 3 * 1024 * 1024
    status, _, body = server.get(f"/big?n={size}")
    assert status == 200 and len(body) == size and body[-1] == size % 251


def test_an_exception_is_a_500_with_its_traceback_and_the_worker_lives(portico):
    server = portico(pool_app(processes=1))
    pid = server.get("/pid")[2]
    assert server.get("/raise")[0] == 500
    server.wait_for_log("raised on purpose in a pool worker")
    assert server.get("/pid")[2] == pid
    # The traceback's first line names the worker it came from, as gunicorn's lines do.
    assert re.search(rf"ERROR worker {pid.decode()}\] .*/raise", server.log()), server.log()


def test_a_worker_killed_under_load_costs_only_its_own_requests(portico):
    server = portico(pool_app(processes=2, threads=4))
    wait_until(lambda: len(worker_pids(server)) == 2, what="two pool workers")
    victim = worker_pids(server)[0]
    # Four slow requests in flight: the least busy worker takes each, so both have some.
    slow = []

    def hold():
        try:
            status, headers, _ = server.get("/slow?3", timeout=15)
            slow.append((status, headers.get("X-Pid")))
        except OSError as e:
            slow.append((repr(e), None))
    holders = [threading.Thread(target=hold) for _ in range(4)]
    for t in holders:
        t.start()

    results, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                status = server.get("/hello", timeout=10)[0]
            except OSError as e:
                status = repr(e)
            results.append((time.monotonic(), status))
    loaders = [threading.Thread(target=load) for _ in range(4)]
    for t in loaders:
        t.start()
    wait_until(lambda: len(results) > 50, what="load to flow")
    os.kill(victim, 9)
    killed_at = time.monotonic()
    wait_until(lambda: len(worker_pids(server)) == 2 and victim not in worker_pids(server),
               timeout=5, what="the pool to start a new worker")
    heal_time = time.monotonic() - killed_at
    # Load goes on against the healed pool for a moment.
    count = len(results)
    wait_until(lambda: len(results) > count + 100, what="load after the heal")
    stop.set()
    for t in loaders + holders:
        t.join()
    # The victim's slow requests failed with 502 (it had at least one: a worker with none in
    # flight is the least busy); the survivor's were answered.
    assert all(s in (200, 502) for s, _ in slow) and 502 in [s for s, _ in slow], slow
    assert all(int(pid) != victim for s, pid in slow if s == 200), slow
    failed = [(t, s) for t, s in results if s != 200]
    # Of the load, only requests the victim had in flight may fail, and they fail with 502.
    assert all(s == 502 for _, s in failed), failed
    assert len(failed) <= 4, failed
    assert heal_time < 1.0, f"the pool took {heal_time:.2f}s to heal"
    print(f"kill -9 under load: {len(results)} requests, {len(failed)} failed, "
          f"healed in {heal_time * 1000:.0f} ms")
    server.wait_for_log(f"pool worker {victim} was killed by signal 9")


def test_with_one_worker_requests_during_its_restart_wait_for_the_next(portico):
    """processes = 1: kill -9 of the only worker costs the requests it had in flight; those
    that come while its successor starts wait for it, as a daemon's listen queue holds them
    for mod_wsgi and gunicorn, instead of getting 503."""
    server = portico(pool_app(processes=1, threads=4))
    victim = int(server.get("/pid")[2])
    results, stop = [], threading.Event()

    def load():
        while not stop.is_set():
            try:
                status, _, body = server.get("/pid", timeout=15)
            except OSError as e:
                status, body = repr(e), b""
            results.append((status, body))
    loaders = [threading.Thread(target=load) for _ in range(2)]
    for t in loaders:
        t.start()
    try:
        wait_until(lambda: len(results) > 20, what="load to flow")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: any(s == 200 and int(b) != victim for s, b in results[-10:]),
                   timeout=10, what="the successor to answer")
        answered = time.monotonic() - killed_at
        count = len(results)
        wait_until(lambda: len(results) > count + 20, what="load after the restart")
    finally:
        stop.set()
        for t in loaders:
            t.join(20)
    failed = [r for r in results if r[0] != 200]
    # Each of the two clients had at most one request on the victim when it died.
    assert len(failed) <= 2 and all(s == 502 for s, _ in failed), failed
    print(f"processes = 1, kill -9: {len(results)} requests, {len(failed)} failed, the "
          f"successor answered after {answered * 1000:.0f} ms")


def test_with_no_worker_able_to_start_requests_get_503_at_once(portico, tmp_path):
    """The only worker dies and its successor cannot import the app (the code on disk broke
    meanwhile): requests do not wait out the backoff between tries, they get 503 at once,
    and the pool serves again once the code is mended."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v1"))
    server = portico(app_table("v", "versioned:application", mode="pool", processes=1)
                     .replace('python_path = ["', f'python_path = ["{code}", "', 1))
    [worker] = worker_pids(server)
    (code / "versioned.py").write_text("this is not python\n")
    os.kill(worker, signal.SIGKILL)
    server.wait_for_log("a pool worker could not start", timeout=15)
    for _ in range(5):
        began = time.monotonic()
        status, headers, _ = server.get("/", timeout=15)
        assert (status, headers.get("Retry-After")) == (503, "1")
        assert time.monotonic() - began < 1.0
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v2"))
    wait_until(lambda: server.get("/")[2] == b"v2", timeout=40, interval=0.2,
               what="the pool to serve the mended code")


def test_a_worker_dying_mid_request_is_a_502_and_the_pool_heals(portico):
    server = portico(pool_app(processes=1))
    first = int(server.get("/pid")[2])
    assert server.get("/crash")[0] == 502
    server.wait_for_log(f"pool worker {first} exited with code 13")
    wait_until(lambda: server.get("/pid")[0] == 200, timeout=5, what="a new worker")
    assert int(server.get("/pid")[2]) != first


def test_an_app_that_cannot_import_stops_the_start_with_its_error(portico, tmp_path):
    server = portico(pool_app(target="no_such_module_here:app", processes=3), wait=False)
    assert server.proc.wait(30) == 70
    log = server.log()
    assert "No module named 'no_such_module_here'" in log
    # One attempt per worker, not a storm of them.
    assert log.count("a pool worker could not start") == 3, log
    # Its exit is told, not a timeout it never had.
    told = "could not start: the worker exited with code 70 before it was ready"
    assert log.count(told) == 3, log
    assert "not ready in time" not in log


VERSIONED_APP = '''
import time
VERSION = "{version}"

def application(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(2)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [VERSION.encode()]
'''


@pytest.mark.parametrize("how", ["portico reload", "SIGHUP"])
def test_reload_under_load_fails_no_request(portico, tmp_path, how):
    code = tmp_path / "code"
    code.mkdir()
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v1"))
    pid_file = tmp_path / "portico.pid"
    server = portico(app_table("v", "versioned:application", mode="pool", processes=2,
                               graceful_timeout="10s")
                     .replace('python_path = ["', f'python_path = ["{code}", "', 1),
                     server_extra=f'pid_file = "{pid_file}"')
    assert server.get("/")[2] == b"v1"
    old_workers = set(worker_pids(server))
    # A request in flight on the old code across the reload.
    slow = {}
    holder = threading.Thread(target=lambda: slow.setdefault("r", server.get("/slow", timeout=15)))
    holder.start()

    results, stop = [], threading.Event()
    seen = {n: [] for n in range(4)}

    def load(n):
        while not stop.is_set():
            try:
                status, _, body = server.get("/", timeout=10)
            except OSError as e:
                status, body = repr(e), b""
            results.append((status, body))
            seen[n].append(body)
    loaders = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in loaders:
        t.start()
    wait_until(lambda: len(results) > 50, what="load to flow")
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v2"))
    if how == "SIGHUP":
        os.kill(server.proc.pid, 1)
    else:
        done = subprocess.run([str(BINARY), "reload", "--config", str(server_config(server))],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
    wait_until(lambda: results and results[-1][1] == b"v2", timeout=15, what="the new code")
    count = len(results)
    wait_until(lambda: len(results) > count + 100, what="load on the new generation")
    stop.set()
    for t in loaders:
        t.join()
    holder.join()
    failed = [r for r in results if r[0] != 200]
    assert failed == [], failed[:5]
    assert {b for _, b in results} == {b"v1", b"v2"}
    # Each client, once it got the new code, never got the old again.
    for bodies in seen.values():
        first_v2 = bodies.index(b"v2")
        assert set(bodies[first_v2:]) == {b"v2"}, bodies[first_v2:][:10]
    # The request that was in flight finished on the old code.
    assert slow["r"][0] == 200 and slow["r"][2] == b"v1"
    wait_until(lambda: not (set(worker_pids(server)) & old_workers), timeout=15,
               what="the old generation to exit")
    server.wait_for_log("generation 2 serves")


def server_config(server):
    """The portico.toml a `portico` fixture server runs."""
    return next(Path(server.out_path).parent.glob(f"portico-{server.port}.toml"))


def test_a_reload_to_code_that_cannot_import_keeps_the_old_workers(portico, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v1"))
    server = portico(app_table("v", "versioned:application", mode="pool", processes=1)
                     .replace('python_path = ["', f'python_path = ["{code}", "', 1),
                     server_extra='status_path = "/_portico/status"')
    (code / "versioned.py").write_text("this is not python\n")
    os.kill(server.proc.pid, 1)
    server.wait_for_log("generation 1 goes on serving", timeout=15)
    assert server.get("/")[2] == b"v1"
    # The status says so too, with when.
    [pool] = json.loads(server.get("/_portico/status")[2])
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ reload: generation 2 could "
                            r"not load the app; generation 1 serves on", e)
               for e in pool["events"]), pool["events"]


def test_touching_a_touch_reload_file_loads_the_new_code(portico, tmp_path):
    """As Passenger's tmp/restart.txt and mod_wsgi's touched WSGI script: someone who cannot
    signal the server deploys by touching a file the app lists in touch_reload (relative to
    the config file; its creation counts). The new generation runs the new code and the old
    worker goes; a touch while the code cannot import leaves the old generation serving."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v1"))
    server = portico(app_table("v", "versioned:application", mode="pool", processes=1,
                               touch_reload=["tmp/restart.txt"])
                     .replace('python_path = ["', f'python_path = ["{code}", "', 1),
                     server_extra='status_path = "/_portico/status"')
    restart = tmp_path / "tmp" / "restart.txt"
    assert server.get("/")[2] == b"v1"
    [first] = worker_pids(server)
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v2-touched"))
    restart.parent.mkdir()
    restart.touch()
    wait_until(lambda: server.get("/")[2] == b"v2-touched", timeout=15,
               what="the new code after the touch")
    server.wait_for_log(f"app `v`: {restart} was touched: reloading (touch_reload)")
    wait_until(lambda: first not in worker_pids(server), timeout=15,
               what="the old worker to go")
    [pool] = json.loads(server.get("/_portico/status")[2])
    assert pool["generation"] == 2, pool
    assert any(e.endswith(f"Z {restart} was touched: reloading") for e in pool["events"]), \
        pool["events"]

    (code / "versioned.py").write_text("this is not python\n")
    os.utime(restart, (time.time() + 5, time.time() + 5))
    server.wait_for_log("generation 2 goes on serving", timeout=15)
    assert server.get("/")[2] == b"v2-touched"
    assert server.log().count("was touched: reloading") == 2, server.log()


def test_a_reload_applies_new_pool_settings_and_names_those_left_for_a_restart(portico):
    """As gunicorn's HUP and nginx's reload: the new generation runs the file's new settings.
    What the server itself acts on for the app (here max_body_size) needs a restart: then the
    app keeps all its settings, and the log says which changed. A file that has become
    invalid refuses the reload with its errors, and the workers serve on."""
    server = portico(pool_app(processes=1))
    assert server.get("/env?RELOADED")[2] == b""
    config = server_config(server)
    started = config.read_text()
    config.write_text(started.replace("processes = 1", 'processes = 3\nenv = { RELOADED = "yes" }'))
    os.kill(server.proc.pid, signal.SIGHUP)
    server.wait_for_log("generation 2 serves", timeout=15)
    assert server.get("/env?RELOADED")[2] == b"yes"
    wait_until(lambda: len(worker_pids(server)) == 3, timeout=15, what="three workers")
    assert "a reload does not apply" not in server.log()
    generation_2 = set(worker_pids(server))

    # With a server-side key changed, the app keeps the settings it has (three workers).
    config.write_text(started.replace("processes = 1", 'processes = 2\nmax_body_size = "1K"'))
    os.kill(server.proc.pid, signal.SIGHUP)
    server.wait_for_log("generation 3 serves", timeout=15)
    # Named against the settings generation 2 runs (its env, its three processes).
    server.wait_for_log(f"{config}: a reload does not apply these changes to the settings "
                        "running (app `pool`: env, max_body_size, processes): restart the "
                        "server to apply them")
    wait_until(lambda: not set(worker_pids(server)) & generation_2, timeout=15,
               what="generation 2 to leave")
    assert len(worker_pids(server)) == 3
    assert server.get("/env?RELOADED")[2] == b"yes"
    # max_body_size = "1K" is not in force: the server still takes a 4 KiB body.
    assert server.request("POST", "/echo", body=b"x" * 4096)[0] == 200

    # An invalid file: `portico reload` says why and sends nothing; a SIGHUP reloads nothing.
    config.write_text(started.replace("processes = 1", "processes = 0"))
    done = subprocess.run([str(BINARY), "reload", "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 64, done
    assert f"{config}:" in done.stderr and "app[0].processes" in done.stderr, done.stderr
    assert server.log().count("SIGHUP") == 2
    os.kill(server.proc.pid, signal.SIGHUP)
    server.wait_for_log("reload refused, everything goes on as it was: "
                        f"{config}:", timeout=15)
    assert re.search(r"reload refused.*app\[0\]\.processes", server.log()), server.log()
    assert "generation 4" not in server.log()
    assert server.get("/env?RELOADED")[2] == b"yes"


def test_max_requests_replaces_a_worker_without_a_failed_request(portico):
    server = portico(pool_app(processes=1, max_requests=20))
    first = int(server.get("/pid")[2])
    statuses, pids = [], set()

    def replaced():
        status, _, body = server.get("/pid")
        statuses.append(status)
        pids.add(int(body) if status == 200 else None)
        return len(pids) >= 2
    # Requests go on while the replacement starts: the old worker serves until it is ready.
    wait_until(replaced, timeout=15, interval=0, what="a second worker")
    assert set(statuses) == {200}, statuses
    assert first in pids, pids
    server.wait_for_log(f"pool worker {first} replaced (it was given max_requests (20))")


def test_a_worker_whose_replacement_cannot_start_serves_on(portico, tmp_path):
    """max_requests asks for a new worker, but the code on disk no longer imports: the old
    worker goes on serving (no request gets 503), as a reload to such code keeps the old
    generation, while its replacement is tried again with backoff. Once the code imports,
    the replacement takes over."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v1"))
    server = portico(app_table("v", "versioned:application", mode="pool", processes=1,
                               max_requests=3)
                     .replace('python_path = ["', f'python_path = ["{code}", "', 1))
    [old] = worker_pids(server)
    (code / "versioned.py").write_text("this is not python\n")
    for _ in range(3):
        assert server.get("/")[::2] == (200, b"v1")
    server.wait_for_log("a pool worker could not start", timeout=15)
    for _ in range(10):
        assert server.get("/")[::2] == (200, b"v1")
    assert worker_pids(server) == [old]
    server.wait_for_log(f"pool worker {old} serves on until a replacement starts")

    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v2"))
    wait_until(lambda: server.get("/")[2] == b"v2", timeout=40, what="the replacement")
    server.wait_for_log(f"pool worker {old} replaced (it was given max_requests (3))")


def test_a_worker_that_serves_on_and_then_dies_is_told_as_lost(portico, tmp_path):
    """The worker serving on while its replacement cannot start is killed: the log says so
    and counts a restart, rather than calling a dead worker "serving on"; once the code
    imports, the pool serves again."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v1"))
    pid_file = tmp_path / "p.pid"
    server = portico(app_table("v", "versioned:application", mode="pool", processes=1,
                               max_requests=3)
                     .replace('python_path = ["', f'python_path = ["{code}", "', 1),
                     server_extra=f'pid_file = "{pid_file}"\nstatus_path = "/_portico/status"\n')
    [old] = worker_pids(server)
    (code / "versioned.py").write_text("this is not python\n")
    for _ in range(3):
        assert server.get("/")[::2] == (200, b"v1")
    server.wait_for_log(f"pool worker {old} serves on until a replacement starts", timeout=15)
    os.kill(old, signal.SIGKILL)
    server.wait_for_log(f"pool worker {old} was killed by signal 9", timeout=15)
    said = server.log().count(f"pool worker {old} serves on")
    (code / "versioned.py").write_text(VERSIONED_APP.format(version="v2"))
    wait_until(lambda: server.get("/")[2] == b"v2", timeout=40, what="the replacement")
    assert server.log().count(f"pool worker {old} serves on") == said
    assert f"pool worker {old} replaced" not in server.log()
    done = subprocess.run([str(BINARY), "status", "--config", str(server_config(server))],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "1 restart(s)" in done.stdout, done.stdout


def thread_names(pid):
    names = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names.append(open(f"/proc/{pid}/task/{task}/comm").read().strip())
        except OSError:
            pass
    return names


def hold_in_background(server, path):
    """GETs `path` (one of the app's holding paths) on a thread of its own; returns the
    thread and a dict where its response lands under "r"."""
    held = {}
    holder = threading.Thread(target=lambda: held.setdefault("r", server.get(path, timeout=30)))
    holder.start()
    return holder, held


def hold_several(server, release, count, timeout=30):
    """Starts `count` GETs of `/hold?{release}-{n}`, each on a thread of its own; returns the
    threads and the list their responses land in (in the order they end)."""
    results = []
    threads = [threading.Thread(target=lambda n=n: results.append(
                   server.get(f"/hold?{release}-{n}", timeout=timeout))) for n in range(count)]
    for t in threads:
        t.start()
    return threads, results


def test_a_request_goes_to_the_first_free_worker_not_behind_a_slow_one(portico, tmp_path):
    """Requests that find every thread busy wait in the pool's one queue, and the first
    thread to come free takes the next, on whichever worker: none waits behind a slow
    request while another worker could serve it (as mod_wsgi's daemon processes and
    gunicorn's workers take theirs from one listen queue)."""
    server = portico(pool_app(processes=2, threads=1))
    flag = tmp_path / "release"
    holder, held = hold_in_background(server, f"/hold?{flag}")
    results = []
    quick = [threading.Thread(target=lambda: results.append(server.get("/slow?0.1", timeout=30)))
             for _ in range(6)]
    try:
        wait_until(lambda: Path(f"{flag}.started").exists(), what="the slow request")
        for t in quick:
            t.start()
        # All six are served, one after another, by the worker that is not held, while the
        # slow request still runs.
        deadline = time.monotonic() + 15
        for t in quick:
            t.join(max(0.0, deadline - time.monotonic()))
        done = [r[0] for r in results]
        assert done == [200] * 6, f"{len(done)} of 6 quick requests served beside the slow one"
        assert "r" not in held
        assert len({r[1]["X-Pid"] for r in results}) == 1
    finally:
        flag.touch()
        holder.join(30)
        for t in quick:
            t.join(30)
    assert held["r"][0] == 200 and held["r"][2] == b"held"


def test_a_request_waiting_in_the_pools_queue_goes_to_the_next_generation(portico, tmp_path):
    """A request that waits in the pool's queue (every thread busy, as `portico status`
    shows) when a reload brings a new generation is served by the new workers at once, not
    left for the old worker's thread after its slow request."""
    server = portico(pool_app(processes=1, threads=1, graceful_timeout="30s"),
                     server_extra='status_path = "/_portico/status"')
    old = int(server.get("/pid")[2])
    flag = tmp_path / "release"
    holder, held = hold_in_background(server, f"/hold?{flag}")
    try:
        wait_until(lambda: Path(f"{flag}.started").exists(), what="the slow request")
        waiting, waited = hold_in_background(server, "/pid")
        status = lambda: json.loads(server.get("/_portico/status")[2])[0]  # noqa: E731
        wait_until(lambda: status()["queued"] == 1, what="the request to wait in the queue")
        os.kill(server.proc.pid, signal.SIGHUP)
        waiting.join(15)
        assert waited.get("r", (None,))[0] == 200, "the waiting request was not served"
        assert int(waited["r"][2]) != old
        assert "r" not in held
        assert status()["queued"] == 0
    finally:
        flag.touch()
        holder.join(30)
    assert held["r"][0] == 200 and held["r"][2] == b"held"


@pytest.mark.parametrize("checked_when", ["a thread comes free", "another request joins"])
def test_a_request_past_queue_timeout_in_the_pools_queue_gets_504_and_leaves_the_queue(
        portico, tmp_path, checked_when):
    """A request waiting in the pool's queue (as `portico status` shows) past the app's
    queue_timeout is answered 504 when a thread comes free, or as soon as another request
    joins the queue, and no worker runs it: the worker's request count does not move."""
    server = portico(pool_app(processes=1, threads=1, queue_timeout="1s"),
                     server_extra='status_path = "/_portico/status"')
    status = lambda: json.loads(server.get("/_portico/status")[2])[0]  # noqa: E731
    flag = tmp_path / "release"
    holder, held = hold_in_background(server, f"/hold?{flag}")
    later = None
    try:
        wait_until(lambda: Path(f"{flag}.started").exists(), what="the slow request")
        waiting, waited = hold_in_background(server, "/pid")
        wait_until(lambda: status()["queued"] == 1, what="the request to wait in the queue")
        served = status()["workers"][0]["served"]
        # Past its queue_timeout while the one thread is held.
        time.sleep(1.5)
        if checked_when == "another request joins":
            later, got = hold_in_background(server, "/pid")
            waiting.join(10)
            assert waited.get("r", (None,))[0] == 504, "not answered when the next one queued"
            assert "r" not in held
            wait_until(lambda: status()["queued"] == 1, what="the later request to queue")
        flag.touch()
        holder.join(30)
        waiting.join(30)
        assert held["r"][0] == 200 and held["r"][2] == b"held"
        assert waited["r"][0] == 504, waited["r"]
        if later is not None:
            later.join(30)
            assert got["r"][0] == 200
        assert status()["queued"] == 0
        # Only the held request (and the later one) were served since.
        assert status()["workers"][0]["served"] == served + 1 + (later is not None)
        assert "past its queue_timeout (1000 ms)" in server.log()
        assert server.get("/pid")[0] == 200
    finally:
        flag.touch()
        holder.join(30)


def test_a_recycled_worker_finishes_its_requests_after_its_slot_ends(portico, tmp_path):
    """A worker replaced for max_requests drains on its own thread: a reload right after,
    which ends the slot that started it, does not cut the request it still runs. (A worker's
    parent-death signal follows the thread that forked it, not the process.)"""
    server = portico(pool_app(processes=1, max_requests=2, graceful_timeout="30s"))
    flag = tmp_path / "release"
    holder, held = hold_in_background(server, f"/hold?{flag}")
    try:
        wait_until(lambda: Path(f"{flag}.started").exists(), what="the held request")
        [first] = worker_pids(server)
        assert int(server.get("/pid")[2]) == first  # its second request: max_requests
        wait_until(lambda: int(server.get("/pid")[2]) != first, timeout=15,
                   what="the replacement to serve")
        [second] = [p for p in worker_pids(server) if p != first]

        os.kill(server.proc.pid, signal.SIGHUP)
        server.wait_for_log(f"pool worker {second} replaced (a reload replaced it)", timeout=15)
        # The first generation's slot is over (its thread gone); the first worker is not.
        wait_until(lambda: not [n for n in thread_names(server.proc.pid) if "-pool-g1-" in n],
                   what="the first generation's slot thread to end")
        assert first in worker_pids(server)
    finally:
        flag.touch()
        holder.join(30)
    assert held["r"][0] == 200 and held["r"][2] == b"held", held
    wait_until(lambda: first not in worker_pids(server), timeout=15, what="the first to go")
    server.wait_for_log(f"pool worker {first} replaced (it was given max_requests (2))")


def test_a_stuck_request_gets_504_and_its_worker_is_replaced(portico):
    server = portico(pool_app(processes=1, threads=2, request_timeout="1s"))
    stuck_pid = int(server.get("/pid")[2])
    assert server.get("/slow?30", timeout=15)[0] == 504
    # Logged as gunicorn's WORKER TIMEOUT is, naming the request (nginx adds its request line).
    line = "app `pool` gave no response within its request_timeout (1s); answered 504"
    server.wait_for_log(line)
    assert any(line in entry and "/slow" in entry for entry in server.log().splitlines()), \
        server.log()
    server.wait_for_log(f"pool worker {stuck_pid} replaced (a request ran past request_timeout",
                        timeout=10)
    status, _, body = server.get("/pid")
    assert status == 200 and int(body) != stuck_pid


def test_a_stuck_requests_worker_finishes_its_other_requests_before_it_goes(portico, tmp_path):
    """The other requests of a worker replaced for a stuck one are untouched: they finish
    (up to graceful_timeout), as any drained worker's do, rather than being cut with it."""
    server = portico(pool_app(processes=1, threads=2, request_timeout="1s",
                              graceful_timeout="30s"))
    first = int(server.get("/pid")[2])
    flag = tmp_path / "release"
    # A streamed response: its headers are out, so request_timeout no longer limits it.
    holder, held = hold_in_background(server, f"/stream-hold?{flag}")
    try:
        wait_until(lambda: Path(f"{flag}.started").exists(), what="the streamed request")
        assert server.get(f"/hold?{tmp_path / 'never'}", timeout=15)[0] == 504
        wait_until(lambda: int(server.get("/pid")[2]) != first, timeout=15,
                   what="the replacement to serve")
        # Still draining, its streamed request not cut.
        assert first in worker_pids(server)
        assert "cut after graceful_timeout" not in server.log()
    finally:
        flag.touch()
        holder.join(30)
    assert held["r"][0] == 200 and held["r"][2] == b"first,last", held
    server.wait_for_log(f"pool worker {first} replaced (a request ran past request_timeout",
                        timeout=20)
    assert "cut after graceful_timeout" not in server.log()


def test_an_asgi_request_that_only_awaits_past_request_timeout_costs_no_worker(portico):
    """An async handler that awaits past request_timeout (a long poll) gets 504, and that is
    all: its event loop serves on, so the worker and its other connections stay."""
    server = portico(asgi_table("probe", "asgi_probe:app", mode="pool", processes=1,
                                request_timeout="1s"))
    wait_until(lambda: len(worker_pids(server)) == 1, what="one worker")
    worker = worker_pids(server)[0]
    assert server.get("/wait-disconnect", timeout=15)[0] == 504
    server.wait_for_log("probe: wait-disconnect gave http.disconnect")
    # For some of the worker's watch ticks (a replacement would start within the first),
    # the same worker serves on.
    until = time.monotonic() + 2
    while time.monotonic() < until:
        assert server.get("/hello")[2] == b"Hello, world!"
        assert worker_pids(server) == [worker]
    assert "replaced" not in server.log()


def test_an_asgi_worker_whose_event_loop_is_blocked_is_replaced(portico):
    """Sync code that blocks the loop past request_timeout stops every request of the
    worker: that worker is replaced."""
    server = portico(asgi_table("probe", "asgi_probe:app", mode="pool", processes=1,
                                request_timeout="1s"))
    wait_until(lambda: len(worker_pids(server)) == 1, what="one worker")
    worker = worker_pids(server)[0]
    assert server.get("/block-loop?seconds=30", timeout=15)[0] == 504
    server.wait_for_log(f"pool worker {worker} replaced (its event loop has run nothing else "
                        "for longer than request_timeout (1s))", timeout=20)
    assert server.get("/hello")[2] == b"Hello, world!"


def test_a_max_memory_below_what_a_worker_starts_with_backs_off_with_a_warning(portico):
    """A worker already past max_memory when it is ready is not replaced at once, over and
    over (each replacement as big as the last): the log says why, and it serves on."""
    server = portico(pool_app(processes=1, max_memory="1M"))
    pid = int(server.get("/pid")[2])
    server.wait_for_log(f"pool worker {pid} uses")
    assert "past max_memory (1 MiB): it is replaced for its memory only after 10 s" \
        in server.log()
    # Three seconds of requests: the old code replaced the worker every second.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert server.get("/pid")[2] == str(pid).encode()
    assert server.log().count(" started (generation 1)") == 1, server.log()


def test_a_worker_over_max_memory_is_replaced_after_its_requests(portico):
    server = portico(pool_app(processes=1, max_memory="48M"))
    pid = int(server.get("/pid")[2])
    assert server.get("/grow")[0] == 200
    server.wait_for_log(f"pool worker {pid} replaced (its memory", timeout=10)
    assert int(server.get("/pid")[2]) != pid


def test_max_lifetime_replaces_each_worker_in_turn_without_a_failed_request(portico):
    """max_lifetime (mod_wsgi's restart-interval, uWSGI's max-worker-lifetime): a worker that
    has served that long is replaced as for max_requests, its replacement first, while
    requests go on; and the replacement is replaced in its turn."""
    server = portico(pool_app(processes=1, max_lifetime="1s"))
    first = int(server.get("/pid")[2])
    statuses, pids = [], []

    def two_replacements():
        status, _, body = server.get("/pid")
        statuses.append(status)
        if status == 200 and int(body) not in pids:
            pids.append(int(body))
        return len(pids) >= 3
    wait_until(two_replacements, timeout=20, interval=0.01, what="two replacements")
    assert set(statuses) == {200}, statuses
    assert pids[0] == first, pids
    server.wait_for_log(f"pool worker {first} replaced (it served for max_lifetime (1s))")
    server.wait_for_log(f"pool worker {pids[1]} replaced (it served for max_lifetime (1s))")


def test_a_workers_sys_executable_is_the_embedded_python(portico):
    """Not whatever `python3` PATH finds first (a pyenv shim, which may run another Python):
    `subprocess` and `multiprocessing`'s spawn run sys.executable."""
    server = portico(pool_app(processes=1))
    base, minor = subprocess.run(
        [str(VENV / "bin" / "python"), "-c",
         "import sys; print(sys.base_prefix, sys.version_info[1])"],
        capture_output=True, text=True, check=True).stdout.split()
    code, _, body = server.get("/whoami")
    assert code == 200, body
    assert json.loads(body)["executable"] == f"{base}/bin/python3.{minor}"


def test_env_reaches_the_workers(portico):
    server = portico(pool_app(processes=1) + 'env = { PORTICO_POOL_GREETING = "bonjour" }\n')
    assert server.get("/env?PORTICO_POOL_GREETING")[2] == b"bonjour"


def binaries_nobody_can_run(public_tmp):
    """The `portico` binary, copied with its worker into `public_tmp` when nobody cannot
    read them where they are."""
    worker = BINARY.parent / "portico-worker"
    if readable_by_nobody(worker):
        return BINARY
    (public_tmp / "bin").mkdir(mode=0o755)
    for program in (BINARY, worker):
        shutil.copy2(program, public_tmp / "bin" / program.name)
    return public_tmp / "bin" / BINARY.name


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_workers_run_as_the_pool_user_with_its_groups_in_chdir_and_python_home(
        tmp_path, public_tmp):
    """`user`, `chdir` and `python_home`, as mod_wsgi's `user=`, `home=` and `python-home=`:
    the workers run as nobody, with nobody's groups (initgroups(3), as nginx's and
    gunicorn's workers) and nobody's HOME and USER, in the directory given and in the
    virtualenv given. Everything the
    workers read is put where nobody can read it."""
    binary = binaries_nobody_can_run(public_tmp)
    app_dir, work = public_tmp / "app", public_tmp / "work"
    for directory in (app_dir, work):
        directory.mkdir(mode=0o755)
    shutil.copy(APPS / "pool_app.py", app_dir)
    venv = public_tmp / "venv"
    subprocess.run([str(VENV / "bin" / "python"), "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=60)
    [site] = venv.glob("lib/python3*/site-packages")
    (site / "only_in_this_venv.py").write_text("")
    port = free_port()
    config = public_tmp / "portico.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n[[app]]\nname = "pool"\n'
        f'target = "pool_app:application"\npython_path = ["{app_dir}"]\nmode = "pool"\n'
        f'processes = 1\nuser = "nobody"\nchdir = "{work}"\npython_home = "{venv}"\n'
        f'env = {{ LOGNAME = "set-by-the-app" }}\n')
    server = Server(python_view(public_tmp, binary) + [str(binary), "serve", "--config",
                                                       str(config)], tmp_path, port)
    try:
        server.wait_ready()
        code, _, body = server.get("/whoami")
        assert code == 200, body
        nobody = pwd.getpwnam("nobody")
        assert json.loads(body) == {
            "uid": nobody.pw_uid, "gid": nobody.pw_gid,
            "groups": sorted(os.getgrouplist("nobody", nobody.pw_gid)),
            "cwd": str(work), "prefix": str(venv), "executable": str(venv / "bin" / "python"),
            "venv_module": True}
        # Its login's variables are nobody's, as mod_wsgi gives its daemon processes, not
        # the server's (root's); those the app sets in `env` win.
        assert server.get("/env?HOME")[2].decode() == nobody.pw_dir
        assert server.get("/env?USER")[2] == b"nobody"
        assert server.get("/env?LOGNAME")[2] == b"set-by-the-app"
    finally:
        server.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_worker_whose_user_cannot_read_the_servers_python_refuses_to_start(
        tmp_path, public_tmp):
    """A worker run as a `user` who cannot read the Python the server embeds (one under
    /root) does not quietly run another of the same name that the loader finds in the
    system's directories, with other packages: it refuses, and says which and why."""
    libpython = embedded_libpython(BINARY)
    if readable_by_nobody(libpython):
        pytest.skip(f"the embedded Python ({libpython}) is readable by nobody")
    binary = binaries_nobody_can_run(public_tmp)
    app_dir = public_tmp / "app"
    app_dir.mkdir(mode=0o755)
    shutil.copy(APPS / "pool_app.py", app_dir)
    port = free_port()
    config = public_tmp / "portico.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\n[[app]]\nname = "pool"\n'
        f'target = "pool_app:application"\npython_path = ["{app_dir}"]\nmode = "pool"\n'
        f'processes = 1\nuser = "nobody"\n')
    server = Server([str(binary), "serve", "--config", str(config)], tmp_path, port)
    try:
        assert server.proc.wait(30) == 70, server.log()
        log = server.log()
        if "cannot open shared object file" not in log:
            # The loader found another libpython: the worker names both.
            assert f"not {libpython} as the server does" in log, log
        assert "could not start: the worker exited with code" in log, log
    finally:
        server.stop()


def test_portico_status_lists_the_workers(portico, tmp_path):
    pid_file = tmp_path / "p.pid"
    server = portico(pool_app(processes=2), server_extra=f'pid_file = "{pid_file}"\n'
                                                          'status_path = "/_portico/status"')
    for _ in range(6):
        server.get("/hello")
    done = subprocess.run([str(BINARY), "status", "--config", str(server_config(server))],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for pid in worker_pids(server):
        assert str(pid) in done.stdout
    assert "generation 1" in done.stdout and "serving" in done.stdout
    assert f"supervised by pid {server.proc.pid}" in done.stdout
    status = json.loads(server.get("/_portico/status")[2])
    assert status[0]["server_pid"] == server.proc.pid
    assert [w["state"] for w in status[0]["workers"]] == ["serving", "serving"]
    assert sum(w["served"] for w in status[0]["workers"]) >= 6
    code, headers, _ = server.request("POST", "/_portico/status", body=b"x")
    assert (code, headers["Allow"]) == (405, "GET, HEAD")


def test_a_burst_grows_the_pool_one_worker_after_another_up_to_max_processes(portico,
                                                                              tmp_path):
    """Four requests that each hold their thread, at once, on a pool of one worker of one
    thread that may grow to four: each worker, once ready, starts the next while requests
    still wait, so all four run at once on four workers. (Growth used to wait for a request
    that came later: two of the four waited for the first two to end.)"""
    server = portico(pool_app(processes=1, max_processes=4, threads=1))
    wait_until(lambda: len(worker_pids(server)) == 1, what="one worker")
    release = tmp_path / "release"
    held, results = hold_several(server, release, 4, timeout=60)
    try:
        wait_until(lambda: all(Path(f"{release}-{n}.started").exists() for n in range(4)),
                   timeout=20, what="all four held requests to run at once")
        assert len(worker_pids(server)) == 4
    finally:
        for n in range(4):
            Path(f"{release}-{n}").touch()
        for t in held:
            t.join(60)
    assert [r[0] for r in results] == [200] * 4
    assert len({r[1]["X-Pid"] for r in results}) == 4


def test_a_reload_while_every_worker_is_busy_starts_no_worker_for_the_old_generation(
        portico, tmp_path):
    """The new generation's first worker looks at the pool's queue while the old generation
    is still current (until the second is ready too): with no request waiting, the busy old
    generation must not grow (a worker that loads the new code under the old settings, only
    to be replaced at once)."""
    server = portico(pool_app(processes=2, max_processes=3, threads=1))
    wait_until(lambda: len(worker_pids(server)) == 2, what="two workers")
    release = tmp_path / "release"
    holders = [hold_in_background(server, f"/hold?{release}-{n}") for n in range(2)]
    try:
        wait_until(lambda: all(Path(f"{release}-{n}.started").exists() for n in range(2)),
                   what="both workers busy")
        os.kill(server.proc.pid, signal.SIGHUP)
        server.wait_for_log("generation 2 serves", timeout=20)
    finally:
        for n in range(2):
            Path(f"{release}-{n}").touch()
        for holder, _ in holders:
            holder.join(30)
    assert [held["r"][0] for _, held in holders] == [200, 200]
    wait_until(lambda: server.log().count("(a reload replaced it)") == 2, timeout=15,
               what="both old workers to go")
    assert server.log().count("started (generation 1)") == 2, server.log()


@pytest.mark.parametrize("when", ["as its generation retires", "while it drains"])
def test_a_draining_worker_killed_is_told_as_a_death(portico, tmp_path, when):
    """A worker killed while it drains (the OOM killer, say, after max_memory) is logged and
    counted as the death it is, with the requests it took along, not as a quiet
    replacement."""
    server = portico(pool_app(processes=1, threads=1),
                     server_extra='status_path = "/_portico/status"')
    wait_until(lambda: len(worker_pids(server)) == 1, what="one worker")
    [old] = worker_pids(server)
    release = tmp_path / "release"
    holder, held = hold_in_background(server, f"/hold?{release}")

    def old_worker_drains():
        workers = json.loads(server.get("/_portico/status")[2])[0]["workers"]
        return any(w["pid"] == old and w["state"] == "draining" for w in workers)
    try:
        wait_until(lambda: Path(f"{release}.started").exists(), what="the held request")
        os.kill(server.proc.pid, signal.SIGHUP)
        server.wait_for_log("generation 2 serves", timeout=20)
        if when == "while it drains":
            wait_until(old_worker_drains, what="the old worker to drain")
        os.kill(old, signal.SIGKILL)
        holder.join(30)
    finally:
        release.touch()
        holder.join(30)
    assert held["r"][0] == 502
    lost = "; 1 request(s) in flight failed with it"
    told = [f"pool worker {old} was killed by signal 9 while it drained (a reload replaced it)"
            + lost]
    if when == "as its generation retires":
        # Its supervisor may not have begun the drain yet: a death all the same.
        told.append(f"pool worker {old} was killed by signal 9 as a reload replaced it" + lost)
    wait_until(lambda: any(line in server.log() for line in told), timeout=15,
               what=f"the death of worker {old}")
    assert f"pool worker {old} replaced" not in server.log()


def test_workers_are_added_on_demand_and_stopped_when_idle(portico, tmp_path):
    server = portico(pool_app(processes=1, max_processes=3, threads=1, idle_timeout="1s"))
    wait_until(lambda: len(worker_pids(server)) == 1, what="one worker")
    assert "pool of 1 (up to 3 on demand) worker processes" in server.log()
    [first] = worker_pids(server)
    release = tmp_path / "release"
    busy, results = hold_several(server, release, 2)
    try:
        # Every thread of the one worker is taken: more workers start, up to max_processes,
        # and the request that found it busy runs on one of them, not queued behind the
        # first worker's.
        wait_until(lambda: [p for p in worker_pids(server)
                            if p != first and f"pool worker {p} started" in server.log()],
                   timeout=10, what="a worker on demand")
        wait_until(lambda: all(Path(f"{release}-{n}.started").exists() for n in range(2)),
                   timeout=10, what="both held requests to run while neither is released")
        assert len(worker_pids(server)) <= 3
        # The first worker is busy: a new request goes to one started on demand.
        status, headers, _ = server.get("/hello")
        assert status == 200 and int(headers["X-Pid"]) != first
    finally:
        for n in range(2):
            Path(f"{release}-{n}").touch()
        for t in busy:
            t.join()
    assert [r[0] for r in results] == [200, 200]
    # Given no request for idle_timeout, the extra workers stop; the minimum stays. A trickle
    # of requests, which the first worker can take alone, goes to it and not to them.
    served = []

    def back_to_one():
        status, headers, _ = server.get("/hello")
        assert status == 200
        served.append(int(headers["X-Pid"]))
        return len(worker_pids(server)) == 1
    wait_until(back_to_one, timeout=10, what="back to one worker under a trickle of requests")
    assert set(served) == {first}, served
    assert worker_pids(server) == [first]
    server.wait_for_log("(idle)")


def test_a_push_only_websocket_app_is_told_when_its_client_leaves(portico):
    """An ASGI app that never receives after the accept, while its client sends more than
    the app's queue holds and then leaves: the app's next send raises (ASGI: an OSError),
    as in-process, instead of the stream waiting forever for room the app never makes."""
    from websockets.sync.client import connect
    server = portico(asgi_table("ws", "asgi_ws:app", mode="pool", processes=1))
    with connect(f"ws://127.0.0.1:{server.port}/push-only", open_timeout=10,
                 close_timeout=1) as ws:
        assert ws.recv(timeout=10) == "tick"
        for i in range(64):
            ws.send(f"heartbeat {i}")
        ws.recv(timeout=10)
    server.wait_for_log("push-only send raised", timeout=15)
    server.wait_for_log("oserror=True")


def test_a_websocket_stays_open_on_the_old_generation_across_a_reload(portico):
    from websockets.sync.client import connect
    server = portico(asgi_table("echo", "asgi_echo:app", mode="pool", processes=1,
                                graceful_timeout="20s"))
    wait_until(lambda: len(worker_pids(server)) == 1, what="one worker")
    old = worker_pids(server)[0]
    with connect(f"ws://127.0.0.1:{server.port}/", open_timeout=10, close_timeout=10) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        os.kill(server.proc.pid, 1)
        server.wait_for_log("generation 2 serves", timeout=15)
        # New connections go to the new generation; this one stays on its worker.
        with connect(f"ws://127.0.0.1:{server.port}/", open_timeout=10) as fresh:
            fresh.send("new")
            assert fresh.recv(timeout=10) == "new"
        ws.send("after the reload")
        assert ws.recv(timeout=10) == "after the reload"
        assert old in worker_pids(server)
    # Closed, the old worker has nothing left and goes.
    wait_until(lambda: old not in worker_pids(server), timeout=10, what="the old worker to go")
    server.wait_for_log(f"pool worker {old} replaced (a reload replaced it)")


def test_a_websocket_cut_by_its_workers_replacement_is_closed_with_1012(portico):
    """Past graceful_timeout a WebSocket on a replaced worker is closed with 1012 (service
    restart), as uvicorn closes its sockets when it stops: clients reconnect at once, where
    1011 (internal error) tells them the server is broken."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect
    server = portico(asgi_table("ws", "asgi_ws:app", mode="pool", processes=1,
                                graceful_timeout="1s"))
    wait_until(lambda: len(worker_pids(server)) == 1, what="one worker")
    with connect(f"ws://127.0.0.1:{server.port}/echo", open_timeout=10,
                 close_timeout=10) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        os.kill(server.proc.pid, 1)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=20)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012, closed.value
    # The app hears the same code as its client, as when the server stops (not 1006).
    server.wait_for_log("ws: disconnect code=1012", timeout=10)


def test_a_workers_lifespan_shutdown_is_bounded_by_the_apps_graceful_timeout(portico):
    """A replaced ASGI worker gives its app's lifespan shutdown the app's graceful_timeout, as
    asgi.md promises, not a fixed time of its own."""
    server = portico(asgi_table("probe", "asgi_probe:app", mode="pool", processes=1,
                                graceful_timeout="1s"),
                     env={"PROBE_LIFESPAN": "hang-shutdown"})
    wait_until(lambda: len(worker_pids(server)) == 1, what="one worker")
    old = worker_pids(server)[0]
    os.kill(server.proc.pid, 1)
    server.wait_for_log("probe: lifespan shutdown received")
    server.wait_for_log("app `probe`: lifespan shutdown did not complete within 1s")
    wait_until(lambda: old not in worker_pids(server), what="the old worker to go")


@pytest.mark.parametrize("mode", ["in-process", "pool"])
def test_a_background_task_after_the_response_finishes_before_the_lifespan_shutdown(portico,
                                                                                     mode):
    """A request's work after its response (Starlette's BackgroundTasks) is part of its app
    call: a stopping server waits for it, then runs the lifespan shutdown, as uvicorn waits
    for its tasks. Before, the task was cut without a word (an e-mail, a write lost)."""
    pooled = {"mode": "pool", "processes": 1} if mode == "pool" else {"mode": mode}
    server = portico(asgi_table("bg", "asgi_background:app", **pooled))
    code, _, body = server.get("/later")
    assert (code, body) == (200, b"answered")
    server.wait_for_log("background: task begun")
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    log = server.log()
    assert "background: task done" in log, log
    assert log.index("background: task done") < log.index("background: lifespan shutdown"), log
    assert "waiting up to" in log and "request(s) still running in the app" in log, log


def test_a_task_still_running_past_graceful_timeout_is_cancelled_before_the_lifespan_shutdown(
        portico):
    """Past the app's graceful_timeout a worker being replaced cancels what still runs, and
    its `finally` runs while the lifespan's resources are still there: then the shutdown."""
    server = portico(asgi_table("bg", "asgi_background:app", mode="pool", processes=1,
                                graceful_timeout="1s"))
    code, _, _ = server.get("/forever")
    assert code == 200
    server.wait_for_log("background: forever begun")
    os.kill(server.proc.pid, signal.SIGHUP)
    server.wait_for_log("background: lifespan shutdown", timeout=20)
    log = server.log()
    assert "app `bg`: 1 request(s) still running after 1s: cancelled" in log, log
    assert log.index("background: forever cleaned up") \
        < log.index("background: lifespan shutdown"), log


@pytest.mark.parametrize("mode", ["in-process", "pool"])
def test_the_apps_atexit_functions_run_as_the_server_stops(portico, mode):
    """What an app registers with `atexit` (logging's last flush, a metrics push) runs when
    the process that ran the app stops, as under gunicorn and mod_wsgi; the embedded
    interpreter is never finalized, so before nothing ran it."""
    pooled = {"mode": "pool", "processes": 1} if mode == "pool" else {"mode": mode}
    server = portico(app_table("pool", "pool_app:application", **pooled),
                     env={"PROBE_ATEXIT": "1"})
    code, _, body = server.get("/pid")
    assert code == 200
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(30)
    assert f"pool_app: atexit in {int(body)}" in server.log()


def kill_with_children(proc):
    """Kills a process and its children (a watchdog's pool server would outlive it: without
    nginx's lifeline, nothing tells it that its watchdog is gone)."""
    if proc.poll() is None:
        for pid in child_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.kill()
    proc.wait()


def start_pool_server(tmp_path, *tables, extra_args=(), env=None):
    """`portico pool --config FILE` for [[app]] tables with pool_socket; waits for each
    socket. Returns (process, config)."""
    config = tmp_path / "pool.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:1"]\n' + "\n".join(tables))
    log = open(tmp_path / "pool.log", "ab")
    proc = subprocess.Popen([str(BINARY), "pool", "--config", str(config), *extra_args],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    sockets = [Path(line.split('"')[1]) for table in tables for line in table.splitlines()
               if line.startswith("pool_socket")]
    wait_until(lambda: all(s.exists() for s in sockets) or proc.poll() is not None,
               timeout=30, what="the pool server's sockets")
    assert proc.poll() is None, (tmp_path / "pool.log").read_text()
    return proc, config


def test_portico_serve_uses_a_pool_run_on_its_own_and_reconnects(portico, tmp_path):
    """`pool_socket`: `portico serve` starts no workers and forwards to the `portico pool`
    listening there. While that pool is down its requests get 502; once it is back the same
    `portico serve` is served by the new pool, without a restart."""
    sock = tmp_path / "pool.sock"
    table = pool_app(pool_socket=str(sock))
    pool, config = start_pool_server(tmp_path, table)
    try:
        server = portico(table)
        assert worker_pids(server) == [], "the host starts no workers of its own"
        pool_workers = sorted(worker_pids(pool_proc(pool)))
        assert len(pool_workers) == 2
        pids = {int(server.get("/pid")[2]) for _ in range(8)}
        assert pids == set(pool_workers)
        assert server.get("/raise")[0] == 500

        pool.send_signal(signal.SIGTERM)
        pool.wait(30)
        assert not sock.exists()
        status, _, body = server.get("/pid")
        assert status == 502
        server.wait_for_log("cannot connect to")

        pool, _ = start_pool_server(tmp_path, table)
        new_workers = set(worker_pids(pool_proc(pool)))
        assert {int(server.get("/pid")[2]) for _ in range(8)} == new_workers
        assert not new_workers & set(pool_workers)
    finally:
        pool.terminate()
        pool.wait(30)


def test_a_reload_of_portico_pool_applies_its_new_pool_settings(portico, tmp_path):
    """`systemctl reload` of a pool run on its own: the new generation has the file's new
    `processes`, the host is served by it without a restart, and nothing is named as left
    unapplied (the app's pool_socket, which the pool server listens on, has not changed, and
    `[server]` is not the pool server's)."""
    sock = tmp_path / "pool.sock"
    table = pool_app(pool_socket=str(sock), processes=1)
    pool, config = start_pool_server(tmp_path, table)
    try:
        server = portico(table)
        assert len(worker_pids(pool_proc(pool))) == 1
        # [server] is not the pool server's: its change is not reported either.
        config.write_text(config.read_text().replace("processes = 1", "processes = 3")
                          .replace("127.0.0.1:1", "127.0.0.1:2"))
        pool.send_signal(signal.SIGHUP)
        log = tmp_path / "pool.log"
        wait_until(lambda: "generation 2 serves" in log.read_text(), timeout=15,
                   what="generation 2")
        wait_until(lambda: len(worker_pids(pool_proc(pool))) == 3, timeout=15,
                   what="three workers")
        workers = set(worker_pids(pool_proc(pool)))
        wait_until(lambda: {int(server.get("/pid")[2]) for _ in range(12)} == workers,
                   timeout=15, what="the host to be served by all three")
        assert "a reload does not apply" not in log.read_text()
    finally:
        pool.terminate()
        pool.wait(30)


def test_a_pool_server_that_accepts_nothing_costs_only_its_own_requests(portico, run_portico,
                                                                        tmp_path):
    """A pool server that takes no connection (stopped, its queue of pending connections
    full) fails only the requests to its app, at once with 502 and a log line that says why:
    the host's connect does not wait on its event loop, so its other apps are served
    meanwhile. A second pool server for its socket sees it alive and refuses to start. Once
    the server accepts again, the same host is served by it."""
    sock = tmp_path / "pool.sock"
    table = pool_app(pool_socket=str(sock))
    pool, config = start_pool_server(tmp_path, table)
    queued = []
    try:
        server = portico(table + app_table("inproc", "pool_app:application", mount="/x",
                                           mode="in-process"))
        pool.send_signal(signal.SIGSTOP)
        queued = fill_connection_queue(sock)
        # The host connects on its first request to the app, which is now.
        status, _, _ = server.get("/pid", timeout=10)
        assert status == 502
        server.wait_for_log(f"cannot connect to {sock} for app `pool`: its queue of "
                            "connections is full")
        status, _, body = server.get("/x/pid", timeout=10)
        assert (status, body) == (200, str(server.proc.pid).encode())
        second = run_portico("pool", "--config", str(config))
        assert second.returncode != 0
        assert f"cannot listen on {sock}: another pool server is serving there" \
            in second.stderr, second.stderr

        pool.send_signal(signal.SIGCONT)
        for s in queued:
            s.close()
        workers = set(worker_pids(pool_proc(pool)))
        wait_until(lambda: server.get("/pid")[0] == 200, timeout=20,
                   what="the host to be served by the pool again")
        assert {int(server.get("/pid")[2]) for _ in range(8)} <= workers
    finally:
        for s in queued:
            s.close()
        pool.send_signal(signal.SIGCONT)
        pool.terminate()
        pool.wait(30)


def test_portico_pool_refuses_an_app_it_cannot_place(run_portico, tmp_path):
    config = tmp_path / "p.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:1"]\n'
                      + pool_app("nosocket") + app_table("inproc", "pool_app:application",
                                                         mount="/x", mode="in-process"))
    done = run_portico("pool", "--config", str(config))
    assert done.returncode == 64
    assert "app `nosocket` has no pool_socket" in done.stderr, done.stderr
    done = run_portico("pool", "--config", str(config), "--app", "inproc")
    assert done.returncode == 64
    assert "app `inproc` is not mode = \"pool\"" in done.stderr, done.stderr


@pytest.mark.parametrize("watchdog", [False, True], ids=["plain", "watchdog"])
def test_portico_pool_tells_systemd_when_it_is_ready_reloading_and_stopping(tmp_path, watchdog):
    """Under systemd (`Type=notify`, NOTIFY_SOCKET set) the pool says READY=1 once its
    workers have loaded the app and its socket listens, RELOADING=1 then READY=1 around a
    SIGHUP, and STOPPING=1. Every message comes from the main process, as systemd's default
    `NotifyAccess=main` wants: with `--watchdog`, the watchdog passes on what its pool server
    says, and the signals it gets to the pool server."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    notify.settimeout(30)
    sock = tmp_path / "pool.sock"
    pool, _ = start_pool_server(tmp_path, pool_app(processes=1, pool_socket=str(sock)),
                                extra_args=("--watchdog",) if watchdog else (),
                                env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})

    def message():
        data, ancillary, _, _ = notify.recvmsg(100, socket.CMSG_SPACE(12))
        [(level, kind, creds)] = ancillary
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        sender = struct.unpack("iII", creds)[0]
        assert sender == pool.pid, f"{data!r} came from {sender}, not the main pid {pool.pid}"
        return data
    try:
        assert message() == b"READY=1"
        assert sock.exists()
        pool.send_signal(signal.SIGHUP)
        assert message() == b"RELOADING=1"
        assert message() == b"READY=1"
        pool.send_signal(signal.SIGTERM)
        assert message() == b"STOPPING=1"
        assert pool.wait(30) == 0
        assert not sock.exists()
    finally:
        kill_with_children(pool)
        notify.close()


def test_portico_pool_hands_its_socket_to_systemd_and_takes_it_back(portico, tmp_path):
    """With systemd's fd store (`FileDescriptorStoreMax=`, which sets FDSTORE), `portico
    pool` hands its listening socket over (`FDSTORE=1` with the descriptor) before READY=1.
    After a crash systemd starts it again with that socket (`LISTEN_FDS=1`, descriptor 3,
    `LISTEN_PID` its pid), as it does for a socket unit: the new pool binds nothing and
    serves the very socket, so a host that connected while no pool ran is served, not
    refused. On SIGTERM the socket, which is not its own, stays for the next one: a host
    that connects while it stops is left in the queue for the next pool server. Its workers
    never see the variables systemd gave it."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    sock = tmp_path / "pool.sock"
    table = pool_app(processes=1, pool_socket=str(sock))
    pool, config = start_pool_server(tmp_path, table, env={
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "FDSTORE": "4"})
    stored = None
    try:
        # What an earlier pool stored under the name goes, then its own socket is stored.
        assert notify.recv(100) == b"FDSTOREREMOVE=1\nFDNAME=portico-pool"
        data, fds, _, _ = socket.recv_fds(notify, 100, 4)
        assert data == b"FDSTORE=1\nFDNAME=portico-pool", data
        [stored] = fds
        listener = socket.socket(fileno=stored)
        assert listener.getsockname() == str(sock)
        listener.detach()  # `stored` stays open, closed once below
        assert notify.recv(100) == b"READY=1"
        inode = sock.stat().st_ino

        server = portico(table)
        assert server.get("/hello")[0] == 200
        for name in ("NOTIFY_SOCKET", "FDSTORE", "LISTEN_FDS", "LISTEN_PID"):
            assert server.get(f"/env?{name}")[2] == b"", f"a worker sees {name}"
        pool.kill()
        pool.wait(30)
        assert sock.stat().st_ino == inode, "a crash leaves the socket file"

        # Meanwhile a request: it waits in the socket's queue, which the store kept open. The
        # host may try the connection of the dead pool first (what it had in flight there
        # fails), then connects again: to the queue, not to a refusal.
        seen = []

        def request():
            for _ in range(2):
                seen.append(None)
                seen[-1] = server.get("/pid")
                if seen[-1][0] != 502:
                    return
        waiting = threading.Thread(target=request)
        waiting.start()
        wait_until(lambda: seen and (seen[-1] is None or seen[-1][0] != 502),
                   what="the host to connect again")
        log = open(tmp_path / "pool.log", "ab")

        def restart():
            return subprocess.Popen(
                ["sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@"', str(BINARY),
                 "pool", "--config", str(config)],
                stdout=log, stderr=subprocess.STDOUT, pass_fds=(3,),
                preexec_fn=lambda: os.dup2(stored, 3))
        pool = restart()
        waiting.join(30)
        status, _, body = seen[-1]
        assert status == 200, seen
        assert int(body) in worker_pids(pool_proc(pool))
        assert sock.stat().st_ino == inode, "the new pool bound no socket of its own"
        assert "listening on the inherited socket" in (tmp_path / "pool.log").read_text()

        # SIGTERM while a request is in flight: the pool stops taking connections and waits
        # for it. A host that connects meanwhile is not taken (and dropped) by the stopping
        # pool: it waits in the queue and is greeted by the next one.
        flag = tmp_path / "release"
        held = []
        holder = threading.Thread(target=lambda: held.append(server.get(f"/hold?{flag}")))
        holder.start()
        wait_until(lambda: Path(f"{flag}.started").exists(), what="the held request")
        pool.send_signal(signal.SIGTERM)
        stopped_accepting = "stopping: no new connections"
        wait_until(lambda: stopped_accepting in (tmp_path / "pool.log").read_text(),
                   what="the pool to stop accepting")
        latecomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        latecomer.connect(str(sock))
        assert pool.poll() is None, "the host connected while the pool was stopping"
        flag.touch()
        holder.join(30)
        assert held and held[0][0] == 200, held
        assert pool.wait(30) == 0
        assert sock.exists(), "the socket belongs to whoever gave it"
        pool = restart()
        latecomer.settimeout(30)
        hello = latecomer.recv(64)
        assert struct.pack("<I", pool.pid) in hello, f"{hello!r}: not the next pool's greeting"
        latecomer.close()
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(30) == 0
    finally:
        pool.kill()
        notify.close()
        if stored is not None:
            os.close(stored)


def test_the_watchdog_hears_only_its_pool_server(portico, tmp_path):
    """`portico pool --watchdog` (how nginx runs a pool) hears its pool server on an abstract
    socket, which any process on the machine can send to. The kernel names each sender, and
    what any other process sends is dropped: an empty `FDSTORE=1` does not empty the store
    (the next pool server still gets the socket), and a stranger's socket is neither handed
    down nor removed when the watchdog ends."""
    sock = tmp_path / "pool.sock"
    table = pool_app(processes=1, pool_socket=str(sock))
    watchdog, _ = start_pool_server(tmp_path, table, extra_args=("--watchdog",))
    log = tmp_path / "pool.log"

    def pool_server():
        children = child_pids(watchdog.pid)  # the watchdog runs one at a time
        return children[0] if children else None
    try:
        server = portico(table)
        assert server.get("/hello")[0] == 200  # ready, so its socket is in the store

        stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stranger.bind(str(tmp_path / "stranger.sock"))
        stranger.listen()
        to_watchdog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        address = f"\0portico-watchdog-{watchdog.pid}"
        # (socket.send_fds drops its address argument before Python 3.12: sendmsg does not.)
        to_watchdog.sendmsg([b"FDSTORE=1\nFDNAME=portico-pool"],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              struct.pack("i", stranger.fileno()))], 0, address)
        to_watchdog.sendto(b"FDSTORE=1", address)
        to_watchdog.sendto(b"FDSTOREREMOVE=1\nFDNAME=portico-pool", address)
        ignored = f"ignored a notification from pid {os.getpid()}"
        wait_until(lambda: log.read_text().count(ignored) == 3, what="three ignored messages")

        first = pool_server()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: pool_server() not in (None, first), what="the next pool server")
        wait_until(lambda: server.get("/pid")[0] == 200, what="the pool to serve again")
        assert "listening on the inherited socket" in log.read_text()

        watchdog.send_signal(signal.SIGTERM)
        assert watchdog.wait(30) == 0
        assert (tmp_path / "stranger.sock").exists(), "a stranger's socket file was removed"
        assert not sock.exists(), "the watchdog removes the pool's socket when it ends"
    finally:
        kill_with_children(watchdog)


def test_portico_pool_takes_a_socket_given_twice_once(portico, tmp_path):
    """systemd may give the same socket twice, from a socket unit (`ListenStream=`) and from
    the fd store: the pool serves it, closes the second copy quietly, and leaves the socket,
    which is not its own, in place when it stops."""
    sock = tmp_path / "pool.sock"
    table = pool_app(processes=1, pool_socket=str(sock))
    config = tmp_path / "pool.toml"
    config.write_text('[server]\nlisten = ["127.0.0.1:1"]\n' + table)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen()
    copy = os.dup(listener.fileno())
    log = tmp_path / "pool.log"

    def hand_over():
        os.dup2(listener.fileno(), 3)
        os.dup2(copy, 4)
    pool = subprocess.Popen(
        ["sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS=2; exec "$0" "$@"', str(BINARY),
         "pool", "--config", str(config)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, pass_fds=(3, 4),
        preexec_fn=hand_over)
    try:
        wait_until(lambda: "ready" in log.read_text() or pool.poll() is not None,
                   timeout=30, what="the pool to be ready")
        server = portico(table)
        assert server.get("/hello")[0] == 200
        text = log.read_text()
        assert "listening on the inherited socket" in text, text
        assert "none of this pool's" not in text, text
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(30) == 0
        assert sock.exists(), "the socket belongs to whoever gave it"
    finally:
        kill_with_children(pool)
        listener.close()
        os.close(copy)
