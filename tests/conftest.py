"""Harness for the integration tests: boots the real `portico` binary on ephemeral ports and
talks to it over loopback sockets. Readiness is polled with a deadline, never slept for.

PORTICO_TEST_HOST=nginx runs the same tests against the other host of Portico: Debian's nginx
(NGINX_BIN, default /usr/sbin/nginx) with the built module (PORTICO_NGINX_MODULE, default
target/release/ngx_http_portico_module.so, made by scripts/nginx-module.sh), serving the same
portico.toml through an nginx.conf made from it (see `NginxServer`)."""

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
BINARY = Path(os.environ.get("PORTICO_BIN", ROOT / "target" / "release" / "portico"))
VENV = Path(os.environ.get("PORTICO_VENV", ROOT / ".venv"))
NGINX = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
NGINX_MODULE = Path(os.environ.get("PORTICO_NGINX_MODULE",
                                   ROOT / "target" / "release" / "ngx_http_portico_module.so"))

# The host under test: "portico" (the binary) or "nginx" (nginx with the module). Both are
# Portico; what nginx as a front end cannot offer is in FEATURES["nginx"] below.
HOST = os.environ.get("PORTICO_TEST_HOST", "").strip().lower() or "portico"
if HOST not in ("portico", "nginx"):
    raise RuntimeError(f"PORTICO_TEST_HOST={HOST!r}: use portico or nginx")


_ports_given = set()


def free_port():
    """A port free now and never given before in this session: two asked for in a row (a
    plain and a TLS listener) are never the same one, which the kernel may hand out twice
    once the probing socket is closed."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def wait_until(predicate, timeout=15.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Server:
    """A running server process with a log we can read."""

    # Every server started in this session, oldest first: a failed test's report ends with
    # their logs (see pytest_runtest_makereport).
    started = []

    def __init__(self, argv, tmp_path, port, env=None, **popen):
        Server.started.append(self)
        self.argv = argv
        self.port = port
        self.out_path = tmp_path / f"server-{port}.out"
        self.err_path = tmp_path / f"server-{port}.err"
        self.proc = subprocess.Popen(
            argv,
            stdout=open(self.out_path, "wb"),
            stderr=open(self.err_path, "wb"),
            env={**os.environ, **(env or {})},
            **{"cwd": tmp_path, **popen},
        )

    def wait_ready(self, timeout=20.0):
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc.returncode}:\n{self.stderr()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False
        wait_until(up, timeout, what=f"port {self.port}")
        return self

    def stdout(self):
        return self.out_path.read_text(errors="replace")

    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def log(self):
        return self.stdout() + self.stderr()

    def wait_for_log(self, text, timeout=10.0):
        wait_until(lambda: text in self.log(), timeout, what=f"log line {text!r}")

    def connection(self, timeout=10.0):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, timeout=10.0):
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def raw(self, data, timeout=10.0, until_closed=True):
        """Sends raw bytes and returns everything read until the server closes (or until the
        timeout, which fails the test)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            return read_all(s) if until_closed else s.recv(65536)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# A failed test shows what its servers logged: a flake on a CI machine is then read from the
# report, not guessed at. The servers are those started during the test, and those of wider
# fixtures still running (function fixtures are torn down only after the report).
LOG_TAIL = 8000
_first_server_of_test = 0


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _first_server_of_test
    _first_server_of_test = len(Server.started)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or report.when == "teardown":
        return
    for index, server in enumerate(Server.started):
        if index < _first_server_of_test and server.proc.poll() is not None:
            continue
        try:
            log = server.log()
        except OSError as e:
            log = f"(unreadable: {e})"
        state = "running" if server.proc.poll() is None else f"exited {server.proc.returncode}"
        title = f"log of {Path(server.argv[0]).name} on port {server.port} ({state})"
        if len(log) > LOG_TAIL:
            log = f"[... {len(log) - LOG_TAIL} characters before ...]\n" + log[-LOG_TAIL:]
        report.sections.append((title, log or "(empty)"))


