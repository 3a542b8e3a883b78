"""PEP 3333 behaviour of the `portico` binary, through apps wrapped in wsgiref's validator."""

import hashlib
import json
import os
import socket
import threading

import pytest

from conftest import (POOL_MODE, app_table, needs, on_host, read_all, read_until,
                      split_response, wait_until)


@pytest.fixture
def server(portico):
    return portico(app_table("validated", "validated:application", threads=4))


def assert_clean(server):
    # The validator raises AssertionError inside the app on any server-side violation.
    assert "AssertionError" not in server.log(), server.log()
    assert "exception in" not in server.log(), server.log()


def test_get_hello(server):
    status, headers, body = server.get("/hello")
    assert (status, body) == (200, b"Hello, world!")
    assert headers["Content-Type"] == "text/plain"
    assert headers["Content-Length"] == "13"
    assert_clean(server)


def test_head_has_headers_and_no_body(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n")
        data = read_all(s)
    first, second = data.split(b"HTTP/1.1 200", 2)[1:]
    assert b"Content-Length: 13" in first
    # The HEAD response carries no body: the next bytes are the GET's status line.
    assert first.endswith(b"\r\n\r\n")
    assert second.endswith(b"Hello, world!")
    assert_clean(server)


def head_then_get(server, path):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n"
                  f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = read_all(s)
    return data.split(b"HTTP/1.1 200", 2)[1:]


def test_head_whose_app_leaves_out_the_body_announces_no_length(server, portico):
    """RFC 9110 section 9.3.2: a HEAD answer's Content-Length is the GET answer's. An app
    that gives a HEAD no body and no length (werkzeug, Django) has not said it, so none is
    sent: `Content-Length: 0` would tell caches and clients the GET body is empty. Both as
    an iterable (here, the validator's) and as a list."""
    bare = portico(app_table("bare", "misbehaving:application"))
    for answering, path in ((server, "/body-not-for-head"), (bare, "/list-not-for-head")):
        head, get = head_then_get(answering, path)
        assert head.endswith(b"\r\n\r\n")
        assert b"content-length" not in head.lower(), (path, head)
        assert b"the GET body" in get
    assert_clean(server)


def test_post_64k_echo(server):
    payload = os.urandom(65536)
    status, headers, body = server.request("POST", "/echo", body=payload)
    assert status == 200
    assert body == payload
    assert_clean(server)


def test_chunked_post_is_terminated_and_echoed(server):
    pieces = [b"a" * 1000, b"b" * 70000, b"c" * 5]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    data = server.raw(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      b"Connection: close\r\n\r\n" + wire)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"".join(pieces)
    assert_clean(server)


def chunked(pieces):
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


@pytest.mark.parametrize("sizes", [(1000, 70_000, 5), (700_000,) * 4], ids=["small", "spilled"])
def test_a_chunked_body_reaches_an_app_that_reads_only_content_length(server, sizes):
    """request_buffering (on for WSGI): the whole body is read first and the app gets it with
    CONTENT_LENGTH, as nginx forwards it to uWSGI; Django reads only that many bytes and saw
    nothing of a chunked body before. 2.8 MB goes through the host's temporary file."""
    pieces = [bytes([65 + i]) * n for i, n in enumerate(sizes)]
    whole = b"".join(pieces)
    data = server.raw(b"POST /read-content-length HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked(pieces),
                      timeout=30)
    head, body = split_response(data)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body) == {"CONTENT_LENGTH": str(len(whole)), "HTTP_TRANSFER_ENCODING": None,
                                "read": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}
    assert_clean(server)


