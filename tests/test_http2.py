"""HTTP/2 and TLS: h2c with prior knowledge on the plain port (beside HTTP/1.1 and WebSocket),
h2 and HTTP/1.1 by ALPN on the TLS port. The same checks run over every protocol; HTTP/2-only
behaviour (multiplexing, trailers, stream resets) and TLS-only behaviour (ALPN, the `tls` scope
extension, wss) have tests of their own. The certificate is made at test time (trustme).

PORTICO_TEST_REFERENCE=uvicorn (zttp, HTTP/2), hypercorn or granian runs the same tests
against that server (see conftest.py)."""

import http.client
import json
import os
import socket
import ssl

import pytest
from websockets.sync.client import connect

from conftest import (FEATURES, SERVER_UNDER_TEST, VENV, H2Client, app_table, needs, read_all,
                      split_response)

HAS = FEATURES[SERVER_UNDER_TEST]

PROTOCOLS = {"h1": (), "h2c": ("h2c",), "h1-tls": ("tls",), "h2-tls": ("tls", "h2_tls")}


def protocol_params(names):
    return [pytest.param(name, marks=needs(*PROTOCOLS[name])) for name in names]


class Response:
    def __init__(self, status, headers, body, trailers=()):
        self.status = status
        self.headers = [(n.lower(), v) for n, v in headers]
        self.body = body
        self.trailers = list(trailers)

    def header(self, name):
        values = [v for n, v in self.headers if n == name]
        return values[0] if values else None


class Client:
    """One connection to the server in the given protocol, with a common request()."""

    def __init__(self, server, proto):
        self.server = server
        self.proto = proto
        self.tls = proto.endswith("-tls")
        self.http2 = proto.startswith("h2")
        self.port = server.tls_port if self.tls else server.port
        ctx = server.tls_files.client_context(("h2",) if self.http2 else ("http/1.1",)) \
            if self.tls else None
        if self.http2:
            self.h2 = H2Client(self.port, ctx)
        else:
            cls = http.client.HTTPSConnection if self.tls else http.client.HTTPConnection
            kw = {"context": ctx} if self.tls else {}
            self.h1 = cls("localhost" if self.tls else "127.0.0.1", self.port, timeout=15, **kw)

    def request(self, method, path, headers=(), body=None):
        if self.http2:
            r = self.h2.request(method, path, headers, body)
            assert r.reset is None, f"stream reset with {r.reset}"
            dec = lambda pairs: [(n.decode(), v.decode("latin-1")) for n, v in pairs]
            return Response(r.status, dec(r.headers), r.body, dec(r.trailers))
        self.h1.putrequest(method, path)
        for name, value in headers:  # repeated names stay repeated
            self.h1.putheader(name, value)
        if body is not None:
            self.h1.putheader("Content-Length", str(len(body)))
        self.h1.endheaders(body)
        resp = self.h1.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())

    def close(self):
        (self.h2 if self.http2 else self.h1).close()


def start_for(asgi_server, proto):
    """The probe app, with a TLS listener only when the protocol needs one."""
    return asgi_server("asgi_probe:app", tls=proto.endswith("-tls"), http2=True)


@pytest.fixture
def server(asgi_server):
    return asgi_server("asgi_probe:app", tls=True, http2=True)


@pytest.fixture(params=protocol_params(PROTOCOLS))
def client(request, asgi_server):
    c = Client(start_for(asgi_server, request.param), request.param)
    yield c
    c.close()


@pytest.fixture(params=protocol_params(["h2c", "h2-tls"]))
def h2(request, asgi_server):
    c = Client(start_for(asgi_server, request.param), request.param)
    yield c
    c.close()


def b(text):
    return {"bytes": text}


def scope_via(client, path="/scope/x?q=1", headers=()):
    r = client.request("GET", path, headers)
    assert r.status == 200, r.body
    return json.loads(r.body)["scope"]


# --- the same behaviour over every protocol ----------------------------------------------