def read_all(sock):
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_until(sock, marker):
    """Reads until `marker` has arrived; returns all that was read. The server closing first
    (or the socket's timeout) fails the test."""
    got = b""
    while marker not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk
    return got


def split_response(raw):
    """Splits a raw HTTP/1.1 response into (head bytes, body bytes), undoing chunked
    transfer coding."""
    head, body = raw.split(b"\r\n\r\n", 1)
    if b"transfer-encoding: chunked" not in head.lower():
        return head, body
    out = b""
    while True:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return head, out
        out += body[:size]
        body = body[size + 2:]


# PORTICO_TEST_MODE=pool runs every app of the tests in a pool of one worker process instead
# of in-process: the same cases against the pool's transport.
POOL_MODE = os.environ.get("PORTICO_TEST_MODE", "").strip().lower() == "pool"


def status_kib(pid, field="VmRSS"):
    """A size from /proc/PID/status (VmRSS, VmHWM...), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def fill_connection_queue(path):
    """Connects to the Unix socket at `path`, without waiting, until its listener's queue of
    pending connections is full. Returns the sockets, to be closed by the caller."""
    queued = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            return queued
        queued.append(s)
        assert len(queued) < 70000, "the queue never filled"


def app_table(name, target, mount="/", **extra):
    lines = ["[[app]]", f'name = "{name}"', f'target = "{target}"', f'mount = "{mount}"',
             f'python_path = ["{APPS}"]']
    if POOL_MODE and "mode" not in extra:
        extra = {"mode": "pool", "processes": 1, **extra}
    for key, value in extra.items():
        if isinstance(value, str):
            value = f'"{value}"'
        elif isinstance(value, bool):
            value = str(value).lower()
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def portico(tmp_path):
    """Starts `portico serve` (or nginx, see HOST) with the given [[app]] tables; stops it after
    the test."""
    started = []

    def start(*apps, server_extra="", env=None, wait=True):
        port = free_port()
        config = tmp_path / f"portico-{port}.toml"
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\n{server_extra}\n' + "\n".join(apps))
        if HOST == "nginx":
            server = NginxServer.for_config(config, tmp_path, env)
        else:
            server = Server([str(BINARY), "serve", "--config", str(config)], tmp_path, port, env)
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def run_portico(tmp_path):
    """Runs the binary to completion (for commands that must fail before serving)."""

    def run(*args, timeout=30):
        return subprocess.run([str(BINARY), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=tmp_path)

    return run


# --- ASGI, WebSocket, HTTP/2 and TLS -----------------------------------------------------
# PORTICO_TEST_REFERENCE=uvicorn (or hypercorn, granian) makes the `asgi_server` fixture start
# that server instead of portico, with the equivalent flags, so the tests themselves can be
# proved right against a known-good server. A test that needs what the reference cannot do is
# skipped there, with the reason (see `needs`).

REFERENCE = os.environ.get("PORTICO_TEST_REFERENCE", "").strip().lower()
if REFERENCE and HOST != "portico":
    raise RuntimeError("PORTICO_TEST_REFERENCE and PORTICO_TEST_HOST=nginx do not go together")
SERVER_UNDER_TEST = REFERENCE or HOST

# What each server can be asked to do. "portico" marks behaviour that only Portico's own
# interface defines (its config, its exit codes, the exact ASGI spec version and extensions
# it promises); the other names are ASGI/HTTP features a reference may or may not have.
_COMMON = {"asgi", "ws", "lifespan", "lifespan_state", "tls", "ws_denial", "ws_over_tls"}
# Features of the host rather than of the ASGI server: a reference stands in for the
# `asgi_server` fixture only, so with one these are still the portico binary's (see `needs`).
#   binary         the `portico` executable itself: its command line (`portico run/check`,
#                  `cli=True`, `run_portico`), exit codes, signals, its own log lines (startup,
#                  access log)
#   server_config  the `[server]` table's tuning (keepalive_timeout, graceful_timeout, ...)
HOST_FEATURES = {"binary", "server_config"}
FEATURES = {
    "portico": _COMMON | HOST_FEATURES | {
        "portico", "mount", "wsgi", "h2c", "h2_tls", "trailers", "trailers_split", "pathsend",
        "ws_deflate", "ws_deflate_off", "ws_max_size", "ws_close_code", "disconnect_oserror",
        "loop_choice", "lifespan_off", "lifespan_fail", "early_hints"},
    # uvicorn 0.54's own HTTP/2 (--http zttp --http2) gives a GET without a body
    # http.disconnect instead of http.request, so HTTP/2 is checked against hypercorn and
    # granian instead. Its HTTP send() after a disconnect returns quietly (no OSError).
    "uvicorn": _COMMON | {
        "ws_deflate", "ws_deflate_off", "ws_max_size", "ws_close_code", "loop_choice",
        "lifespan_off", "lifespan_fail"},
    # hypercorn 0.18 sends only the first of several trailers messages, exits 0 after
    # lifespan.startup.failed, and gives the app 1006 instead of the client's close code.
    "hypercorn": _COMMON | {"h2c", "h2_tls", "trailers", "ws_deflate"},
    "granian": _COMMON | {"h2c", "h2_tls", "pathsend", "loop_choice"},
}
# nginx with the module is Portico (on_portico holds): everything of the binary's except what
# nginx as a front end cannot offer. Only what nginx itself rules out belongs here, not what
# the module does not do yet: those tests run, and fail until it does.
NGINX_CANNOT = {
    "binary": "the host process is nginx: the `portico` command line, its exit codes, signals "
              "and log lines are not there (nginx's own are)",
    "server_config": "nginx ignores the [server] table; its own directives (listen, "
                     "keepalive_timeout, worker_shutdown_timeout, ...) do that",
    "h2c": "nginx 1.22 speaks HTTP/2 with prior knowledge only on a port of its own "
           "(`listen ... http2` serves no HTTP/1.1), not beside HTTP/1.1 and WebSocket",
    "early_hints": "nginx 1.22 has no way to send a 1xx response before the final one (103 "
                   "Early Hints came with nginx 1.29)",
    "lifespan_fail": "nginx's master binds the ports and outlives its workers: a failed "
                     "lifespan startup ends the worker (not respawned), not the server, and "
                     "there is no exit code 70",
}
FEATURES["nginx"] = FEATURES["portico"] - set(NGINX_CANNOT)
if SERVER_UNDER_TEST not in FEATURES:
    raise RuntimeError(f"PORTICO_TEST_REFERENCE={REFERENCE!r}: use one of {sorted(FEATURES)}")


def needs(*features):
    """Marks a test that needs these features of the server under test; skipped (with the
    reason) when a reference server, or nginx, stands in and lacks one. HOST_FEATURES are
    asked of the host (the portico binary unless PORTICO_TEST_HOST=nginx)."""
    missing = [f for f in features
               if f not in FEATURES[HOST if f in HOST_FEATURES else SERVER_UNDER_TEST]]
    if SERVER_UNDER_TEST == "nginx":
        why = "; ".join(f"{f}: {NGINX_CANNOT[f]}" for f in missing)
    else:
        why = ", ".join(missing)
    return pytest.mark.skipif(bool(missing), reason=f"{SERVER_UNDER_TEST} cannot check: {why}")


def on_portico(value_for_portico, value_for_reference):
    """Where Portico promises something exact that a reference only approximates (an exit
    code, a version string), the expected value for the server under test."""
    return value_for_reference if REFERENCE else value_for_portico


def on_host(value_for_binary, value_for_nginx):
    """Where Portico's two hosts legitimately differ (nginx answers a request itself, runs
    several worker processes, names itself), the expected value for the host under test."""
    return value_for_nginx if HOST == "nginx" else value_for_binary


def wait_port(port, timeout=20.0, proc=None):
    def up():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False
    wait_until(up, timeout, what=f"port {port}")


class AsgiServer(Server):
    """A server under test for ASGI apps: `port` is the plain listener, `tls_port` the TLS one
    (when asked for). A reference that cannot serve both from one process gets a second
    process for TLS; its log is part of `log()` and it is stopped with the first."""

    def __init__(self, argv, tmp_path, port, env=None, tls_port=None, **popen):
        super().__init__(argv, tmp_path, port, env, **popen)
        self.tls_port = tls_port
        self.others = []

    def wait_ready(self, timeout=20.0):
        super().wait_ready(timeout)
        if self.tls_port:
            # Listeners are bound together: once the plain one is up, the TLS one is not slow.
            wait_port(self.tls_port, 5.0, self.proc)
        for other in self.others:
            other.wait_ready(timeout)
        return self

    def log(self):
        return super().log() + "".join(other.log() for other in self.others)

    def stop(self, sig=signal.SIGINT, timeout=10):
        for other in self.others:
            other.stop()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def rss_kib(self, field="VmRSS"):
        """The server's resident memory (or `VmHWM`, its peak) from /proc, in KiB."""
        return status_kib(self.proc.pid, field)


