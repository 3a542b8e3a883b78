"""The nginx module's vertical slice, end to end: Debian's nginx loads the built
ngx_http_portico_module.so and serves the fixture WSGI apps of tests/apps/.

Builds nothing: run scripts/nginx-module.sh first (it prints the .so's path), then
    .venv/bin/pytest nginx-module/tests/test_nginx_slice.py
PORTICO_NGINX_MODULE names the .so (default: target/release/ngx_http_portico_module.so),
NGINX_BIN the nginx (default: /usr/sbin/nginx). Readiness is polled with a deadline."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# One nginx launcher for these tests and for the host-neutral suite (PORTICO_TEST_HOST=nginx).
sys.path.insert(0, str(ROOT / "tests"))
from conftest import (APPS, NGINX, NGINX_MODULE, NginxServer, free_port,  # noqa: E402
                      nginx_conf, wait_until)

pytestmark = pytest.mark.skipif(
    not NGINX_MODULE.is_file() or not os.access(NGINX, os.X_OK),
    reason="needs the built module (scripts/nginx-module.sh) and nginx")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    nginx_conf(prefix, port, f"""
        location / {{
            portico_app validated:application python_path={APPS};
        }}
        location /bad/ {{
            portico_app misbehaving python_path={APPS} threads=2;
        }}
""")
    server = NginxServer(prefix, port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
    log = server.error_log()
    assert "open socket" not in log, log
    assert "exited on signal" not in log, log


def test_get_hello(nginx):
    status, headers, body = nginx.request("GET", "/hello")
    assert status == 200
    assert body == b"Hello, world!"
    assert headers["Content-Type"] == "text/plain"


def test_post_echo_64k_round_trips(nginx):
    payload = os.urandom(64 * 1024)
    status, _, body = nginx.request("POST", "/echo", body=payload,
                                    headers={"Content-Type": "application/octet-stream"})
    assert status == 200
    assert body == payload


def test_mount_splits_script_name_and_path_info(nginx):
    status, _, body = nginx.request("GET", "/environ/a%20b?x=1")
    assert status == 200
    import json
    environ = json.loads(body)
    assert environ["SCRIPT_NAME"] == ["str", ""]
    assert environ["PATH_INFO"] == ["str", "/environ/a b"]
    assert environ["QUERY_STRING"] == ["str", "x=1"]
    assert environ["wsgi.multiprocess"] == ["bool", True]


def test_app_that_raises_gives_500_and_traceback_in_error_log(nginx):
    status, _, _ = nginx.request("GET", "/bad/raise")
    assert status == 500
    wait_until(lambda: "ValueError: the app fails on purpose" in nginx.error_log(),
               timeout=5, what="the traceback in nginx's error log")
    assert "Traceback (most recent call last)" in nginx.error_log()


def test_concurrent_requests_all_complete(nginx):
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        payload = b"%d;" % i * 100
        return nginx.request("POST", "/echo", body=payload)[2] == payload

    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(300)))


SLOW_APP = """
import os, time

def application(environ, start_response):
    seconds = float(environ.get("QUERY_STRING") or 0)
    if seconds:
        open(os.path.join(os.path.dirname(__file__), "started"), "w").close()
    time.sleep(seconds)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slept"]
"""


def test_graceful_quit_waits_for_a_request_in_python(tmp_path):
    """The request's timer keeps an exiting worker alive until Python has answered."""
    import threading

    (tmp_path / "slow.py").write_text(SLOW_APP)
    port = free_port()
    nginx_conf(tmp_path, port, f"""
        location / {{
            portico_app slow python_path={tmp_path};
        }}
""")
    server = NginxServer(tmp_path, port)
    try:
        server.wait_ready()
        assert server.request("GET", "/?0")[0] == 200
        result = {}
        client = threading.Thread(
            target=lambda: result.setdefault("r", server.request("GET", "/?1.0")))
        client.start()
        # Quit only once the request is inside Python.
        wait_until(lambda: (tmp_path / "started").exists(), what="the app to start")
        server.stop()
        client.join(10)
        assert result["r"][0] == 200 and result["r"][2] == b"slept"
    finally:
        server.stop()
    assert "open socket" not in server.error_log()


