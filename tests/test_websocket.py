"""WebSockets through ASGI: the handshake (subprotocols, extra headers, denial), messages both
ways, fragmentation, ping/pong, closing codes and reasons, permessage-deflate and the size
limit, seen by a real client (the `websockets` package) against tests/apps/asgi_ws.py.

PORTICO_TEST_REFERENCE=uvicorn runs the same tests against uvicorn (see conftest.py)."""

import asyncio
import json
import os
import ssl
import threading

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.asyncio.client import connect as async_connect
from websockets.sync.client import connect

from conftest import REFERENCE, needs


@pytest.fixture
def ws_server(asgi_server):
    return asgi_server("asgi_ws:app")


def url(server, path):
    return f"ws://127.0.0.1:{server.port}{path}"


def ws_connect(server, path, **kw):
    kw.setdefault("open_timeout", 10)
    kw.setdefault("close_timeout", 10)
    kw.setdefault("max_size", None)
    return connect(url(server, path), **kw)


def b(text):
    return {"bytes": text}


def log_line(server, start):
    server.wait_for_log(start)
    return next(line for line in server.log().splitlines() if start in line)


# --- the handshake and the scope ---------------------------------------------------------

def test_websocket_scope(ws_server):
    with ws_connect(ws_server, "/scope/caf%C3%A9?x=1&y=%20", subprotocols=["chat.v1", "chat.v2"],
                    additional_headers=[("X-Dup", "one"), ("X-Dup", "two")],
                    compression=None) as ws:
        local = ws.socket.getsockname()
        scope = json.loads(ws.recv(timeout=10))
    assert scope["type"] == "websocket"
    assert scope["asgi"]["version"] == "3.0"
    assert scope.get("http_version", "1.1") == "1.1"
    assert scope["scheme"] == "ws"
    assert scope["path"] == "/scope/caf\u00e9"
    assert scope["raw_path"] == b("/scope/caf%C3%A9")
    assert scope["query_string"] == b("x=1&y=%20")
    assert scope["root_path"] == ""
    assert scope["subprotocols"] == ["chat.v1", "chat.v2"]
    headers = {}
    for name, value in scope["headers"]:
        headers.setdefault(name["bytes"], []).append(value["bytes"])
    assert headers["x-dup"] == ["one", "two"]
    assert headers["upgrade"] == ["websocket"]
    assert headers["sec-websocket-version"] == ["13"]
    assert headers["sec-websocket-protocol"] in (["chat.v1, chat.v2"], ["chat.v1", "chat.v2"])
    assert "sec-websocket-key" in headers
    assert scope["client"] == [local[0], local[1]]
    assert scope["server"] == ["127.0.0.1", ws_server.port]
    assert "websocket.http.response" in scope["extensions"]


@needs("portico")
def test_websocket_scope_spec_version_and_extensions(ws_server):
    with ws_connect(ws_server, "/scope") as ws:
        scope = json.loads(ws.recv(timeout=10))
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.5"}
    assert scope["http_version"] == "1.1"
    assert scope["extensions"] == {"websocket.http.response": {}}


