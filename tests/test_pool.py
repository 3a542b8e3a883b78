"""Pooled apps (`mode = "pool"`): the app runs in `portico-worker` processes that the server
starts and supervises, through the same core as in-process hosting. The faults a pool exists
for are shown with real processes: a worker killed with SIGKILL under load, a worker that dies
mid-request, an app that cannot be imported."""

import os
import threading
import time

import pytest

from conftest import BINARY, app_table, asgi_table, needs, wait_until

pytestmark = needs("binary")


def pool_app(name="pool", target="pool_app:application", processes=2, **extra):
    return app_table(name, target, mode="pool", processes=processes, **extra)


def worker_pids(server):
    """The pool workers the server started (its children running portico-worker)."""
    children = f"/proc/{server.proc.pid}/task/{server.proc.pid}/children"
    pids = []
    for task in os.listdir(f"/proc/{server.proc.pid}/task"):
        path = f"/proc/{server.proc.pid}/task/{task}/children"
        if os.path.exists(path):
            pids += [int(p) for p in open(path).read().split()]
    del children
    return sorted(p for p in set(pids)
                  if os.path.exists(f"/proc/{p}/cmdline")
                  and b"portico-worker" in open(f"/proc/{p}/cmdline", "rb").read())


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