# --- nginx with the module as the host -----------------------------------------------------

def nginx_conf(prefix, port, locations, *, http="", tls=None, env=()):
    """Writes `prefix`/nginx.conf: nginx loads the module and serves `locations` (nginx text)
    on 127.0.0.1:`port`, plus `tls` = (port, certificate, key) with HTTP/2 by ALPN. Logs, pid
    and temporary files stay in `prefix`; `env` names variables the workers keep (nginx clears
    the rest). Returns the file's path."""
    for d in ("logs", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    # The workers must be able to read the embedded Python (pyenv's lives under /root).
    user = "user root;" if os.geteuid() == 0 else ""
    keep = "".join(f"env {name};\n" for name in env)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / name};"
        for kind, name in (("client_body", "body"), ("proxy", "proxy"),
                           ("fastcgi", "fastcgi"), ("uwsgi", "uwsgi"), ("scgi", "scgi")))
    listen = f"        listen 127.0.0.1:{port};"
    if tls:
        tls_port, certificate, key = tls
        # As [server.tls]: HTTP/2 and HTTP/1.1 by ALPN, TLS 1.2 and 1.3.
        listen += (f"\n        listen 127.0.0.1:{tls_port} ssl http2;"
                   f"\n        ssl_certificate {certificate};"
                   f"\n        ssl_certificate_key {key};"
                   f"\n        ssl_protocols TLSv1.2 TLSv1.3;")
    path = prefix / "nginx.conf"
    path.write_text(f"""load_module {NGINX_MODULE.resolve()};
{user}
daemon off;
master_process on;
worker_processes 1;
error_log {prefix / "logs" / "error.log"} info;
pid {prefix / "logs" / "nginx.pid"};
{keep}
events {{ worker_connections 1024; }}
http {{
    access_log {prefix / "logs" / "access.log"};
    # The apps' own max_body_size is the limit under test (nginx's default would be 1m).
    client_max_body_size 0;
{temp_paths}
    portico_pool_binary {BINARY.resolve()};
{http}
    server {{
{listen}
        # Answered by the worker once init_process has loaded the apps (NginxServer.wait_ready).
        location = {NginxServer.READY_PATH} {{ return 204; }}
{locations}
    }}
}}
""")
    return path