def test_nginx_t_rejects_a_bad_target(tmp_path):
    conf = nginx_conf(tmp_path, free_port(), f"""
        location / {{
            portico_app validated:no_such_callable python_path={APPS};
        }}
""")
    result = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "module `validated` has no attribute `no_such_callable`" in result.stderr
    assert "test failed" in result.stderr


def test_nginx_t_rejects_an_unimportable_module(tmp_path):
    conf = nginx_conf(tmp_path, free_port(), f"""
        location / {{
            portico_app broken_import python_path={APPS};
        }}
""")
    result = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "importing `broken_import`" in result.stderr
    assert "Traceback" in result.stderr


def test_nginx_t_rejects_bad_syntax(tmp_path):
    conf = nginx_conf(tmp_path, free_port(), """
        location / {
            portico_app not-a-module:app;
        }
""")
    result = subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert 'invalid app "not-a-module:app"' in result.stderr


def write_toml(directory, text):
    path = directory / "portico.toml"
    path.write_text(text)
    return path


TWO_APPS = f"""
[[app]]
name = "site"
target = "validated:application"
mount = "/ignored/"
python_path = ["{APPS}"]
threads = 2

[[app]]
name = "hello"
target = "hello:app"
python_path = ["{ROOT / "bench" / "apps"}"]
"""


def test_portico_pass_serves_two_apps_of_a_toml(tmp_path):
    import json

    toml = write_toml(tmp_path, TWO_APPS)
    port = free_port()
    conf = nginx_conf(tmp_path, port, f"""
        location /site/ {{
            portico_pass site;
        }}
        location /greet/ {{
            portico_pass hello;
        }}
        location /short/ {{
            portico_app validated:application python_path={APPS};
        }}
""")
    # portico_config is http-level, before the servers.
    text = conf.read_text().replace("http {", f"http {{\n    portico_config {toml};", 1)
    conf.write_text(text)
    server = NginxServer(tmp_path, port)
    try:
        server.wait_ready()
        status, _, body = server.request("GET", "/greet/anything")
        assert (status, body) == (200, b"Hello, world!")

        status, _, body = server.request("GET", "/site/hello")
        assert (status, body) == (200, b"Hello, world!")
        status, _, body = server.request("GET", "/site/environ/x?y=1")
        assert status == 200
        environ = json.loads(body)
        assert environ["SCRIPT_NAME"] == ["str", "/site"]
        assert environ["PATH_INFO"] == ["str", "/environ/x"]

        # A portico_app short form is loaded with them, in the same interpreter.
        status, _, body = server.request("GET", "/short/environ")
        assert status == 200
        assert json.loads(body)["SCRIPT_NAME"] == ["str", "/short"]
    finally:
        server.stop()
    assert "open socket" not in server.error_log()


def _nginx_t(tmp_path, toml_text, locations):
    conf = nginx_conf(tmp_path, free_port(), locations)
    if toml_text is not None:
        toml = write_toml(tmp_path, toml_text)
        conf.write_text(conf.read_text().replace(
            "http {", f"http {{\n    portico_config {toml};", 1))
    return subprocess.run([NGINX, "-t", "-p", str(tmp_path), "-c", str(conf)],
                          capture_output=True, text=True, timeout=60)


def test_nginx_t_rejects_an_unknown_app_name(tmp_path):
    result = _nginx_t(tmp_path, TWO_APPS, """
        location / {
            portico_pass nosuch;
        }
""")
    assert result.returncode != 0
    assert 'portico_pass "nosuch": no app named "nosuch"' in result.stderr
    assert "(known: site, hello)" in result.stderr
    assert "test failed" in result.stderr


def test_nginx_t_reports_toml_errors_with_file_line_and_key(tmp_path):
    result = _nginx_t(tmp_path, """
[[app]]
name = "site"
target = "validated:application"
threads = 0
""", """
        location / {
            portico_pass site;
        }
""")
    assert result.returncode != 0
    assert f"{tmp_path / 'portico.toml'}:5: app[0].threads: must be at least 1" in result.stderr
    assert "[emerg]" in result.stderr
    assert "test failed" in result.stderr


def test_nginx_t_rejects_portico_pass_without_portico_config(tmp_path):
    result = _nginx_t(tmp_path, None, """
        location / {
            portico_pass site;
        }
""")
    assert result.returncode != 0
    assert 'portico_pass "site": no portico_config before it' in result.stderr
