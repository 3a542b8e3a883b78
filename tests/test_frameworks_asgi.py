"""Real ASGI frameworks (FastAPI, Starlette, Django's asgi.py) served by Portico (the binary, or
nginx with PORTICO_TEST_HOST=nginx) and by uvicorn side by side: a user moving from uvicorn must
see the same responses and WebSocket messages.

With PORTICO_TEST_REFERENCE set, a second uvicorn stands in for Portico."""

import json
import os
import socket
from pathlib import Path

import pytest
from websockets.sync.client import connect

from conftest import (APPS, REFERENCE, VENV, AsgiServer, free_port, read_until, serve_config,
                      wait_until)
# The Django project generator and the browser-like admin login of the WSGI framework tests.
from test_frameworks import admin_session_and_css, django_project  # noqa: F401 - django_project is a fixture


def uvicorn(tmp, target, app_dir):
    port = free_port()
    return AsgiServer([str(VENV / "bin" / "uvicorn"), target, "--interface", "asgi3", "--host",
                       "127.0.0.1", "--port", str(port), "--app-dir", str(app_dir),
                       "--lifespan", "auto", "--ws", "websockets"], tmp, port).wait_ready()


def portico_asgi(tmp, target, python_path):
    if REFERENCE:
        return uvicorn(tmp, target, python_path)
    port = free_port()
    config = tmp / f"portico-{port}.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n\n[[app]]\nname = "app"\n'
                      f'target = "{target}"\ninterface = "asgi"\npython_path = ["{python_path}"]\n'
                      f'python_home = "{VENV}"\n')
    return serve_config(config, tmp, port).wait_ready()


@pytest.fixture(scope="module")
def pair_factory(tmp_path_factory):
    started = []

    def start(target, python_path=APPS):
        tmp = tmp_path_factory.mktemp(target.split(".")[0].split(":")[0])
        pair = (portico_asgi(tmp, target, python_path), uvicorn(tmp, target, python_path))
        started.extend(pair)
        return pair

    yield start
    for server in started:
        server.stop()


def same(pair, method, path, body=None, headers=None,
         compare=("Content-Type", "Content-Length", "Location")):
    """Makes the request of both servers; asserts they answer alike; returns Portico's answer."""
    portico, reference = pair
    got = portico.request(method, path, body=body, headers=headers)
    want = reference.request(method, path, body=body, headers=headers)
    assert got[0] == want[0], (got, want)
    assert got[2] == want[2]
    for name in compare:
        assert got[1].get(name) == want[1].get(name), name
    return got


def same_ws(pair, path, messages, **kw):
    answers = []
    for server in pair:
        with connect(f"ws://127.0.0.1:{server.port}{path}", open_timeout=10, **kw) as ws:
            got = []
            for message in messages:
                ws.send(message)
                got.append(ws.recv(timeout=10))
            answers.append(got)
    assert answers[0] == answers[1]
    return answers[0]


# --- FastAPI -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fastapi_pair(pair_factory):
    return pair_factory("fastapi_app:app")


def test_fastapi_root_docs_and_openapi(fastapi_pair):
    assert json.loads(same(fastapi_pair, "GET", "/")[2]) == {"hello": "fastapi"}
    status, headers, page = same(fastapi_pair, "GET", "/docs")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"swagger-ui" in page and b"/openapi.json" in page
    status, _, spec = same(fastapi_pair, "GET", "/openapi.json")
    spec = json.loads(spec)
    assert spec["info"]["title"] == "Portico test API"
    assert set(spec["paths"]) >= {"/", "/items", "/items/{item_id}", "/state"}


def test_fastapi_json_body_through_a_pydantic_model(fastapi_pair):
    body = json.dumps({"name": "lamp", "price": 10.5, "tags": ["home"]})
    status, headers, out = same(fastapi_pair, "POST", "/items", body=body, headers={
        "Content-Type": "application/json", "X-Request-Id": "req-7"})
    assert status == 201 and headers["Content-Type"] == "application/json"
    assert json.loads(out) == {"item": {"name": "lamp", "price": 10.5, "tags": ["home"]},
                               "total": 12.6, "request_id": "req-7"}


@pytest.mark.parametrize("body", [json.dumps({"name": "", "price": -1}), "{not json",
                                  json.dumps({"price": "ten"})])
def test_fastapi_validation_errors_are_422(fastapi_pair, body):
    status, _, out = same(fastapi_pair, "POST", "/items", body=body,
                          headers={"Content-Type": "application/json"})
    assert status == 422
    assert json.loads(out)["detail"]