def nginx_locations(apps):
    """nginx locations serving [[app]] tables by name at their mounts, with Portico's mount
    rule: a mount serves itself and what is below it at a segment boundary (`/api` serves
    `/api` and `/api/x`, not `/apix`), and a path under no mount is 404."""
    out = []
    mounts = set()
    for app in apps:
        mount = app.get("mount", "/").rstrip("/") or "/"
        mounts.add(mount)
        if mount == "/":
            out.append(f"        location / {{ portico_pass {app['name']}; }}")
        else:
            out.append(f"""        location {mount} {{
            portico_pass {app['name']};
            location ~ "^{re.escape(mount)}[^/]" {{ return 404; }}
        }}""")
    if "/" not in mounts:
        out.append("        location / { return 404; }")
    return "\n".join(out)


class NginxServer(AsgiServer):
    """nginx (master and one worker) running `prefix`/nginx.conf. `log()` is nginx's error log
    (where the workers' stderr goes too), `stop()` is `nginx -s quit`."""

    READY_PATH = "/.portico-test-ready"

    def __init__(self, prefix, port, env=None, tls_port=None):
        self.prefix = prefix
        self.error_log_path = prefix / "logs" / "error.log"
        # A session of its own, so that a master that must be killed takes its worker along.
        super().__init__([NGINX, "-p", str(prefix), "-c", "nginx.conf"], prefix, port, env,
                         tls_port, start_new_session=True)

    @classmethod
    def for_config(cls, config, tmp_path, env=None):
        """Serves the portico.toml `config` as `portico serve` would: its [server] listen and
        [server.tls] become nginx's listeners, each [[app]] a location with `portico_pass`."""
        parsed = tomllib.loads(config.read_text())
        server = parsed.get("server", {})
        port = int(server["listen"][0].rsplit(":", 1)[1])
        tls = server.get("tls")
        tls_port = int(tls["listen"][0].rsplit(":", 1)[1]) if tls else None
        prefix = tmp_path / f"nginx-{port}"
        nginx_conf(prefix, port, nginx_locations(parsed.get("app", [])),
                   http=f"    portico_config {config.resolve()};",
                   tls=(tls_port, tls["certificate"], tls["key"]) if tls else None,
                   env=sorted(env or {}))
        return cls(prefix, port, env, tls_port)

    def error_log(self):
        return self.error_log_path.read_text(errors="replace") \
            if self.error_log_path.exists() else ""

    def log(self):
        # The master's own output first: what nginx says before the error log is open.
        return self.stderr() + self.stdout() + self.error_log()

    def wait_ready(self, timeout=30.0):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self.proc.returncode}:\n{self.log()}")
            if "cannot be respawned" in self.error_log():
                raise AssertionError(f"nginx's worker could not start:\n{self.log()}")
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1.0)
            try:
                conn.request("GET", self.READY_PATH)
                return conn.getresponse().status == 204
            except OSError:
                return False
            finally:
                conn.close()
        wait_until(ready, timeout, what=f"nginx's worker to answer on port {self.port}")
        if self.tls_port:
            wait_port(self.tls_port, 5.0, self.proc)
        return self

    def stop(self, sig=None, timeout=10):
        """`nginx -s quit` (graceful), or the signal `sig` for the master; kills the master
        and its worker after `timeout`. Returns the master's exit code."""
        if self.proc.poll() is None:
            if sig is None:
                done = subprocess.run([NGINX, "-p", str(self.prefix), "-c", "nginx.conf",
                                       "-s", "quit"], capture_output=True, timeout=30)
                if done.returncode != 0 and self.proc.poll() is None:
                    self.proc.send_signal(signal.SIGQUIT)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def worker_pids(self):
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def rss_kib(self, field="VmRSS"):
        """The worker's resident memory (or `VmHWM`, its peak), in KiB: the worker holds the
        apps and the connections, the master neither."""
        pids = self.worker_pids()
        assert pids, f"nginx master {self.proc.pid} has no worker"
        return sum(status_kib(pid, field) for pid in pids)


