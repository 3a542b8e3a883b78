"""Harness for the integration tests: boots the real `portico` binary on ephemeral ports and
talks to it over loopback sockets. Readiness is polled with a deadline, never slept for."""

import http.client
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
BINARY = Path(os.environ.get("PORTICO_BIN", ROOT / "target" / "release" / "portico"))
VENV = Path(os.environ.get("PORTICO_VENV", ROOT / ".venv"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    def __init__(self, argv, tmp_path, port, env=None):
        self.port = port
        self.out_path = tmp_path / f"server-{port}.out"
        self.err_path = tmp_path / f"server-{port}.err"
        self.proc = subprocess.Popen(
            argv,
            stdout=open(self.out_path, "wb"),
            stderr=open(self.err_path, "wb"),
            env={**os.environ, **(env or {})},
            cwd=tmp_path,
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


def read_all(sock):
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


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


def app_table(name, target, mount="/", **extra):
    lines = ["[[app]]", f'name = "{name}"', f'target = "{target}"', f'mount = "{mount}"',
             f'python_path = ["{APPS}"]']
    for key, value in extra.items():
        if isinstance(value, str):
            value = f'"{value}"'
        elif isinstance(value, bool):
            value = str(value).lower()
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def portico(tmp_path):
    """Starts `portico serve` with the given [[app]] tables; stops it after the test."""
    started = []

    def start(*apps, server_extra="", env=None, wait=True):
        port = free_port()
        config = tmp_path / f"portico-{port}.toml"
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\n{server_extra}\n' + "\n".join(apps))
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
