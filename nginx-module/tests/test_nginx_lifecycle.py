"""The nginx module through nginx's process lifecycle (issue 4): `nginx -s reload` under load,
`nginx -s quit` with requests in flight, workers running as an unprivileged user, and a
reload to an app that cannot be imported.

Real nginx, real CPython apps written to temporary directories, real HTTP clients over
loopback. Readiness and every state change are polled with a deadline; the only fixed
wait is the bounded observation window that shows a worker is *not* respawned.

Builds nothing: run scripts/nginx-module.sh first, then
    .venv/bin/python -m pytest nginx-module/tests/test_nginx_lifecycle.py -v
PORTICO_NGINX_MODULE names the .so (default: target/release/ngx_http_portico_module.so),
NGINX_BIN the nginx (default: /usr/sbin/nginx).

Workers as `nobody`: the module embeds pyenv's CPython under /root (mode 0700), which
`nobody` cannot read. The tests that need a Python readable by the workers run nginx in a
private mount namespace (`unshare --mount`) in which /root is a world-readable directory
holding only the real ~/.pyenv: the embedded Python then sits at the very paths it was
built for, readable by everyone, as a system-wide Python is. Nothing outside the test's
namespace changes."""

import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import (NOBODY_UID, embedded_libpython, free_port,  # noqa: E402,F401
                      public_tmp, python_view, readable_by_nobody, wait_until)

MODULE = Path(os.environ.get("PORTICO_NGINX_MODULE",
                             ROOT / "target" / "release" / "ngx_http_portico_module.so"))
NGINX = os.environ.get("NGINX_BIN", shutil.which("nginx") or "/usr/sbin/nginx")
pytestmark = [
    pytest.mark.skipif(not MODULE.is_file() or not os.access(NGINX, os.X_OK),
                       reason="needs the built module (scripts/nginx-module.sh) and nginx"),
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="nginx's user switch and the mount namespace need root"),
]


# --- the app ----------------------------------------------------------------------------

# VERSION is read once, at import: a worker serves the code it imported. /slow/NAME marks
# itself started, then holds its thread until the test creates the file `release` (bounded),
# so the test knows a request is inside Python, and lets it go when it chooses.
APP = '''
import os, time

VERSION = {version!r}
HERE = os.path.dirname(os.path.abspath(__file__))


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path.startswith("/slow/"):
        name = path.rsplit("/", 1)[1]
        open(os.path.join(HERE, "started-" + name), "w").close()
        deadline = time.monotonic() + 20
        while not os.path.exists(os.path.join(HERE, "release")):
            if time.monotonic() > deadline:
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
                return [b"never released"]
            time.sleep(0.005)
        size = int(environ.get("QUERY_STRING") or 0)
        body = ("slow " + VERSION).encode() + slow_padding(name, size)
    elif path == "/pid":
        body = str(os.getpid()).encode()
    elif path == "/whoami":
        import hashlib, json, socket, ssl, sqlite3  # extension modules of lib-dynload
        body = json.dumps({{"version": VERSION, "uid": os.getuid(), "gid": os.getgid()}}).encode()
    else:
        body = VERSION.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def slow_padding(name, size):
    unit = ("<" + name + ">").encode()
    return (unit * (size // len(unit) + 1))[:size]
'''


def write_app(directory, version, source=None):
    """Writes ver.py. Python trusts a cached .pyc whose recorded source mtime (seconds) and
    size match, so versions written within one second must differ in size: they do here."""
    (directory / "ver.py").write_text(source if source is not None else APP.format(version=version))