def serve_config(config, tmp_path, port, env=None, tls_port=None):
    """Serves a portico.toml with the host under test: `portico serve --config`, or nginx
    with the module (PORTICO_TEST_HOST=nginx). Not yet waited for."""
    if HOST == "nginx":
        return NginxServer.for_config(config, tmp_path, env)
    return AsgiServer([str(BINARY), "serve", "--config", str(config)], tmp_path, port, env,
                      tls_port)


class TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""

    def __init__(self, directory):
        import trustme
        from cryptography.hazmat.primitives import serialization

        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert_path = directory / "cert.pem"
        self.key_path = directory / "key.pem"
        self.ca_path = directory / "ca.pem"
        leaf.cert_chain_pems[0].write_to_path(str(self.cert_path))
        for extra in leaf.cert_chain_pems[1:]:
            extra.write_to_path(str(self.cert_path), append=True)
        # PKCS#8, the one key format every server here reads.
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        self.key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.leaf_pem = leaf.cert_chain_pems[0].bytes().decode()

    def client_context(self, alpn=("http/1.1",)):
        import ssl
        ctx = ssl.create_default_context(cafile=str(self.ca_path))
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        return ctx


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    return TlsFiles(tmp_path_factory.mktemp("tls"))


def asgi_table(name, target, mount="/", **extra):
    """An [[app]] table for an ASGI app from tests/apps (with the venv's packages)."""
    return app_table(name, target, mount, interface="asgi", python_home=str(VENV), **extra)