def test_accept_with_subprotocol_and_extra_headers(ws_server):
    with ws_connect(ws_server, "/echo", subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.response.status_code == 101
        assert ws.subprotocol == "chat.v2"
        assert ws.response.headers["Sec-WebSocket-Protocol"] == "chat.v2"
        assert ws.response.headers["X-WS-App"] == "asgi_ws"
        assert ws.response.headers["Set-Cookie"] == "ws=1"
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"


def test_no_subprotocol_when_the_app_picks_none(ws_server):
    with ws_connect(ws_server, "/echo", subprotocols=["other"]) as ws:
        assert ws.subprotocol is None
        assert "Sec-WebSocket-Protocol" not in ws.response.headers


def test_close_before_accept_is_403(ws_server):
    with pytest.raises(InvalidStatus) as info:
        ws_connect(ws_server, "/reject")
    assert info.value.response.status_code == 403


@needs("ws_denial")
def test_denial_response_from_the_app(ws_server):
    with pytest.raises(InvalidStatus) as info:
        ws_connect(ws_server, "/deny")
    response = info.value.response
    assert response.status_code == 401
    assert response.headers["X-Denied"] == "yes"
    assert response.body == b"denied by the app"


def test_app_error_before_accept_is_500(ws_server):
    with pytest.raises(InvalidStatus) as info:
        ws_connect(ws_server, "/raise-before-accept")
    assert info.value.response.status_code == 500
    ws_server.wait_for_log("ws app fails before accept (on purpose)")


def test_app_error_after_accept_closes_with_1011(ws_server):
    with ws_connect(ws_server, "/raise-after-accept") as ws:
        ws.send("go")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    ws_server.wait_for_log("ws app fails after accept (on purpose)")
    if REFERENCE == "uvicorn" and info.value.rcvd is None:
        return  # uvicorn drops the TCP connection (1006 for the client); hypercorn sends 1011
    assert info.value.rcvd is not None and info.value.rcvd.code == 1011


@needs("portico")
def test_websocket_handshake_over_http10_is_400(ws_server):
    data = ws_server.raw(b"GET /echo HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert data.split(b" ")[1] == b"400"


# --- messages ----------------------------------------------------------------------------

def test_text_and_binary_echo(ws_server):
    with ws_connect(ws_server, "/echo") as ws:
        ws.send("hello, \u00e9t\u00e9 \U0001f600")
        assert ws.recv(timeout=10) == "hello, \u00e9t\u00e9 \U0001f600"
        data = os.urandom(1024 * 1024)
        ws.send(data)
        got = ws.recv(timeout=20)
        assert isinstance(got, bytes) and got == data
        ws.send(b"")
        assert ws.recv(timeout=10) == b""
        ws.send("")
        assert ws.recv(timeout=10) == ""


def test_many_messages_keep_their_order(ws_server):
    with ws_connect(ws_server, "/echo") as ws:
        for i in range(200):
            ws.send(f"m{i}" if i % 2 else b"b%d" % i)
        got = [ws.recv(timeout=10) for _ in range(200)]
    assert got == [f"m{i}" if i % 2 else b"b%d" % i for i in range(200)]


def test_fragmented_messages_arrive_whole(ws_server):
    with ws_connect(ws_server, "/echo") as ws:
        ws.send(["frag-one;", "frag-two;", "\u00e9nd"])
        assert ws.recv(timeout=10) == "frag-one;frag-two;\u00e9nd"
        ws.send([b"\x00\x01", b"\x02" * 70000, b"\x03"])
        assert ws.recv(timeout=10) == b"\x00\x01" + b"\x02" * 70000 + b"\x03"


def test_server_answers_ping_with_pong(ws_server):
    with ws_connect(ws_server, "/echo") as ws:
        pong = ws.ping(b"are you there")
        assert pong.wait(10)
        ws.send("still open")
        assert ws.recv(timeout=10) == "still open"


def test_concurrent_connections(ws_server):
    errors, results = [], {}

    def client(i):
        try:
            with ws_connect(ws_server, "/echo") as ws:
                for j in range(20):
                    ws.send(f"{i}:{j}")
                    assert ws.recv(timeout=10) == f"{i}:{j}"
                results[i] = True
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 20


# --- closing -----------------------------------------------------------------------------

def test_app_closes_with_code_and_reason(ws_server):
    with ws_connect(ws_server, "/echo") as ws:
        ws.send("close-me")
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye")


def test_app_closes_right_after_accept(ws_server):
    with ws_connect(ws_server, "/server-close") as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye")


@needs("ws_close_code")
def test_client_close_code_and_reason_reach_the_app(ws_server):
    with ws_connect(ws_server, "/echo") as ws:
        ws.send("x")
        assert ws.recv(timeout=10) == "x"
        ws.close(4002, "client-bye")
    line = log_line(ws_server, "ws: disconnect")
    # Spec 2.5: websocket.disconnect carries the reason as well as the code.
    assert line.endswith("disconnect code=4002 reason='client-bye' has_reason=True"), line


@needs("disconnect_oserror")
def test_send_after_client_close_raises_an_oserror(ws_server):
    with ws_connect(ws_server, "/echo") as ws:
        ws.close(1000)
    line = log_line(ws_server, "ws: send after disconnect")
    assert "raised" in line and line.endswith("oserror=True"), line


def test_dropped_connection_is_1006_for_the_app(ws_server):
    ws = ws_connect(ws_server, "/echo")
    ws.send("x")
    assert ws.recv(timeout=10) == "x"
    ws.socket.close()  # no closing handshake
    line = log_line(ws_server, "ws: disconnect")
    assert "code=1006" in line, line


# --- permessage-deflate and limits -------------------------------------------------------

@needs("ws_deflate")
def test_permessage_deflate_negotiated_when_offered(ws_server):
    with ws_connect(ws_server, "/echo", compression="deflate") as ws:
        assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        text = "compressible " * 100_000
        ws.send(text)
        assert ws.recv(timeout=20) == text
        data = bytes(range(256)) * 4096
        ws.send(data)
        assert ws.recv(timeout=20) == data


def test_no_extension_when_the_client_offers_none(ws_server):
    with ws_connect(ws_server, "/echo", compression=None) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        ws.send("plain")
        assert ws.recv(timeout=10) == "plain"


@needs("ws_deflate_off")
def test_permessage_deflate_can_be_switched_off(asgi_server):
    server = asgi_server("asgi_ws:app", ws_deflate=False)
    with ws_connect(server, "/echo", compression="deflate") as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        ws.send("still works")
        assert ws.recv(timeout=10) == "still works"


@needs("ws_max_size")
def test_message_over_the_size_limit_closes_with_1009(asgi_server):
    server = asgi_server("asgi_ws:app", ws_max_size="64K")
    with ws_connect(server, "/echo", compression=None) as ws:
        ws.send(b"a" * 60000)
        assert ws.recv(timeout=10) == b"a" * 60000
        ws.send(b"a" * 100_000)
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


# --- mounts and TLS ----------------------------------------------------------------------

@needs("portico", "mount")
def test_websocket_under_a_mount(asgi_server):
    server = asgi_server("asgi_ws:app", mount="/live")
    with ws_connect(server, "/live/scope") as ws:
        scope = json.loads(ws.recv(timeout=10))
    assert (scope["root_path"], scope["path"]) == ("/live", "/live/scope")
    with ws_connect(server, "/live/echo") as ws:
        ws.send("mounted")
        assert ws.recv(timeout=10) == "mounted"


@needs("tls", "ws_over_tls")
def test_wss_on_the_tls_port(asgi_server):
    # websockets' asyncio client, not its sync one: the sync client reads on a thread of its
    # own while it sends the upgrade request, and one Python SSL socket used by two threads
    # at once can lose data (OpenSSL forbids it). Measured against nginx: when TLS 1.3
    # session tickets arrived at that moment, 6 of 2500 sync handshakes went unanswered
    # (nginx never got the request: "client timed out while waiting for request"), 0 of
    # 1200 with TLS 1.2, and 0 of 1300 with the asyncio client.
    server = asgi_server("asgi_ws:app", tls=True)
    ctx = server.tls_files.client_context(alpn=None)
    url = f"wss://localhost:{server.tls_port}"

    async def talk():
        async with async_connect(f"{url}/scope", ssl=ctx, open_timeout=10) as ws:
            scope = json.loads(await asyncio.wait_for(ws.recv(), 10))
        async with async_connect(f"{url}/echo", ssl=ctx, open_timeout=10) as ws:
            await ws.send(b"secure")
            echoed = await asyncio.wait_for(ws.recv(), 10)
        return scope, echoed
    scope, echoed = asyncio.run(talk())
    assert echoed == b"secure"
    assert scope["scheme"] == "wss"
    assert scope["server"][1] == server.tls_port
    if not REFERENCE:
        tls = scope["extensions"]["tls"]
        assert ssl.PEM_cert_to_DER_cert(tls["server_cert"]) == \
            ssl.PEM_cert_to_DER_cert(server.tls_files.leaf_pem)
        assert tls["tls_version"] in (0x0303, 0x0304)


# --- regressions found in review ----------------------------------------------------------

def test_receive_under_a_timeout_loses_no_message(ws_server):
    with ws_connect(ws_server, "/heartbeat") as ws:
        assert ws.recv(timeout=10) == "idle 0"
        ws.send("hello")
        replies = []
        while not replies or replies[-1].startswith("idle"):
            replies.append(ws.recv(timeout=10))
    assert replies[-1] == "got hello", replies
    assert not any(r.startswith("error") for r in replies), replies


@needs("portico")
def test_receive_after_the_apps_own_close_reports_that_close(ws_server):
    with ws_connect(ws_server, "/close-then-receive") as ws:
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
    assert info.value.rcvd.code == 4000
    line = log_line(ws_server, "ws: after own close")
    assert line.endswith("websocket.disconnect code=4000"), line


@needs("binary")
def test_sigterm_closes_open_websockets_with_1012_at_once(asgi_server):
    """uvicorn closes its WebSockets with 1012 (service restart) when it stops, so clients
    reconnect at once; Pingora alone cut them without a close frame when graceful_timeout
    ran out. The app hears the same code."""
    import signal
    server = asgi_server("asgi_ws:app", server_extra='graceful_timeout = "60s"')
    with ws_connect(server, "/echo") as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=20)
    assert closed.value.rcvd is not None, closed.value
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, "service restart")
    # Well before the 60 s of graceful_timeout.
    assert server.proc.wait(30) == 0
    assert "ws: disconnect code=1012 reason='service restart'" in server.log()