def padding(name, size):
    unit = ("<" + name + ">").encode()
    return (unit * (size // len(unit) + 1))[:size]


# --- nginx ------------------------------------------------------------------------------

def write_conf(prefix, port, locations, *, user="root", workers=1, before_http="",
               after_http="", in_http="", daemon=False, log_level="info"):
    for d in ("logs", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir(exist_ok=True)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / name};"
        for kind, name in (("client_body", "body"), ("proxy", "proxy"),
                           ("fastcgi", "fastcgi"), ("uwsgi", "uwsgi"), ("scgi", "scgi")))
    user_line = "user root;" if user == "root" else f"user {user};"
    (prefix / "nginx.conf").write_text(f"""
load_module {MODULE.resolve()};
{user_line}
{before_http}
daemon {"on" if daemon else "off"};
master_process on;
worker_processes {workers};
error_log {prefix / "logs" / "error.log"} {log_level};
pid {prefix / "logs" / "nginx.pid"};
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp_paths}
{in_http}
    server {{
        listen 127.0.0.1:{port};
{locations}
    }}
}}
{after_http}
""")
    return prefix / "nginx.conf"


def public_site(base):
    """What a test of nginx as `nobody` starts from: the `python_view` wrapper, the app's v1
    in a directory every user may read, an nginx prefix and a free port."""
    wrapper = python_view(base, MODULE)
    app_dir = base / "app"
    app_dir.mkdir(mode=0o755)
    write_app(app_dir, "v1")
    prefix = base / "prefix"
    prefix.mkdir()
    return wrapper, app_dir, prefix, free_port()


class Nginx:
    def __init__(self, prefix, port, wrapper=(), env=None):
        self.prefix, self.port, self.wrapper = prefix, port, list(wrapper)
        self.log = prefix / "logs" / "error.log"
        self.proc = subprocess.Popen(
            self.wrapper + [NGINX, "-p", str(prefix), "-c", "nginx.conf"],
            stdout=open(prefix / "stdout", "wb"), stderr=open(prefix / "stderr", "wb"),
            env=env)

    def error_log(self, since=0):
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")

    def log_size(self):
        return self.log.stat().st_size if self.log.exists() else 0

    def stderr(self):
        return (self.prefix / "stderr").read_text(errors="replace")

    def signal(self, name):
        """`nginx -s NAME`, as an admin types it (outside any namespace)."""
        result = subprocess.run([NGINX, "-p", str(self.prefix), "-c", "nginx.conf", "-s", name],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result

    def check_config(self):
        return nginx_t(self.prefix, self.wrapper)

    def get(self, path="/", timeout=10):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def wait_serving(self, body, timeout=20.0, path="/"):
        """Polls new connections until one answers 200 with `body` at `path`."""
        def serving():
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self.proc.returncode}:\n"
                                     f"{self.stderr()}\n{self.error_log()}")
            try:
                return self.get(path, timeout=2) == (200, body)
            except OSError:
                return False
        wait_until(serving, timeout=timeout, what=f"nginx to answer {body!r}")

    def workers(self):
        """The pids of the master's children (its workers)."""
        return children(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            subprocess.run([NGINX, "-p", str(self.prefix), "-c", "nginx.conf", "-s", "quit"],
                           capture_output=True, timeout=10)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def children(pid):
    """The pids of the processes whose parent is `pid`, sorted."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry))
    return sorted(pids)


def nginx_t(prefix, wrapper=(), env=None):
    return subprocess.run(list(wrapper) + [NGINX, "-t", "-p", str(prefix), "-c", "nginx.conf"],
                          capture_output=True, text=True, timeout=60, env=env)


def assert_clean_log(log):
    assert "open socket" not in log, log
    assert "exited on signal" not in log, log
    # An ephemeral port another process held for a moment: nginx says so (at bind() or at
    # listen()) and tries again 500 ms later (the test got answers, so it did). Not the
    # module's doing.
    lines = [line for line in log.splitlines()
             if not (("bind() to" in line or "listen() to" in line)
                     and "Address already in use" in line)]
    for level in ("[alert]", "[crit]", "[emerg]"):
        assert not any(level in line for line in lines), log


def app_location(app_dir, threads=8):
    return f"""
        location / {{
            portico_app ver python_path={app_dir} threads={threads};
        }}
"""


# --- clients ----------------------------------------------------------------------------

RETRYABLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
             ConnectionAbortedError)


class Client:
    """GETs over one HTTP/1.1 connection kept alive between requests (or a new connection
    per request). Like urllib3 and browsers, it retries an idempotent request once, on a new
    connection, when a connection it *reuses* was closed by the server before any byte of
    the response came (nginx closes idle keep-alive connections when a worker stops; a
    request sent at that instant meets the close). Anything else is a failure: an error on
    a new connection, an error after the status line, a non-200, a wrong or short body."""

    def __init__(self, port, keep_alive):
        self.port, self.keep_alive = port, keep_alive
        self.conn, self.served = None, 0
        self.retried = []        # the errors that made it retry

    def close(self):
        if self.conn is not None:
            self.conn.close()
        self.conn, self.served = None, 0

    def get(self, path):
        reused = self.conn is not None and self.served > 0
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {} if self.keep_alive else {"Connection": "close"}
        try:
            self.conn.request("GET", path, headers=headers)
            resp = self.conn.getresponse()
        except RETRYABLE as e:
            self.close()
            if not reused:
                raise
            self.retried.append(repr(e))
            return self.get(path)  # a new connection: not retried again
        except BaseException:
            self.close()
            raise
        try:
            body = resp.read()
        except BaseException:
            self.close()
            raise
        if resp.will_close or not self.keep_alive:
            self.close()
        else:
            self.served += 1
        return resp.status, body


class Load:
    """Bounded load: `threads` clients (half keep-alive, half a new connection per request)
    GET / until stopped or `limit` requests each. Records every outcome."""

    def __init__(self, port, threads=6, limit=20000):
        self.port, self.limit = port, limit
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results = []        # (thread, started_at, status, body)
        self.failures = []       # (thread, keep_alive, repr(error) or (status, body))
        self.last = {}           # thread -> last body
        self.clients = [Client(port, keep_alive=(i % 2 == 0)) for i in range(threads)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(threads)]

    def _run(self, i):
        client = self.clients[i]
        for _ in range(self.limit):
            if self.stop.is_set():
                break
            started = time.monotonic()
            try:
                status, body = client.get("/")
            except Exception as e:  # noqa: BLE001 - every error is a failed request
                with self.lock:
                    self.failures.append((i, client.keep_alive, repr(e)))
                continue
            with self.lock:
                self.results.append((i, started, status, body))
                self.last[i] = body
                if status != 200:
                    self.failures.append((i, client.keep_alive, (status, body[:200])))
        client.close()

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def latest(self):
        """Each client's latest answer (once every client has one)."""
        with self.lock:
            return list(self.last.values()) if len(self.last) == len(self.threads) else None

    def count(self):
        with self.lock:
            return len(self.results)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "a load thread hangs"

    def assert_switched(self, old, new, switched):
        """No request failed; every answer was `old` or `new`, and both came; none started
        after `switched` got `old`. Returns the bodies in the order they were recorded."""
        assert self.failures == [], self.failures[:20]
        bodies = [body for _, _, _, body in self.results]
        assert set(bodies) == {old, new}
        late = [r for r in self.results if r[1] > switched and r[3] != new]
        assert late == [], late[:10]
        return bodies


class SlowRequest:
    """GET /slow/NAME?SIZE on its own keep-alive connection, in a thread."""

    def __init__(self, port, name, size=0):
        self.name, self.size = name, size
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(port,), daemon=True)
        self.thread.start()

    def _run(self, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("GET", f"/slow/{self.name}?{self.size}")
            resp = conn.getresponse()
            self.result = (resp.status, resp.getheader("Content-Length"), resp.read())
        except Exception as e:  # noqa: BLE001
            self.result = e
        finally:
            conn.close()

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive(), f"slow request {self.name} hangs"
        return self.result


# --- 1. reload under load ---------------------------------------------------------------

def test_reload_under_load_fails_no_request(tmp_path):
    """`nginx -s reload` while six clients hammer the server and four requests sit inside
    the old code: no request fails, the new code answers after the reload, and the requests
    in flight finish with the old code's answer."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    port = free_port()
    write_conf(tmp_path, port, app_location(app_dir), workers=2)
    server = Nginx(tmp_path, port)
    load = None
    try:
        server.wait_serving(b"v1")
        old_workers = server.workers()
        assert len(old_workers) == 2

        load = Load(port).start()
        began = time.monotonic()
        wait_until(lambda: load.count() >= 200 and time.monotonic() - began >= 1.5,
                   timeout=10, what="1.5 s of load")

        slow = [SlowRequest(port, f"r{i}", size=100_000) for i in range(4)]
        wait_until(lambda: all((app_dir / f"started-r{i}").exists() for i in range(4)),
                   timeout=10, what="the slow requests to be inside the old code")

        write_app(app_dir, "v2-reloaded")
        offset = server.log_size()
        server.signal("reload")
        server.wait_serving(b"v2-reloaded")

        # Every client moves to the new workers: its latest answer is the new code's.
        wait_until(lambda: load.latest() == [b"v2-reloaded"] * len(load.threads),
                   timeout=10, what="every client to be answered by the new code")
        switched = time.monotonic()
        # The old worker(s) holding the requests are still there, finishing them.
        assert all(r.result is None for r in slow)
        assert set(old_workers) & set(server.workers())

        (app_dir / "release").touch()
        for r in slow:
            result = r.join()
            assert not isinstance(result, Exception), f"slow request {r.name}: {result!r}"
            status, length, body = result
            assert status == 200
            assert body == b"slow v1" + padding(r.name, r.size)
            assert int(length) == len(body)

        before = load.count()
        wait_until(lambda: load.count() >= before + 300 and time.monotonic() - switched >= 1.5,
                   timeout=10, what="1.5 s more load after the switch")
        load.finish()

        bodies = load.assert_switched(b"v1", b"v2-reloaded", switched)
        assert bodies.count(b"v1") >= 100 and bodies.count(b"v2-reloaded") >= 300

        # The old workers exit once their requests are done, normally.
        wait_until(lambda: not set(old_workers) & set(server.workers()), timeout=10,
                   what="the old workers to exit")
        log = server.error_log(offset)
        for pid in old_workers:
            assert f"worker process {pid} exited with code 0" in log, log
        retried = [e for c in load.clients for e in c.retried]
        print(f"\n{len(load.results)} requests, {len(retried)} retried once after a reused "
              f"keep-alive connection was closed by an exiting worker: {retried}")
    finally:
        (app_dir / "release").touch()
        if load is not None:
            load.finish()
        server.stop()
    assert server.proc.returncode == 0
    assert_clean_log(server.error_log())


# --- 2. quit with requests in flight ----------------------------------------------------

def test_quit_finishes_requests_in_flight_then_exits(tmp_path):
    """`nginx -s quit` while four requests are inside Python: nginx stops accepting, waits
    for them, each gets its whole 256 KiB body, then every process exits cleanly."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    port = free_port()
    write_conf(tmp_path, port, app_location(app_dir), workers=2)
    server = Nginx(tmp_path, port)
    try:
        server.wait_serving(b"v1")
        slow = [SlowRequest(port, f"q{i}", size=256 * 1024) for i in range(4)]
        wait_until(lambda: all((app_dir / f"started-q{i}").exists() for i in range(4)),
                   timeout=10, what="the requests to be inside Python")

        server.signal("quit")

        def refused():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return False
            except (ConnectionRefusedError, ConnectionResetError):
                # A SYN that meets the listener as nginx closes it is answered with a reset:
                # not accepted either.
                return True
        wait_until(refused, timeout=10, what="nginx to stop accepting connections")
        # Not accepting, but still running: it waits for the requests held in Python.
        assert server.proc.poll() is None
        assert all(r.result is None for r in slow)

        (app_dir / "release").touch()
        for r in slow:
            result = r.join()
            assert not isinstance(result, Exception), f"request {r.name}: {result!r}"
            status, length, body = result
            assert status == 200
            assert int(length) == len(body) == len(b"slow v1") + 256 * 1024
            assert body == b"slow v1" + padding(r.name, r.size)
        server.proc.wait(timeout=15)
    finally:
        (app_dir / "release").touch()
        server.stop()
    assert server.proc.returncode == 0
    log = server.error_log()
    assert_clean_log(log)
    assert len(re.findall(r"worker process \d+ exited with code 0", log)) == 2, log
    assert log.rstrip().endswith("exit"), log


# --- 3. workers as an unprivileged user -------------------------------------------------

def test_nobody_workers_serve_when_python_is_readable(public_tmp):
    """`user nobody nogroup;` with the embedded Python and the app readable by everyone:
    `nginx -t` (which imports the app as nobody) passes, the workers run as nobody, serve,
    import extension modules, and pick up new code on reload."""
    wrapper, app_dir, prefix, port = public_site(public_tmp)
    write_conf(prefix, port, app_location(app_dir, threads=2), user="nobody nogroup")
    server = Nginx(prefix, port, wrapper)
    try:
        checked = server.check_config()
        assert checked.returncode == 0, checked.stderr
        assert "test is successful" in checked.stderr

        server.wait_serving(b"v1")
        workers = server.workers()
        assert len(workers) == 1
        status = Path(f"/proc/{workers[0]}/status").read_text()
        assert re.search(rf"^Uid:\s+{NOBODY_UID}\s+{NOBODY_UID}\s", status, re.M), status
        import json
        code, body = server.get("/whoami")
        assert code == 200, body
        assert json.loads(body) == {"version": "v1", "uid": NOBODY_UID, "gid": NOBODY_UID}

        write_app(app_dir, "v2-as-nobody")
        server.signal("reload")
        server.wait_serving(b"v2-as-nobody")
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert_clean_log(server.error_log())


def test_nobody_workers_without_a_readable_python_nginx_refuses_to_start(public_tmp):
    """The embedded Python is under /root (0700) and the workers would run as nobody: `nginx -t`
    fails naming the user and the path it cannot use, and nginx does not start at all (no
    worker is ever forked, so none can fail in a loop)."""
    if readable_by_nobody(embedded_libpython(MODULE)):
        pytest.skip("the embedded Python is readable by nobody here")
    app_dir = public_tmp / "app"
    app_dir.mkdir(mode=0o755)
    write_app(app_dir, "v1")
    prefix = public_tmp / "prefix"
    prefix.mkdir()
    port = free_port()
    write_conf(prefix, port, app_location(app_dir, threads=2), user="nobody nogroup")
    message = re.compile(
        r"\[emerg\] .*portico_app \"ver\" in \S+nginx\.conf:\d+: the app cannot be loaded: "
        r"cannot run (\S+) as the workers' user nobody \(uid 65534, nginx's `user` directive\) "
        r"to check the import: Permission denied")
    checked = nginx_t(prefix)
    assert checked.returncode != 0
    found = message.search(checked.stderr)
    assert found, checked.stderr
    assert not readable_by_nobody(found.group(1))
    assert "test failed" in checked.stderr

    started = subprocess.run([NGINX, "-p", str(prefix), "-c", "nginx.conf"],
                             capture_output=True, text=True, timeout=60)
    assert started.returncode == 1
    assert message.search(started.stderr), started.stderr
    log = prefix / "logs" / "error.log"
    assert not log.exists() or "start worker process" not in log.read_text()
    assert not _listening(port)


def test_worker_that_cannot_read_python_exits_once_instead_of_respawning(public_tmp):
    """The last line of defence, in the worker: `env PYTHONHOME=` (after the http block, where
    the configuration-time import check cannot see it) points the workers' Python at a
    directory nobody cannot read. Each worker logs which user and which path, exits with
    nginx's fatal code 2 and is not respawned; the master stays up and quits cleanly."""
    wrapper, app_dir, prefix, port = public_site(public_tmp)
    private = public_tmp / "private-python"
    (private / "lib").mkdir(parents=True)
    os.chmod(private, 0o700)
    write_conf(prefix, port, app_location(app_dir, threads=2), user="nobody nogroup",
               workers=2, after_http=f"env PYTHONHOME={private};")
    server = Nginx(prefix, port, wrapper)
    try:
        wait_until(lambda: len(re.findall(r"exited with fatal code 2 and cannot be respawned",
                                          server.error_log())) >= 2
                   or len(re.findall(r"start worker process \d+", server.error_log())) > 10,
                   timeout=20, what="both workers to exit")
        # A bounded look for respawns: a worker loop restarts ~100 workers a second.
        time.sleep(1.0)
        log = server.error_log()
        assert len(re.findall(r"start worker process \d+", log)) == 2, log[-3000:]
        assert len(re.findall(r"exited with fatal code 2 and cannot be respawned", log)) == 2
        emerg = re.findall(r"\[emerg\] \d+#\d+: portico: (.*)", log)
        assert len(emerg) == 2, log[-3000:]
        for line in emerg:
            assert f"user nobody (uid {NOBODY_UID})" in line, line
            assert f"{private}/lib/python3." in line, line
            assert "PYTHONHOME" in line, line
            assert "Permission denied" in line, line
        assert "Fatal Python error" not in log
        assert server.proc.poll() is None, "the master exited"
        assert server.workers() == []
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert "exited on signal" not in server.error_log()


def test_env_directives_reach_the_import_check_and_the_workers(public_tmp):
    """nginx gives its workers only the `env` variables: `nginx -t` imports the app with the
    same ones (set here, and inherited from the master's environment), so an app that reads
    its settings at import passes the test and serves them."""
    wrapper = python_view(public_tmp, MODULE)
    app_dir = public_tmp / "app"
    app_dir.mkdir(mode=0o755)
    (app_dir / "settings_app.py").write_text('''
import os
SETTING = os.environ["PORTICO_LC_SETTING"] + "/" + os.environ["PORTICO_LC_INHERITED"]

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [SETTING.encode()]
''')
    prefix = public_tmp / "prefix"
    prefix.mkdir()
    port = free_port()
    write_conf(prefix, port, f"""
        location / {{
            portico_app settings_app python_path={app_dir} threads=1;
        }}
""", user="nobody nogroup",
               before_http="env PORTICO_LC_SETTING=from-env-directive;\nenv PORTICO_LC_INHERITED;")
    env = {**os.environ, "PORTICO_LC_INHERITED": "from-master", "PORTICO_LC_SETTING": "wrong"}
    checked = nginx_t(prefix, wrapper, env)
    assert checked.returncode == 0, checked.stderr
    server = Nginx(prefix, port, wrapper, env=env)
    try:
        server.wait_serving(b"from-env-directive/from-master")
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert_clean_log(server.error_log())


def test_nginx_t_names_the_user_and_an_unreadable_pythonhome(public_tmp):
    """`env PYTHONHOME=` in the main context, where the import check sees it: `nginx -t`
    fails as the workers would, naming the user and the Python home."""
    wrapper, app_dir, prefix, port = public_site(public_tmp)
    private = public_tmp / "private-python"
    (private / "lib").mkdir(parents=True)
    os.chmod(private, 0o700)
    write_conf(prefix, port, app_location(app_dir, threads=1), user="nobody nogroup",
               before_http=f"env PYTHONHOME={private};")
    checked = nginx_t(prefix, wrapper)
    assert checked.returncode != 0
    assert "as the workers' user nobody (uid 65534" in checked.stderr, checked.stderr
    assert f"PYTHONHOME = '{private}'" in checked.stderr, checked.stderr
    assert "test failed" in checked.stderr


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


# --- 4. a reload to code that cannot be imported ----------------------------------------

BROKEN = {
    "syntax_error": ('VERSION = "v2\n', "SyntaxError: unterminated string literal"),
    "raises_at_import": ('raise RuntimeError("the database is down")\n',
                         "RuntimeError: the database is down"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_reload_to_an_app_that_cannot_be_imported_keeps_the_old_workers(tmp_path, kind):
    """v2 cannot be imported: `nginx -t` fails with the Python error; a reload anyway is
    refused by the master, whose old workers keep serving v1 under load; a fixed v3 then
    reloads fine."""
    source, error = BROKEN[kind]
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    write_app(app_dir, "v1")
    port = free_port()
    write_conf(tmp_path, port, app_location(app_dir, threads=2))
    server = Nginx(tmp_path, port)
    load = None
    try:
        server.wait_serving(b"v1")
        workers = server.workers()
        load = Load(port, threads=2).start()

        write_app(app_dir, None, source="# broken on purpose\n" + source)
        checked = server.check_config()
        assert checked.returncode != 0
        assert error in checked.stderr, checked.stderr
        assert f"{app_dir / 'ver.py'}" in checked.stderr, checked.stderr
        assert "the app cannot be loaded: importing `ver` failed" in checked.stderr
        assert "test failed" in checked.stderr

        offset = server.log_size()
        server.signal("reload")
        wait_until(lambda: error in server.error_log(offset), timeout=30,
                   what="the master to refuse the new configuration")
        log = server.error_log(offset)
        assert "reconfiguring" in log
        assert re.search(r"\[emerg\] .*portico_app \"ver\" in \S+: the app cannot be loaded", log)
        assert "start worker process" not in log
        assert server.workers() == workers
        count = load.count()
        wait_until(lambda: load.count() >= count + 100, timeout=10,
                   what="the old workers to keep serving")
        assert server.get("/") == (200, b"v1")
        load.finish()
        assert load.failures == [], load.failures[:20]
        assert {body for _, _, _, body in load.results} == {b"v1"}

        write_app(app_dir, "v3-fixed")
        server.signal("reload")
        server.wait_serving(b"v3-fixed")
    finally:
        if load is not None:
            load.finish()
        server.stop()
    assert server.proc.returncode == 0
    log = server.error_log()
    assert "open socket" not in log and "exited on signal" not in log, log