def size_bytes(size):
    """A Portico size ("16M", "64K", 1024) in bytes."""
    if isinstance(size, int):
        return size
    units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def _reference_argv(target, port, tls, tls_files, opts):
    """The command line that makes the reference server serve `target` like Portico would."""
    lifespan, loop = opts["lifespan"], opts["loop"]
    deflate, max_size = opts["ws_deflate"], opts["ws_max_size"]
    if REFERENCE == "uvicorn":
        argv = [str(VENV / "bin" / "uvicorn"), target, "--interface", "asgi3", "--host",
                "127.0.0.1", "--port", str(port), "--app-dir", str(APPS), "--lifespan", lifespan,
                "--loop", loop, "--ws", os.environ.get("PORTICO_TEST_UVICORN_WS", "websockets"),
                "--timeout-graceful-shutdown", "3"]
        if deflate is not None:
            argv += ["--ws-per-message-deflate", str(deflate).lower()]
        if max_size is not None:
            argv += ["--ws-max-size", str(size_bytes(max_size))]
        if tls:
            argv += ["--ssl-certfile", str(tls_files.cert_path),
                     "--ssl-keyfile", str(tls_files.key_path)]
        return argv
    if REFERENCE == "granian":
        argv = [str(VENV / "bin" / "granian"), "--interface",
                "asginl" if lifespan == "off" else "asgi", "--host", "127.0.0.1", "--port",
                str(port), "--working-dir", str(APPS), "--loop", loop, "--http", "auto",
                "--no-ws" if opts["no_ws"] else "--ws"]
        if tls:
            argv += ["--ssl-certificate", str(tls_files.cert_path),
                     "--ssl-keyfile", str(tls_files.key_path)]
        return argv + [target]
    raise AssertionError(REFERENCE)


