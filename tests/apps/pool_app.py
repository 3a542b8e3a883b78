"""A WSGI app for the pool tests: it tells which process answered, and can be slow, crash its
process or raise."""

import atexit
import os
import sys
import time

LEAK = []

if os.environ.get("PROBE_ATEXIT"):
    atexit.register(lambda: print(f"pool_app: atexit in {os.getpid()}", file=sys.stderr,
                                  flush=True))


def stream_until(flag):
    yield b"first,"
    open(flag + ".started", "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)
    yield b"last"


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path == "/pid":
        body = str(os.getpid()).encode()
    elif path == "/slow":
        time.sleep(float(environ.get("QUERY_STRING") or "1"))
        body = b"slow done"
    elif path == "/hold":
        # Says it started (QUERY_STRING + ".started"), then runs until the test creates the
        # file QUERY_STRING: a request in flight for exactly as long as a test needs one.
        flag = environ["QUERY_STRING"]
        open(flag + ".started", "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
        body = b"held"
    elif path == "/stream-hold":
        # As /hold, but its headers and first piece go out at once: a streamed response,
        # which request_timeout no longer limits.
        flag = environ["QUERY_STRING"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return stream_until(flag)
    elif path == "/crash":
        # The worker process dies mid-request, as a segfaulting extension would take it.
        os._exit(13)
    elif path == "/raise":
        raise RuntimeError("raised on purpose in a pool worker")
    elif path == "/grow":
        # Keeps 64 MiB for the life of the process (a leak, for max_memory).
        LEAK.append(bytearray(64 * 1024 * 1024))
        body = b"grown"
    elif path == "/whoami":
        # Who, where and in which Python the worker runs, and whether a module only the
        # python_home's site-packages holds can be imported.
        try:
            import only_in_this_venv  # noqa: F401
            venv_module = True
        except ImportError:
            venv_module = False
        import json
        import sys
        body = json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups()),
                           "cwd": os.getcwd(), "prefix": sys.prefix,
                           "executable": sys.executable,
                           "venv_module": venv_module}).encode()
    elif path == "/env":
        body = os.environ.get(environ.get("QUERY_STRING", ""), "").encode()
    elif path == "/echo":
        body = environ["wsgi.input"].read()
    elif path == "/stream":
        def pieces():
            for i in range(3):
                yield b"piece %d;" % i
        start_response("200 OK", [("Content-Type", "text/plain")])
        return pieces()
    else:
        body = b"Hello from a pool worker"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("X-Pid", str(os.getpid()))])
    return [body]