def test_fastapi_path_and_query_parameters(fastapi_pair):
    assert json.loads(same(fastapi_pair, "GET", "/items/42?q=x")[2]) == {"item_id": 42, "q": "x"}
    status, _, out = same(fastapi_pair, "GET", "/items/forty-two")
    assert status == 422 and json.loads(out)["detail"][0]["loc"] == ["path", "item_id"]
    status, _, out = same(fastapi_pair, "GET", "/nowhere")
    assert (status, json.loads(out)) == (404, {"detail": "Not Found"})


def test_fastapi_lifespan_state(fastapi_pair):
    assert json.loads(same(fastapi_pair, "GET", "/state")[2]) == {"greeting": "set at startup"}


def test_fastapi_websocket(fastapi_pair):
    got = same_ws(fastapi_pair, "/ws", [json.dumps({"a": 1}), json.dumps({"b": [1, 2], "c": None})])
    assert [json.loads(m) for m in got] == [{"echo": {"a": 1}, "count": 1},
                                            {"echo": {"b": [1, 2], "c": None}, "count": 2}]


# --- Starlette ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def starlette_pair(pair_factory):
    return pair_factory("starlette_app:app")


def test_starlette_routes(starlette_pair):
    assert same(starlette_pair, "GET", "/")[2] == b"Hello from Starlette"
    out = json.loads(same(starlette_pair, "GET", "/users/ada?x=1&y=%C3%A9")[2])
    assert out == {"name": "ada", "query": {"x": "1", "y": "\u00e9"}}
    status, headers, _ = same(starlette_pair, "GET", "/old")
    assert (status, headers["Location"]) == (301, "/users/moved")
    assert same(starlette_pair, "GET", "/missing")[0] == 404
    assert same(starlette_pair, "DELETE", "/form")[0] == 405


def test_starlette_form(starlette_pair):
    status, _, out = same(starlette_pair, "POST", "/form", body="name=ada&tag=x&tag=y",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert json.loads(out) == {"fields": {"name": ["ada"], "tag": ["x", "y"]}}


def test_starlette_streaming_response(starlette_pair):
    status, headers, body = same(starlette_pair, "GET", "/stream")
    assert status == 200 and body == b"".join(b"line %d\n" % i for i in range(5))
    assert headers["Content-Length"] is None  # streamed, chunked


def test_starlette_event_stream_sends_its_head_at_once_and_stops_when_the_client_leaves(
        starlette_pair):
    """An SSE endpoint whose first event is slow to come: the client gets the head at once
    (EventSource's `open`), and when it leaves, the waiting generator is stopped instead of
    waiting for ever, as under uvicorn; leaving is not an error in the log."""
    for server in starlette_pair:
        # In /tmp, which the apps can write whatever user they run as.
        marker = Path("/tmp") / f"portico-test-events-{os.getpid()}-{server.port}"
        marker.unlink(missing_ok=True)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(f"GET /events?marker={marker} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head = read_until(s, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head, head
        wait_until(marker.exists, what=f"the event generator stopped ({server.port})")
        marker.unlink()
    if not REFERENCE:
        log = starlette_pair[0].log()
        assert "exception in ASGI app" not in log and "without completing" not in log, log


def test_starlette_file_response(starlette_pair):
    status, headers, body = same(starlette_pair, "GET", "/file",
                                 compare=("Content-Type", "Content-Length", "ETag",
                                          "Last-Modified"))
    assert status == 200 and body == (APPS / "starlette_app.py").read_bytes()


def test_starlette_lifespan_state(starlette_pair):
    assert json.loads(same(starlette_pair, "GET", "/state")[2]) == {
        "greeting": "hello from lifespan"}


def test_starlette_websocket(starlette_pair):
    assert same_ws(starlette_pair, "/ws", ["hello", "\u00e9t\u00e9"]) == ["HELLO", "\u00c9T\u00c9"]


# --- Django (asgi.py) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def django_pair(pair_factory, django_project):  # noqa: F811 - the imported fixture
    return pair_factory("mysite.asgi:application", django_project)


def test_django_asgi_admin_login_with_csrf_and_static_css(
        django_pair, django_project):  # noqa: F811 - the imported fixture
    results = {name: admin_session_and_css(server, name)
               for name, server in zip(("portico", "uvicorn"), django_pair)}
    on_disk = (django_project / "static" / "admin" / "css" / "base.css").read_bytes()
    assert results["portico"] == results["uvicorn"] == (200, 'text/css; charset="utf-8"', on_disk)


def test_django_asgi_errors_match(django_pair):
    status, _, _ = same(django_pair, "POST", "/admin/login/", body="username=admin&password=x",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 403
    assert same(django_pair, "GET", "/no/such/page")[0] == 404