@pytest.fixture
def asgi_server(request, tmp_path):
    """Starts an ASGI app from tests/apps and returns an `AsgiServer`; stops it after the test.

    start(target, mount="/", tls=False, http2=False, lifespan="auto", loop="auto",
          ws_deflate=None, ws_max_size=None, extra_apps=(), server_extra="", env=None,
          wait=True, cli=False)

    Portico gets a portico.toml (or, with cli=True, `portico run` flags); a reference server
    named by PORTICO_TEST_REFERENCE gets its own equivalent flags. `extra_apps` are further
    [[app]] tables (e.g. a WSGI app beside the ASGI one): Portico only."""
    started = []

    def start(target, *, mount="/", tls=False, http2=False, lifespan="auto", loop="auto",
              ws_deflate=None, ws_max_size=None, extra_apps=(), server_extra="", env=None,
              wait=True, cli=False, no_ws=False):
        port = free_port()
        tls_port = free_port() if tls else None
        tls_files = request.getfixturevalue("tls_files") if tls else None
        opts = dict(lifespan=lifespan, loop=loop, ws_deflate=ws_deflate, ws_max_size=ws_max_size,
                    http2=http2, no_ws=no_ws)
        if REFERENCE:
            if extra_apps or mount != "/":
                pytest.skip(f"{REFERENCE} cannot check Portico's mounts and mixed apps")
            # server_extra is Portico tuning (e.g. graceful_timeout): no reference equivalent.
            if REFERENCE == "hypercorn":
                # --insecure-bind only counts beside a TLS --bind.
                argv = [str(VENV / "bin" / "hypercorn"),
                        "--insecure-bind" if tls else "--bind", f"127.0.0.1:{port}"]
                if tls:
                    argv += ["--bind", f"127.0.0.1:{tls_port}", "--certfile",
                             str(tls_files.cert_path), "--keyfile", str(tls_files.key_path)]
                if loop == "uvloop":
                    argv += ["--worker-class", "uvloop"]
                server = AsgiServer(argv + [target], tmp_path, port,
                                    {"PYTHONPATH": str(APPS), **(env or {})}, tls_port)
            else:
                server = AsgiServer(_reference_argv(target, port, False, tls_files, opts),
                                    tmp_path, port, {"PYTHONPATH": str(APPS), **(env or {})})
                if tls:
                    other = AsgiServer(_reference_argv(target, tls_port, True, tls_files, opts),
                                       tmp_path, tls_port,
                                       {"PYTHONPATH": str(APPS), **(env or {})})
                    server.others.append(other)
                    server.tls_port = tls_port
        elif cli:
            assert HOST == "portico", "a test with cli=True needs('binary')"
            argv = [str(BINARY), "run", target, "--interface", "asgi", "--bind",
                    f"127.0.0.1:{port}", "--python-path", str(APPS), "--python-home", str(VENV),
                    "--loop", loop, "--lifespan", lifespan]
            if tls:
                argv += ["--tls-bind", f"127.0.0.1:{tls_port}", "--tls-certificate",
                         str(tls_files.cert_path), "--tls-key", str(tls_files.key_path)]
            server = AsgiServer(argv, tmp_path, port, env, tls_port)
        else:
            extra = {"loop": loop, "lifespan": lifespan}
            if ws_deflate is not None:
                extra["websocket_per_message_deflate"] = ws_deflate
            if ws_max_size is not None:
                extra["websocket_max_message_size"] = ws_max_size
            text = f'[server]\nlisten = ["127.0.0.1:{port}"]\n{server_extra}\n'
            if tls:
                text += (f'[server.tls]\nlisten = ["127.0.0.1:{tls_port}"]\n'
                         f'certificate = "{tls_files.cert_path}"\nkey = "{tls_files.key_path}"\n')
            text += "\n" + asgi_table("asgi", target, mount, **extra) + "\n" + "\n".join(extra_apps)
            config = tmp_path / f"portico-{port}.toml"
            config.write_text(text)
            server = serve_config(config, tmp_path, port, env, tls_port)
        server.tls_files = tls_files
        started.append(server)
        return server.wait_ready() if wait else server

    yield start
    for server in started:
        server.stop()


class H2Response:
    def __init__(self):
        self.status = None
        self.headers = []     # [(bytes name, bytes value)] without pseudo-headers
        self.body = b""
        self.trailers = []
        self.ended = False
        self.reset = None     # the RST_STREAM error code, if the server reset the stream
        self.informational = []  # (status, headers) of 1xx responses, e.g. 103 Early Hints

    def header(self, name):
        values = [v.decode("latin-1") for n, v in self.headers if n == name.encode()]
        return values[0] if values else None