def test_scope_over_each_protocol(client):
    scope = scope_via(client, "/scope/caf%C3%A9?q=1",
                      [("x-dup", "one"), ("accept", "text/plain"), ("x-dup", "two")])
    assert scope["type"] == "http"
    assert scope["http_version"] == ("2" if client.http2 else "1.1")
    assert scope["scheme"] == ("https" if client.tls else "http")
    assert scope["method"] == "GET"
    assert scope["path"] == "/scope/caf\u00e9"
    assert scope["raw_path"] == b("/scope/caf%C3%A9")
    assert scope["query_string"] == b("q=1")
    assert scope["server"] == ["127.0.0.1", client.port]
    assert scope["client"][0] == "127.0.0.1" and isinstance(scope["client"][1], int)
    names = [name["bytes"] for name, _ in scope["headers"]]
    values = {}
    for name, value in scope["headers"]:
        values.setdefault(name["bytes"], []).append(value["bytes"])
    assert values["x-dup"] == ["one", "two"]
    assert not any(n.startswith(":") for n in names)  # no pseudo-headers
    host = "localhost" if (client.tls and not client.http2) else "127.0.0.1"
    assert values["host"] == [f"{host}:{client.port}"]
    if client.http2:
        assert names[0] == "host"  # :authority becomes the first header, named host


@needs("portico")
@pytest.mark.parametrize("proto", protocol_params(PROTOCOLS))
def test_extensions_offered_match_the_connection(asgi_server, proto):
    c = Client(start_for(asgi_server, proto), proto)
    try:
        # TE: trailers, so that the trailers extension is usable where HTTP/2 allows it.
        scope = scope_via(c, headers=[("te", "trailers")])
    finally:
        c.close()
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    ext = scope["extensions"]
    assert ext["http.response.pathsend"] == {}
    assert ("http.response.trailers" in ext) == c.http2
    assert ("tls" in ext) == c.tls
    # 103 responses: HTTP/1.1 only (Pingora sends no 1xx on HTTP/2), where the host can.
    assert ("http.response.early_hint" in ext) == (not c.http2 and "early_hints" in HAS)
    assert set(ext) <= {"http.response.pathsend", "http.response.trailers", "tls",
                        "http.response.early_hint"}


@needs("portico", "trailers")
def test_trailers_offered_only_with_te_trailers(asgi_server):
    proto = "h2c" if "h2c" in HAS else "h2-tls"
    c = Client(start_for(asgi_server, proto), proto)
    try:
        assert "http.response.trailers" not in scope_via(c)["extensions"]
        assert "http.response.trailers" in scope_via(c, headers=[("te", "trailers")])["extensions"]
    finally:
        c.close()


@needs("portico")
def test_upgrade_h2c_is_answered_over_http11(asgi_server):
    server = asgi_server("asgi_probe:app")
    data = server.raw(b"GET /hello HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: Upgrade, HTTP2-Settings, close\r\n"
                      b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"Hello, world!")


def test_post_body_over_each_protocol(client):
    payload = os.urandom(1024 * 1024 + 7)  # well past HTTP/2's initial 64 KiB window
    r = client.request("POST", "/echo", [("content-type", "application/octet-stream")], payload)
    assert r.status == 200
    assert r.body == payload


def test_large_response_over_each_protocol(client):
    n = 3 * 1024 * 1024 + 11
    r = client.request("GET", f"/big?n={n}")
    assert r.status == 200
    assert len(r.body) == n
    assert r.header("content-length") == str(n)
    piece = 65536
    expected = b"".join(bytes([min(i + piece, n) % 251]) * min(piece, n - i)
                        for i in range(0, n, piece))
    assert r.body == expected


def test_head_over_each_protocol(client):
    r = client.request("HEAD", "/hello")
    assert r.status == 200
    assert r.header("content-length") == "13"
    assert r.body == b""
    assert client.request("GET", "/hello").body == b"Hello, world!"


def test_errors_over_each_protocol(client):
    assert client.request("GET", "/raise-before").status == 500
    assert client.request("GET", "/no-response").status == 500
    assert client.request("GET", "/hello").status == 200


