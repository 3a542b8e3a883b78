"""ASGI 3 over HTTP/1.x (HTTP & WebSocket spec 2.5, lifespan 2.0): the scope an app is given,
request and response bodies, errors, disconnects, backpressure and lifespan, through the
fixture app tests/apps/asgi_probe.py.

PORTICO_TEST_REFERENCE=uvicorn runs the same tests against uvicorn (see conftest.py)."""

import json
import os
import signal
import socket
import threading
import time

import pytest

from conftest import (FEATURES, SERVER_UNDER_TEST, VENV, app_table, needs, on_portico, read_all,
                      read_until, split_response, wait_until)


@pytest.fixture
def probe(asgi_server):
    return asgi_server("asgi_probe:app")


def b(text):
    """How the probe app shows a byte string."""
    return {"bytes": text}


def get_json(server, path, **kw):
    status, _, body = server.request("GET", path, **kw)
    assert status == 200, body
    return json.loads(body)


def raw_exchange(server, request):
    """Sends one raw request on a fresh connection; returns (head, body, local address)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        local = s.getsockname()
        s.sendall(request)
        head, body = split_response(read_all(s))
    return head, body, local


def header_values(headers):
    """{name: [values in order]} from a scope's header list."""
    out = {}
    for pair in headers:
        assert len(pair) == 2, pair
        name, value = pair
        assert set(name) == {"bytes"} and set(value) == {"bytes"}, pair  # bytes, not str
        out.setdefault(name["bytes"], []).append(value["bytes"])
    return out


# --- the http scope ----------------------------------------------------------------------

def test_http_scope_keys_types_and_values(probe):
    head, body, (client_host, client_port) = raw_exchange(probe, (
        b"GET /scope/a%20b?x=1&y=%20 HTTP/1.1\r\nHost: example.test:8080\r\nX-Dup: one\r\n"
        b"Accept: text/plain\r\nX-Dup: two\r\nX-Mixed-Case: Value Kept\r\n"
        b"Connection: close\r\n\r\n"))
    assert head.startswith(b"HTTP/1.1 200")
    info = json.loads(body)
    scope = info["scope"]
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"
    assert isinstance(scope["asgi"]["spec_version"], str)
    assert scope["http_version"] == "1.1"
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/scope/a b"
    assert scope["raw_path"] == b("/scope/a%20b")
    assert scope["query_string"] == b("x=1&y=%20")
    assert scope["root_path"] == ""
    # Lowercased names (values untouched), every value of a repeated name kept in order.
    assert header_values(scope["headers"]) == {
        "host": ["example.test:8080"], "x-dup": ["one", "two"], "accept": ["text/plain"],
        "x-mixed-case": ["Value Kept"], "connection": ["close"]}
    assert scope["client"] == [client_host, client_port]
    assert scope["server"] == ["127.0.0.1", probe.port]
    assert isinstance(scope.get("extensions", {}), dict)  # exact contents: Portico-only test below
    assert info["body_length"] == 0


def test_path_is_percent_and_utf8_decoded_raw_path_is_not(probe):
    _, body, _ = raw_exchange(probe, b"GET /scope/caf%C3%A9/x%2Fy?q=%C3%A9&r=a+b HTTP/1.1\r\n"
                                     b"Host: x\r\nConnection: close\r\n\r\n")
    scope = json.loads(body)["scope"]
    assert scope["path"] == "/scope/caf\u00e9/x/y"
    assert scope["raw_path"] == b("/scope/caf%C3%A9/x%2Fy")
    assert scope["query_string"] == b("q=%C3%A9&r=a+b")


def test_http10_request_scope(probe):
    head, body, _ = raw_exchange(probe, b"GET /scope HTTP/1.0\r\n\r\n")
    assert head.split(b" ")[0] in (b"HTTP/1.0", b"HTTP/1.1") and b" 200 " in head
    assert json.loads(body)["scope"]["http_version"] == "1.0"


@needs("portico")
def test_spec_version_and_extensions_offered_on_plain_http1(probe):
    scope = get_json(probe, "/scope")["scope"]
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    # Only what works on this connection: no trailers (HTTP/1.1), no tls; early hints where the
    # host can send them.
    ext = scope["extensions"]
    hints = {"http.response.early_hint": {}} if "early_hints" in FEATURES[SERVER_UNDER_TEST] \
        else {}
    assert ext == {"http.response.pathsend": {}, **hints}