class H2Client:
    """A small HTTP/2 client over one connection (h2c with prior knowledge, or h2 over TLS
    with ALPN), with the `h2` package's frame-level state machine: several streams may be open
    at once, and trailers and resets are visible."""

    def __init__(self, port, tls_context=None, timeout=10.0, authority=None):
        import h2.config
        import h2.connection

        self.timeout = timeout
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_hostname="localhost")
            assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
        self.sock = sock
        self.scheme = "https" if tls_context is not None else "http"
        self.authority = authority or f"127.0.0.1:{port}"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.responses = {}
        self.closed = False
        self._flush()

    def _flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump(self):
        """Reads once from the socket and applies the events."""
        import h2.events as ev

        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            raise ConnectionError("server closed the HTTP/2 connection")
        for event in self.conn.receive_data(data):
            r = self.responses.get(getattr(event, "stream_id", None))
            if isinstance(event, ev.ResponseReceived):
                for name, value in event.headers:
                    if name == b":status":
                        r.status = int(value)
                    else:
                        r.headers.append((name, value))
            elif isinstance(event, ev.InformationalResponseReceived):
                status = int(dict(event.headers)[b":status"])
                r.informational.append(
                    (status, [(n, v) for n, v in event.headers if not n.startswith(b":")]))
            elif isinstance(event, ev.DataReceived):
                r.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, ev.TrailersReceived):
                r.trailers.extend(event.headers)
            elif isinstance(event, ev.StreamEnded):
                r.ended = True
            elif isinstance(event, ev.StreamReset):
                if r is not None:
                    r.reset = event.error_code
                    r.ended = True
            elif isinstance(event, ev.ConnectionTerminated):
                self.closed = True
        self._flush()

    def start(self, method, path, headers=(), body=None, end=True):
        """Opens a stream; sends the body too when given. Returns the stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.responses[stream_id] = H2Response()
        pseudo = [(b":method", method.encode()), (b":scheme", self.scheme.encode()),
                  (b":authority", self.authority.encode()), (b":path", path.encode())]
        hdrs = pseudo + [(n.lower().encode() if isinstance(n, str) else n,
                          v.encode() if isinstance(v, str) else v) for n, v in headers]
        self.conn.send_headers(stream_id, hdrs, end_stream=end and body is None)
        self._flush()
        if body is not None:
            self.send_body(stream_id, body, end=end)
        return stream_id

    def send_body(self, stream_id, body, end=True):
        """Sends body bytes within the flow-control windows the server grants."""
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(stream_id),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                self._pump()
                continue
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
            self._flush()
        if end:
            self.conn.end_stream(stream_id)
            self._flush()

    def reset(self, stream_id):
        self.conn.reset_stream(stream_id)
        self._flush()

    def wait(self, stream_id, timeout=None):
        """Reads until the stream has ended; returns its H2Response."""
        deadline = time.monotonic() + (timeout or self.timeout)
        r = self.responses[stream_id]
        while not r.ended:
            if time.monotonic() > deadline:
                raise AssertionError(f"stream {stream_id} did not end in time")
            self._pump()
        return r

    def wait_headers(self, stream_id):
        r = self.responses[stream_id]
        deadline = time.monotonic() + self.timeout
        while r.status is None and not r.ended:
            if time.monotonic() > deadline:
                raise AssertionError(f"no headers on stream {stream_id}")
            self._pump()
        return r

    def request(self, method, path, headers=(), body=None):
        return self.wait(self.start(method, path, headers, body))

    def close(self):
        try:
            self.conn.close_connection()
            self._flush()
        except OSError:
            pass
        self.sock.close()


# --- apps run as `nobody` ---------------------------------------------------------------

NOBODY_UID = 65534


def readable_by_nobody(path):
    return subprocess.run(["test", "-r", str(path)], user=NOBODY_UID,
                          group=NOBODY_UID).returncode == 0


def embedded_libpython(binary):
    """The libpython that `binary` (a portico binary or the nginx module) links."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    found = re.search(r"libpython\S*\s+=>\s+(\S+)", out)
    assert found, f"{binary} links no libpython:\n{out}"
    return Path(found.group(1))


def python_view(base, binary):
    """argv prefix that runs a command in a private mount namespace where the Python that
    `binary` embeds (under /root, unreadable to `nobody`) is readable by every user at its
    own paths; [] when it already is."""
    libpython = embedded_libpython(binary)
    if readable_by_nobody(libpython):
        return []
    parts = libpython.parts
    if parts[:2] != ("/", "root") or len(parts) < 4:
        pytest.skip(f"the embedded Python ({libpython}) is unreadable to nobody and not under /root")
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private mount namespace")
    top = Path("/root") / parts[2]                      # e.g. /root/.pyenv
    view = base / "rootview"
    (view / parts[2]).mkdir(parents=True)
    os.chmod(view, 0o755)
    os.chmod(view / parts[2], 0o755)
    script = (f"set -e; mount --rbind '{top}' '{view / parts[2]}'; "
              f"mount --rbind '{view}' /root; exec \"$@\"")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


@pytest.fixture
def public_tmp():
    """A temporary directory `nobody` can read (pytest's tmp_path is under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="portico-public-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