def test_a_trickling_upload_holds_no_app_thread(portico):
    """The app's only thread stays free while a client sends its body slowly; with
    `request_buffering = false` the same upload holds it, as under gunicorn without a proxy."""
    for buffering in (True, False):
        server = portico(app_table("validated", "validated:application", threads=1,
                                   request_buffering=buffering))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            # Streamed, the 100 comes once the app reads: its thread is then in the upload.
            slow.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                         b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
            interim = read_until(slow, b"\r\n\r\n")
            assert interim.startswith(b"HTTP/1.1 100"), interim
            slow.sendall(b"5\r\nfirst\r\n")
            try:
                quick = server.get("/hello", timeout=3)[0]
            except OSError as e:  # socket.timeout
                quick = repr(e)
            slow.sendall(b"4\r\nlast\r\n0\r\n\r\n")
            head, body = split_response(read_all(slow))
        assert head.startswith(b"HTTP/1.1 200") and body == b"firstlast", head
        if buffering:
            assert quick == 200
        else:
            assert quick != 200, "the streamed upload should hold the one thread"
        server.stop()


def test_a_buffered_body_over_max_body_size_is_413_without_calling_the_app(portico):
    server = portico(app_table("validated", "validated:application", max_body_size="1K"))
    data = server.raw(b"POST /environ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + chunked([b"y" * 1000, b"z" * 1000]))
    assert data.startswith(b"HTTP/1.1 413"), data[:100]
    assert b"REQUEST_METHOD" not in data
    # A chunked upload that goes on past the limit is refused there, not read (and stored)
    # to its end: under nginx its client_max_body_size (0 in this setup) is lowered to it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /environ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"7d0\r\n" + b"y" * 2000 + b"\r\n")
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 413"), data[:100]


# Under nginx, nginx's own client_body_timeout (60 s) governs a body it buffers.
@needs("binary")
def test_a_buffered_body_that_stalls_is_408_without_calling_the_app(portico):
    server = portico(app_table("validated", "validated:application", body_timeout="1s"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /environ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"\r\n5\r\nfirst\r\n")
        data = read_all(s)
    assert data.startswith(b"HTTP/1.1 408"), data[:100]
    assert b"REQUEST_METHOD" not in data


@needs("server_config")
def test_a_trusted_proxy_names_the_client_and_the_scheme(portico):
    """Behind a load balancer that ends TLS, the app sees the client's address and https,
    as gunicorn and uvicorn give them (forwarded_allow_ips, by default the loopback); from
    anyone else the headers are not believed."""
    proxied = {"X-Forwarded-For": "198.51.100.4, 203.0.113.7", "X-Forwarded-Proto": "https",
               "Host": "example.test"}
    trusting = portico(app_table("validated", "validated:application"))
    env = json.loads(trusting.get("/environ", headers=proxied)[2])
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"], env["HTTPS"], env["SERVER_PORT"]) == (
        ["str", "203.0.113.7"], ["str", "https"], ["str", "on"], ["str", "443"])
    assert env["HTTP_X_FORWARDED_FOR"] == ["str", "198.51.100.4, 203.0.113.7"]
    # The access log shows the client the app saw, as uvicorn's does.
    trusting.wait_for_log('203.0.113.7 - - [')
    assert '127.0.0.1 - - [' not in trusting.log()
    distrusting = portico(app_table("validated", "validated:application"),
                          server_extra="forwarded_allow_ips = []")
    env = json.loads(distrusting.get("/environ", headers=proxied)[2])
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"], env["SERVER_PORT"]) == (
        ["str", "127.0.0.1"], ["str", "http"], ["str", "80"])
    assert "HTTPS" not in env
    distrusting.wait_for_log('127.0.0.1 - - [')
    assert '203.0.113.7 - - [' not in distrusting.log()


def test_input_reads_as_it_arrives_in_pieces(server):
    payload = b"z" * 200_000
    status, _, body = server.request("POST", "/echo-chunks", body=payload)
    assert status == 200
    assert body == b"200 pieces, 200000 bytes"
    assert_clean(server)


def test_readline_readlines_and_iteration(server):
    body = b"line one\nabcdef\nthree\nfour"
    status, _, out = server.request("POST", "/echo-lines", body=body)
    assert status == 200
    assert json.loads(out) == {"first": "line one\n", "second": "abc",
                               "rest": ["def\n", "three\n", "four"]}
    status, _, out = server.request("POST", "/echo-iter", body=b"a\nb\nc")
    assert out == b"3 lines;a\nb\nc"
    assert_clean(server)