@needs("portico", "early_hints")
def test_early_hint_offered_on_http11_not_http10(probe):
    # docs/protocols.md: 103 goes to HTTP/1.1 clients only (RFC 9110 section 15.2).
    assert "http.response.early_hint" in get_json(probe, "/scope")["scope"]["extensions"]
    _, body, _ = raw_exchange(probe, b"GET /scope HTTP/1.0\r\n\r\n")
    assert "http.response.early_hint" not in json.loads(body)["scope"]["extensions"]


@needs("portico")
def test_no_early_hint_on_head(probe):
    head, body, _ = raw_exchange(probe, b"HEAD /early-hint HTTP/1.1\r\nHost: x\r\n"
                                        b"Connection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""


def test_early_hints_when_offered(probe):
    if "http.response.early_hint" not in get_json(probe, "/scope")["scope"].get("extensions", {}):
        pytest.skip("early hints not offered on HTTP/1.1")
    head, body, _ = raw_exchange(probe, b"GET /early-hint HTTP/1.1\r\nHost: x\r\n"
                                        b"Connection: close\r\n\r\n")
    # raw_exchange splits at the first blank line: the 103 comes first, then the 200.
    assert head.startswith(b"HTTP/1.1 103")
    assert b"link: </style.css>; rel=preload; as=style" in head.lower()
    assert body.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 200") and body.endswith(b"hinted")


# --- request bodies ----------------------------------------------------------------------

def test_post_body_echoed(probe):
    payload = os.urandom(1024 * 1024)
    status, headers, body = probe.request("POST", "/echo", body=payload, timeout=30)
    assert status == 200
    assert body == payload
    # A megabyte comes in more than one http.request event (more_body=True on all but the last).
    assert int(headers["X-Body-Events"]) > 1


def test_empty_body_is_one_event(probe):
    status, headers, body = probe.request("POST", "/echo", body=b"")
    assert (status, body, headers["X-Body-Events"]) == (200, b"", "1")


def test_chunked_request_body_is_dechunked(probe):
    pieces = [b"a" * 1000, b"b" * 70000, b"c" * 5]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head, body, _ = raw_exchange(probe, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                                        b"chunked\r\nConnection: close\r\n\r\n" + wire)
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"".join(pieces)


@needs("portico")
def test_an_app_with_request_buffering_gets_a_chunked_body_whole_with_its_length(portico):
    """Off by default for ASGI; on, the body is read before the app is called and its
    scope shows a content-length in place of the chunked framing, as behind nginx."""
    server = portico(app_table("probe", "asgi_probe:app", interface="asgi",
                               request_buffering=True))
    pieces = [b"a" * 1000, b"b" * 1_500_000, b"c" * 5]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    head, body, _ = raw_exchange(server, b"POST /scope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                                         b"chunked\r\nConnection: close\r\n\r\n" + wire)
    assert head.startswith(b"HTTP/1.1 200"), head
    info = json.loads(body)
    headers = dict((k["bytes"], v["bytes"]) for k, v in info["scope"]["headers"])
    assert headers.get("content-length") == str(1_501_005)
    assert "transfer-encoding" not in headers
    assert info["body_length"] == 1_501_005


@needs("server_config")
def test_a_trusted_proxy_names_the_client_and_the_scheme(portico):
    proxied = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    server = portico(app_table("probe", "asgi_probe:app", interface="asgi"))
    scope = get_json(server, "/scope", headers=proxied)["scope"]
    assert (scope["client"], scope["scheme"]) == (["203.0.113.7", 0], "https")
    assert "tls" not in scope["extensions"]
    distrusting = portico(app_table("probe", "asgi_probe:app", interface="asgi"),
                          server_extra="forwarded_allow_ips = []")
    scope = get_json(distrusting, "/scope", headers=proxied)["scope"]
    assert (scope["client"][0], scope["scheme"]) == ("127.0.0.1", "http")


def test_expect_100_continue(probe):
    with socket.create_connection(("127.0.0.1", probe.port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        interim = s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100")
        s.sendall(b"hello")
        rest = read_all(s)
    assert (interim + rest).endswith(b"hello")


# --- responses ---------------------------------------------------------------------------

def test_status_and_repeated_response_headers(probe):
    status, headers, body = probe.get("/headers")
    assert (status, body) == (201, b"created")
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert headers["X-Custom"] == "yes"


def test_streamed_body_arrives_piece_by_piece_chunked(probe):
    with socket.create_connection(("127.0.0.1", probe.port), timeout=10) as s:
        s.sendall(b"GET /stream?key=s1 HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        # The first piece arrives while the app still holds the second one back.
        while b"first;" not in got:
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        assert b"transfer-encoding: chunked" in got.lower()
        assert b"second;" not in got
        assert probe.get("/release?key=s1")[2] == b"set"
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got += read_all(s)
    assert got.index(b"first;") < got.index(b"second;") < got.index(b"third")
    assert b"6\r\nfirst;\r\n" in got and b"7\r\nsecond;\r\n" in got
    assert b"5\r\nthird\r\n0\r\n\r\n" in got
    # The connection was kept for the next request after the chunked response.
    assert got.endswith(b"Hello, world!")


def test_head_has_headers_and_no_body(probe):
    with socket.create_connection(("127.0.0.1", probe.port), timeout=10) as s:
        s.sendall(b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n")
        data = read_all(s)
    first, second = data.split(b"HTTP/1.1 200", 2)[1:]
    assert b"content-length: 13" in first.lower()
    # The app sent a body, but a HEAD response carries none: next come the GET's bytes.
    assert first.endswith(b"\r\n\r\n")
    assert second.endswith(b"Hello, world!")


def test_no_content_and_not_modified_have_no_body(probe):
    for code in (204, 304):
        head, body, _ = raw_exchange(
            probe, b"GET /status/%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % code)
        assert head.startswith(b"HTTP/1.1 %d" % code) and body == b""


def test_keep_alive_serves_many_requests_on_one_connection(probe):
    conn = probe.connection()
    local = set()
    for i in range(5):
        conn.request("POST", "/echo", body=b"n%d" % i)
        resp = conn.getresponse()
        assert resp.read() == b"n%d" % i
        local.add(conn.sock.getsockname())
    conn.close()
    assert len(local) == 1


@needs("pathsend")
def test_pathsend_sends_the_file(probe, tmp_path):
    data = os.urandom(300_000)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    status, headers, body = probe.get(f"/pathsend?path={path}")
    assert status == 200
    assert body == data
    assert headers["Content-Length"] == str(len(data))


def test_requests_run_concurrently_on_the_app(probe):
    results = {}
    waiter = threading.Thread(target=lambda: results.update(w=probe.get("/wait?key=c1")))
    waiter.start()
    # /wait only returns once another request has come through while it was waiting.
    wait_until(lambda: probe.get("/set?key=c1")[2] == b"set", what="/set")
    waiter.join(15)
    assert results["w"][0] == 200 and results["w"][2] == b"released"


# --- errors ------------------------------------------------------------------------------

def test_exception_before_response_is_500_and_logged(probe):
    status, _, body = probe.get("/raise-before")
    assert status == 500
    assert b"on purpose" not in body  # no traceback for the client
    probe.wait_for_log("asgi app fails before the response (on purpose)")
    assert "Traceback (most recent call last)" in probe.log()
    assert probe.get("/hello")[2] == b"Hello, world!"


def test_return_without_response_is_500(probe):
    assert probe.get("/no-response")[0] == 500
    assert probe.get("/hello")[0] == 200


def test_exception_after_start_cuts_the_response(probe):
    data = probe.raw(b"GET /raise-after HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    assert b"partial;" in data
    # No terminating zero-length chunk, and the connection is closed: the client can tell.
    assert not data.endswith(b"0\r\n\r\n")
    probe.wait_for_log("asgi app fails while streaming (on purpose)")
    assert probe.get("/hello")[0] == 200


def start_and_leave(server, path):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        read_until(s, b"waiting;")
    # The socket is closed here, with the response still going.


def test_client_going_away_is_http_disconnect(probe):
    start_and_leave(probe, "/disconnect")
    probe.wait_for_log("probe: receive after the client left gave http.disconnect")


@needs("disconnect_oserror")
def test_send_after_disconnect_raises_an_oserror(probe):
    start_and_leave(probe, "/disconnect")
    probe.wait_for_log("probe: send after disconnect raised")
    line = next(l for l in probe.log().splitlines() if "send after disconnect raised" in l)
    assert line.endswith("oserror=True"), line
    # Raised by the server for the app's sake, not an error for the server's log.
    assert probe.get("/hello")[0] == 200


def test_slow_reader_holds_the_app_back_instead_of_filling_memory(probe):
    """Backpressure the other way: a 200 MiB response to a client that reads nothing. The
    server must stop taking the app's pieces once the socket is full, not queue them all;
    once the client reads, every byte arrives."""
    probe.get("/hello")
    baseline = probe.rss_kib()
    size = 200 * 1024 * 1024
    s = socket.create_connection(("127.0.0.1", probe.port), timeout=10)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        # An unbounded server would take the whole response into memory within this window
        # (the app makes it at several hundred MiB/s); a bounded one stalls the app instead.
        peak, deadline = baseline, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            peak = max(peak, probe.rss_kib())
            time.sleep(0.05)
        grown_mib = (peak - baseline) / 1024
        assert grown_mib < 32, f"server grew by {grown_mib:.0f} MiB for a client that reads nothing"
        got = read_all(s)
    finally:
        s.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    assert len(body) == size
    # Each 64 KiB piece carries its own byte: none lost, none out of order.
    assert body[-1] == size % 251 and body[65535] == 65536 % 251


def test_unread_upload_is_not_buffered_by_the_server(probe):
    """Backpressure: the app answers without reading a 50 MiB body. While it has not read, the
    server must stop reading from the socket instead of taking the body into memory."""
    probe.get("/hello")
    baseline = probe.rss_kib()
    total = 50 * 1024 * 1024
    response = bytearray()
    s = socket.create_connection(("127.0.0.1", probe.port), timeout=10)
    try:
        s.sendall(b"POST /hold-unread?key=bp HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/octet-stream\r\nContent-Length: %d\r\n\r\n" % total)

        def reader():
            try:
                while True:
                    data = s.recv(65536)
                    if not data:
                        return
                    response.extend(data)
            except OSError:
                return  # a reset after the answer: what was read is kept
        t = threading.Thread(target=reader, daemon=True)
        t.start()
        s.settimeout(0.5)
        piece = b"x" * 65536
        sent, deadline = 0, time.monotonic() + 20
        while sent < total and time.monotonic() < deadline:
            try:
                sent += s.send(piece[:total - sent])
            except socket.timeout:
                break  # nothing moved for half a second: the server stopped reading
        grown_mib = (probe.rss_kib() - baseline) / 1024
        print(f"{sent / 2**20:.1f} MiB taken before the server stopped reading; "
              f"it grew by {grown_mib:.1f} MiB")
        assert sent < total, "the server swallowed the whole unread body"
        assert grown_mib < 16, f"server grew by {grown_mib:.0f} MiB holding an unread body"
        assert probe.get("/set?key=bp")[2] == b"set"
        wait_until(lambda: b"answered without reading" in response or not t.is_alive(),
                   what="the answer")
    finally:
        s.close()
    assert response.startswith(b"HTTP/1.1 200"), bytes(response[:200])
    assert b"answered without reading" in response
    assert probe.get("/hello")[0] == 200


# --- lifespan ----------------------------------------------------------------------------

@needs("lifespan_state")
def test_lifespan_state_is_copied_into_each_request(probe):
    assert get_json(probe, "/state") == {"state": {"started_by": "lifespan", "items": ["a", "b"]}}
    get_json(probe, "/state?mutate=1")
    # Each request gets its own (shallow) copy: one request's changes are not the next one's.
    assert get_json(probe, "/state") == {"state": {"started_by": "lifespan", "items": ["a", "b"]}}
    scope = get_json(probe, "/scope")["scope"]
    assert scope["state"] == {"started_by": "lifespan", "items": ["a", "b"]}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_lifespan_startup_and_shutdown_around_serving(asgi_server, tmp_path, sig):
    marker = tmp_path / "lifespan.marker"
    server = asgi_server("asgi_probe:app", env={"PROBE_MARKER": str(marker)},
                         server_extra='graceful_timeout = "1s"')
    # Startup completes before the first request is served.
    assert marker.read_text() == "startup\n"
    assert server.get("/hello")[0] == 200
    assert "probe: lifespan scope received" in server.log()
    code = server.stop(sig, timeout=15)
    assert marker.read_text() == "startup\nshutdown\n"
    assert "probe: lifespan shutdown received" in server.log()
    # Portico exits 0; uvicorn re-raises the signal once it has shut down cleanly.
    assert code in on_portico((0,), (0, -sig)), server.log()


@needs("lifespan_fail")
def test_lifespan_startup_failed_stops_the_server(asgi_server):
    server = asgi_server("asgi_probe:app", env={"PROBE_LIFESPAN": "fail"}, wait=False)
    code = server.proc.wait(30)
    assert code == on_portico(70, code) and code != 0
    assert "database unreachable (on purpose)" in server.stderr() + server.stdout()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()


def test_app_without_lifespan_support_still_serves_with_auto(asgi_server):
    server = asgi_server("asgi_probe:app", env={"PROBE_LIFESPAN": "raise"}, lifespan="auto")
    assert server.get("/hello")[2] == b"Hello, world!"
    server.wait_for_log("probe: lifespan scope received")


@needs("lifespan_off")
def test_lifespan_off_never_calls_the_app_with_a_lifespan_scope(asgi_server, tmp_path):
    marker = tmp_path / "lifespan.marker"
    server = asgi_server("asgi_probe:app", lifespan="off", env={"PROBE_MARKER": str(marker)})
    assert server.get("/hello")[0] == 200
    server.stop()
    assert "lifespan scope received" not in server.log()
    assert not marker.exists()


# --- event loops, the CLI, mounts --------------------------------------------------------

@needs("loop_choice")
@pytest.mark.parametrize("loop,module", [("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_loop_choice(asgi_server, loop, module):
    server = asgi_server("asgi_probe:app", loop=loop)
    assert get_json(server, "/scope")["loop"].split(".")[0] == module


@needs("portico", "binary")
def test_portico_run_with_asgi_flags(asgi_server):
    server = asgi_server("asgi_probe:app", cli=True, lifespan="on", loop="asyncio")
    assert server.get("/hello")[2] == b"Hello, world!"
    assert get_json(server, "/state")["state"]["started_by"] == "lifespan"


@needs("portico", "mount", "wsgi")
def test_asgi_and_wsgi_apps_side_by_side_on_mounts(asgi_server):
    wsgi = app_table("wsgi", "validated:application", mount="/w", python_home=str(VENV))
    server = asgi_server("asgi_probe:app", mount="/a", extra_apps=[wsgi])
    scope = get_json(server, "/a/scope/x%20y?q=1")["scope"]
    # root_path is the mount; path is the whole path (PATH_INFO = path minus root_path).
    assert scope["root_path"] == "/a"
    assert scope["path"] == "/a/scope/x y"
    assert scope["raw_path"] == b("/a/scope/x%20y")
    assert server.get("/a/hello")[2] == b"Hello, world!"
    env = get_json(server, "/w/environ")
    assert env["SCRIPT_NAME"] == ["str", "/w"] and env["PATH_INFO"] == ["str", "/environ"]
    assert server.get("/w/hello")[2] == b"Hello, world!"
    assert server.get("/elsewhere")[0] == 404


# --- regressions found in review ----------------------------------------------------------

def test_disconnect_heard_after_a_large_content_length_body(probe):
    """A body over the size read before dispatch arrives piece by piece; once the app has it
    all and waits in receive(), the client leaving must still reach it as http.disconnect."""
    size = 200_000
    with socket.create_connection(("127.0.0.1", probe.port), timeout=10) as s:
        s.sendall(b"POST /wait-disconnect HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                  % size + b"x" * size)
        probe.wait_for_log(f"probe: wait-disconnect read {size} bytes")
    probe.wait_for_log("probe: wait-disconnect gave http.disconnect", timeout=10)


def test_a_cancelled_receive_does_not_break_the_next(probe):
    status, _, body = probe.get("/cancelled-receive")
    # The body was read, so both waits time out; neither may raise anything else.
    assert (status, body) == (200, b"timeout,timeout")


def test_an_awaitable_that_is_not_a_coroutine(asgi_server):
    server = asgi_server("asgi_awaitable:app")
    assert server.get("/")[0::2] == (200, b"awaitable ok")