@needs("pathsend")
def test_pathsend_over_each_protocol(client, tmp_path):
    data = os.urandom(200_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    r = client.request("GET", f"/pathsend?path={path}")
    assert (r.status, r.body) == (200, data)


def test_trailers_on_http2_only(client):
    r = client.request("GET", "/trailers", [("te", "trailers")])
    assert (r.status, r.body) == (200, b"part1;part2")
    if client.http2 and "trailers" in HAS:
        assert r.trailers == [("x-checksum", "abc123"), ("x-more", "later")]
    else:
        assert r.trailers == []


def test_early_hints_when_offered(client):
    scope = scope_via(client)
    if "http.response.early_hint" not in scope.get("extensions", {}):
        pytest.skip(f"early hints not offered on {client.proto}")
    if client.http2:
        r = client.h2.request("GET", "/early-hint")
        assert [s for s, _ in r.informational] == [103]
        assert (b"link", b"</style.css>; rel=preload; as=style") in r.informational[0][1]
        assert (r.status, r.body) == (200, b"hinted")
    else:
        # Raw bytes: http.client would take the 103 for the response.
        raw = socket.create_connection(("127.0.0.1", client.port), timeout=10)
        if client.tls:
            raw = client.server.tls_files.client_context().wrap_socket(
                raw, server_hostname="localhost")
        with raw:
            raw.sendall(b"GET /early-hint HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = read_all(raw)
        assert data.startswith(b"HTTP/1.1 103")
        assert b"link: </style.css>; rel=preload; as=style" in data.split(b"\r\n\r\n")[0].lower()
        assert b"HTTP/1.1 200" in data and data.endswith(b"hinted")


# --- HTTP/2 only -------------------------------------------------------------------------

def test_streams_are_multiplexed_on_one_connection(h2):
    c = h2.h2
    waiting = c.start("GET", "/wait?key=mux")
    # While the first stream waits, a second one on the same connection releases it.
    r = c.wait(c.start("GET", "/set?key=mux"))
    assert (r.status, r.body) == (200, b"set")
    r = c.wait(waiting)
    assert (r.status, r.body) == (200, b"released")
    ids = [c.start("POST", "/echo", body=b"stream %d" % i + os.urandom(20000)) for i in range(20)]
    bodies = {i: c.responses[i] for i in ids}
    for sid in ids:
        c.wait(sid)
    for i, sid in enumerate(ids):
        assert bodies[sid].status == 200
        prefix = b"stream %d" % i
        assert bodies[sid].body.startswith(prefix) and len(bodies[sid].body) == 20000 + len(prefix)


def test_streamed_response_arrives_piece_by_piece(h2):
    c = h2.h2
    sid = c.start("GET", "/stream?key=h2stream")
    r = c.responses[sid]
    while b"first;" not in r.body:
        assert not r.ended
        c._pump()
    assert b"second;" not in r.body
    assert c.wait(c.start("GET", "/release?key=h2stream")).body == b"set"
    c.wait(sid)
    assert r.body == b"first;second;third"


def test_stream_reset_is_a_disconnect_for_the_app(h2):
    c, server = h2.h2, h2.server
    sid = c.start("GET", "/disconnect")
    r = c.responses[sid]
    while b"waiting;" not in r.body:
        assert not r.ended
        c._pump()
    c.reset(sid)
    server.wait_for_log("probe: receive after the client left gave http.disconnect")
    # The connection itself goes on.
    assert c.wait(c.start("GET", "/hello")).body == b"Hello, world!"


@needs("trailers")
def test_trailers_reach_the_http2_client(h2):
    r = h2.request("GET", "/trailers", [("te", "trailers")])
    assert r.status == 200
    assert r.body == b"part1;part2"
    assert r.trailers == [("x-checksum", "abc123"), ("x-more", "later")]


@needs("trailers", "trailers_split")
def test_trailers_sent_in_two_messages_all_arrive(h2):
    # more_trailers=True: the server waits for the rest before ending the stream.
    r = h2.request("GET", "/trailers?split=1", [("te", "trailers")])
    assert (r.status, r.body) == (200, b"part1;part2")
    assert r.trailers == [("x-checksum", "abc123"), ("x-more", "later")]


@needs("trailers")
def test_no_trailers_without_te_trailers(h2):
    r = h2.request("GET", "/trailers")
    assert (r.status, r.body) == (200, b"part1;part2")
    assert r.trailers == []


# --- one plain port for HTTP/1.1, h2c and WebSocket --------------------------------------

@needs("h2c", "server_config")
def test_idle_http2_connection_is_closed_after_keepalive_timeout(asgi_server):
    """As nginx applies keepalive_timeout to HTTP/2: a connection with no stream open is not
    held for ever."""
    server = asgi_server("asgi_probe:app", http2=True, server_extra='keepalive_timeout = "1s"')
    c = H2Client(server.port, timeout=15)
    try:
        assert c.wait(c.start("GET", "/hello")).status == 200
        # Nothing more is sent: the server must end the connection well within the socket's
        # 15 s timeout (which would raise TimeoutError instead).
        with pytest.raises(ConnectionError):
            while True:
                c._pump()
    finally:
        c.close()


@needs("h2c")
def test_plain_port_serves_http1_h2c_and_websocket(asgi_server):
    server = asgi_server("asgi_ws:app", http2=True)
    status, _, body = server.get("/")
    assert (status, body) == (426, b"websocket only")
    c = H2Client(server.port)
    try:
        r = c.request("GET", "/")
        assert (r.status, r.body) == (426, b"websocket only")
    finally:
        c.close()
    with connect(f"ws://127.0.0.1:{server.port}/echo", open_timeout=10) as ws:
        ws.send("same port")
        assert ws.recv(timeout=10) == "same port"


# --- TLS ---------------------------------------------------------------------------------

def tls_socket(server, alpn):
    ctx = server.tls_files.client_context(alpn)
    raw = socket.create_connection(("127.0.0.1", server.tls_port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


@needs("tls", "h2_tls")
@pytest.mark.parametrize("offered,chosen", [
    (("h2", "http/1.1"), "h2"), (("http/1.1",), "http/1.1"), (None, None)])
def test_alpn_picks_the_protocol(server, offered, chosen):
    with tls_socket(server, offered) as s:
        assert s.selected_alpn_protocol() == chosen
        if chosen != "h2":
            # HTTP/1.1, with or without ALPN.
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            head, body = split_response(read_all(s))
            assert head.startswith(b"HTTP/1.1 200") and body == b"Hello, world!"


@needs("portico", "tls")
@pytest.mark.parametrize("proto", ["h1-tls", "h2-tls"])
def test_tls_scope_extension(server, proto):
    alpn = ("h2",) if proto == "h2-tls" else ("http/1.1",)
    with tls_socket(server, alpn) as s:
        version = {"TLSv1.3": 0x0304, "TLSv1.2": 0x0303}[s.version()]
        cipher_name = s.cipher()[0]
        ciphers = {c["name"]: c["id"] & 0xFFFF
                   for c in server.tls_files.client_context().get_ciphers()}
    # A second connection with the same settings negotiates the same version and suite.
    c = Client(server, proto)
    try:
        scope = scope_via(c)
    finally:
        c.close()
    tls = scope["extensions"]["tls"]
    assert ssl.PEM_cert_to_DER_cert(tls["server_cert"]) == \
        ssl.PEM_cert_to_DER_cert(server.tls_files.leaf_pem)
    assert tls["tls_version"] == version
    assert tls["cipher_suite"] == ciphers[cipher_name]
    assert list(tls.get("client_cert_chain", [])) == []
    assert tls.get("client_cert_name") is None
    assert tls.get("client_cert_error") is None


@needs("portico", "binary", "tls", "h2_tls")
def test_portico_run_with_tls_flags(asgi_server):
    server = asgi_server("asgi_probe:app", cli=True, tls=True)
    for proto in ("h1", "h1-tls", "h2-tls"):
        c = Client(server, proto)
        try:
            assert c.request("GET", "/hello").body == b"Hello, world!"
        finally:
            c.close()


@needs("portico", "wsgi", "mount")
@pytest.mark.parametrize("proto,protocol,scheme", [
    pytest.param(*case, marks=needs(*PROTOCOLS[case[0]])) for case in (
        ("h1", "HTTP/1.1", "http"), ("h2c", "HTTP/2", "http"), ("h1-tls", "HTTP/1.1", "https"),
        ("h2-tls", "HTTP/2", "https"))])
def test_wsgi_app_over_http2_and_tls(asgi_server, proto, protocol, scheme):
    wsgi = app_table("wsgi", "validated:application", mount="/w", python_home=str(VENV))
    server = asgi_server("asgi_probe:app", mount="/a", tls=proto.endswith("-tls"),
                         extra_apps=[wsgi])
    c = Client(server, proto)
    try:
        r = c.request("GET", "/w/environ")
        assert r.status == 200, r.body
        env = json.loads(r.body)
        assert env["SERVER_PROTOCOL"] == ["str", protocol]
        assert env["portico.http_version"] == ["str", protocol.split("/")[1]]
        assert env["wsgi.url_scheme"] == ["str", scheme]
        if scheme == "https":
            assert env["HTTPS"] == ["str", "on"]
            assert env["portico.tls_version"] in (["str", "TLSv1.3"], ["str", "TLSv1.2"])
            assert env["portico.tls_cipher"][0] == "str" and env["portico.tls_cipher"][1]
        else:
            assert "HTTPS" not in env and "portico.tls_version" not in env
        payload = os.urandom(300_000)
        r = c.request("POST", "/w/echo", body=payload)
        assert (r.status, r.body) == (200, payload)
        assert "AssertionError" not in server.log()  # the PEP 3333 validator is content
    finally:
        c.close()