def test_http10_request(server):
    data = server.raw(b"GET /hello HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200")
    assert data.endswith(b"Hello, world!")
    # Without Content-Length, an HTTP/1.0 body is delimited by closing the connection.
    head, body = split_response(server.raw(b"GET /environ HTTP/1.0\r\n\r\n"))
    assert b"chunked" not in head.lower()
    env = json.loads(body)
    assert env["SERVER_PROTOCOL"] == ["str", "HTTP/1.0"]
    assert_clean(server)


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = server.connection()
    peers = set()
    for i in range(5):
        conn.request("POST", "/echo", body=b"n%d" % i)
        resp = conn.getresponse()
        assert resp.read() == b"n%d" % i
        peers.add(conn.sock.getsockname())
    assert len(peers) == 1
    conn.close()
    assert_clean(server)


def test_pipelined_requests_answered_in_order(server):
    reqs = (b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde"
            b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = server.raw(reqs)
    assert data.count(b"HTTP/1.1 200") == 3
    parts = data.split(b"HTTP/1.1 200")
    assert parts[1].endswith(b"Hello, world!")
    assert parts[2].endswith(b"abcde")
    assert parts[3].endswith(b"Hello, world!")
    assert_clean(server)


def test_environ_keys_and_types(server):
    status, _, body = server.get(
        "/environ?x=1&y=%20", headers={"X-Multi": "a", "Cookie": "c=1", "Content-Type": "text/x"})
    env = json.loads(body)
    assert env["REQUEST_METHOD"] == ["str", "GET"]
    assert env["SCRIPT_NAME"] == ["str", ""]
    assert env["PATH_INFO"] == ["str", "/environ"]
    assert env["QUERY_STRING"] == ["str", "x=1&y=%20"]
    assert env["SERVER_PROTOCOL"] == ["str", "HTTP/1.1"]
    assert env["SERVER_NAME"] == ["str", "127.0.0.1"]
    assert env["SERVER_PORT"] == ["str", str(server.port)]
    assert env["REMOTE_ADDR"] == ["str", "127.0.0.1"]
    assert env["REMOTE_PORT"][0] == "str" and int(env["REMOTE_PORT"][1]) > 0
    assert env["CONTENT_TYPE"] == ["str", "text/x"]
    assert "HTTP_CONTENT_TYPE" not in env
    assert env["HTTP_X_MULTI"] == ["str", "a"]
    assert env["wsgi.url_scheme"] == ["str", "http"]
    assert env["wsgi.version"] == ["tuple", "(1, 0)"]
    assert env["wsgi.multithread"] == ["bool", True]
    # nginx may run the app in several worker processes at once; a pool of one worker
    # (PORTICO_TEST_MODE=pool) is one process whatever the host.
    assert env["wsgi.multiprocess"] == ["bool", False if POOL_MODE else on_host(False, True)]
    assert env["wsgi.run_once"] == ["bool", False]
    assert env["wsgi.input_terminated"] == ["bool", True]
    assert env["portico.http_version"] == ["str", "1.1"]
    assert env["SERVER_SOFTWARE"][1].startswith(on_host("portico/", "nginx portico/"))
    assert_clean(server)


def test_path_info_is_percent_decoded_latin1(server):
    data = server.raw(b"GET /environ%2Fx%C3%A9 HTTP/1.1\r\nHost: h:81\r\nConnection: close\r\n\r\n")
    env = json.loads(split_response(data)[1])
    # UTF-8 bytes of "é" appear as two latin-1 code points, as PEP 3333 requires.
    assert env["PATH_INFO"] == ["str", "/environ/x\u00c3\u00a9"]
    assert env["RAW_URI"] == ["str", "/environ%2Fx%C3%A9"]
    assert env["SERVER_NAME"] == ["str", "h"]
    assert env["SERVER_PORT"] == ["str", "81"]


def test_repeated_headers_joined_and_underscore_headers_dropped(server):
    data = server.raw(b"GET /environ HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.1.1.1\r\n"
                      b"X_Forwarded_For: 6.6.6.6\r\nAccept: a\r\nAccept: b\r\n"
                      b"Connection: close\r\n\r\n")
    env = json.loads(split_response(data)[1])
    assert env["HTTP_X_FORWARDED_FOR"] == ["str", "1.1.1.1"]
    assert env["HTTP_ACCEPT"] == ["str", "a, b"]


def test_iterable_streams_chunk_by_chunk_with_chunked_encoding(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        # The first chunk arrives while the app still holds the second one back.
        while b"first;" not in got:
            got += s.recv(4096)
        assert b"Transfer-Encoding: chunked" in got
        assert b"second;" not in got
        assert server.get("/release")[2] == b"released"
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got += read_all(s)
    assert b"6\r\nfirst;\r\n" in got and b"7\r\nsecond;\r\n" in got and b"5\r\nthird\r\n0\r\n\r\n" in got
    # The connection was reused for the next request after the chunked response.
    assert got.endswith(b"Hello, world!")
    wait_until(lambda: "stream" in json.loads(server.get("/closed")[2]), what="close()")
    assert_clean(server)


def test_a_generator_done_at_once_is_streamed_every_time(server):
    """The framing of a streamed body does not depend on how fast the app is: every piece
    may arrive before the head goes out (nginx batches them), and it is still chunked, as
    gunicorn sends it, never given a Content-Length the app did not give."""
    for _ in range(20):
        data = server.raw(b"GET /quick-generator HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
        head, body = split_response(data)
        assert b"transfer-encoding: chunked" in head.lower(), head
        assert b"content-length" not in head.lower(), head
        assert body == b"quick pieces"


def test_close_called_when_client_goes_away(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    wait_until(lambda: "endless" in json.loads(server.get("/closed")[2]), what="close() after disconnect")


def test_write_callable(server):
    status, _, body = server.get("/write")
    assert (status, body) == (200, b"written;returned")
    assert_clean(server)


def test_file_wrapper_sends_the_file_from_its_offset(portico, tmp_path):
    server = portico(app_table("raw", "misbehaving:application"))
    data = os.urandom(300_000)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    status, headers, body = server.get(f"/file?{path}")
    assert status == 200
    assert body == data[10:]
    # Sent from the descriptor: the length is known without Python reading the file.
    assert headers["Content-Length"] == str(len(data) - 10)
    status, headers, body = server.get("/file-like")
    assert body == b"from a BytesIO" * 1000


def test_response_headers_kept_with_repeats(server):
    status, headers, body = server.get("/headers")
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert headers["X-Custom"] == "yes"


def test_no_content(server):
    status, headers, body = server.get("/empty")
    assert (status, body) == (204, b"")


def test_exc_info_replaces_unsent_response(server):
    status, _, body = server.get("/exc-info")
    assert (status, body) == (503, b"replaced by the app")


def test_expect_100_continue(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        interim = s.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        s.sendall(b"hello")
        rest = read_all(s)
    assert b"200 OK" in interim + rest
    assert (interim + rest).endswith(b"hello")


def test_concurrent_requests_across_threads(server):
    results = []

    def worker(i):
        status, _, body = server.request("POST", "/echo", body=b"%d" % i)
        results.append((status, body == b"%d" % i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(200, True)] * 40


def test_large_response_body_is_sent_intact(portico):
    # 3 MiB: above the size where Portico lends the bytes object instead of copying it.
    server = portico(app_table("v", "validated:application"))
    payload = os.urandom(3 * 1024 * 1024)
    status, _, body = server.request("POST", "/echo", body=payload, timeout=30)
    assert status == 200 and body == payload
    assert_clean(server)
