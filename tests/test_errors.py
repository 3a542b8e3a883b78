"""What users see when things go wrong: apps that raise or break the protocol, limits,
timeouts, and a blocked app that must not stall anything else."""

import http.client
import signal
import socket
import threading
import time

import pytest

from conftest import HOST, app_table, needs, read_all, wait_until


@pytest.fixture
def server(portico):
    return portico(
        # Its body errors are the ones an app sees while it reads: streamed, not buffered.
        app_table("bad", "misbehaving:application", mount="/bad", threads=1,
                  max_body_size="1K", request_timeout="1s", body_timeout="1s",
                  request_buffering=False),
        app_table("good", "validated:application", mount="/", threads=2),
    )


def test_app_that_raises_gets_500_with_traceback_and_thread_lives_on(server):
    status, _, body = server.get("/bad/raise")
    assert status == 500
    assert b"the app fails on purpose" not in body  # no traceback leaks to the client
    server.wait_for_log("ValueError: the app fails on purpose")
    assert "Traceback (most recent call last)" in server.log()
    # The app's only thread is still there.
    assert server.get("/bad/ok")[0] == 200


def test_raise_while_streaming_cuts_the_response(server):
    data = server.raw(b"GET /bad/raise-in-iter HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200")
    assert b"partial;" in data
    # No terminating zero-length chunk: the client can tell the body is incomplete.
    assert not data.endswith(b"0\r\n\r\n")
    server.wait_for_log("fails while streaming")


@pytest.mark.parametrize("path", ["/bad/crlf-header", "/bad/crlf-swallowed"])
def test_header_with_crlf_never_reaches_the_wire(server, path):
    data = server.raw(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 500")
    assert b"stolen" not in data and b"X-Evil" not in data and b"should never be seen" not in data
    server.wait_for_log("invalid byte in the value of response header")


def test_invalid_status_is_500(server):
    status, _, body = server.get("/bad/bad-status")
    assert status == 500 and b"never" not in body
    server.wait_for_log("invalid status")


def test_str_body_is_500(server):
    assert server.get("/bad/str-body")[0] == 500
    server.wait_for_log("not bytes")


def test_missing_start_response_is_500(server):
    assert server.get("/bad/no-start-response")[0] == 500
    server.wait_for_log("without calling start_response")


def test_what_the_app_sent_before_failing_reaches_the_client(server):
    """The head and a first piece went out earlier; a second piece and the failure come
    together: both pieces reach the client, then the connection is cut (no last chunk)."""
    data = server.raw(b"GET /bad/exc-info-after-a-pause HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200"), data
    assert b"first;" in data and b"sent;" in data and b"never" not in data, data
    assert not data.endswith(b"0\r\n\r\n")
    server.wait_for_log("RuntimeError: too late")


def test_exc_info_after_headers_sent_aborts(server):
    data = server.raw(b"GET /bad/exc-info-after-send HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200") and b"sent;" in data and b"never" not in data
    assert not data.endswith(b"0\r\n\r\n")
    server.wait_for_log("RuntimeError: too late")


def test_wsgi_errors_goes_to_the_log(server):
    assert server.get("/bad/stderr")[2] == b"logged"
    server.wait_for_log("a line for wsgi.errors")


def test_body_over_limit_is_413(server):
    status, _, _ = server.request("POST", "/bad/slow-read", body=b"x" * 2000)
    assert status == 413
    # Chunked, so the size is only known while reading.
    wire = b"400\r\n" + b"y" * 1024 + b"\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n0\r\n\r\n"
    data = server.raw(b"POST /bad/slow-read HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + wire)
    assert data.startswith(b"HTTP/1.1 413")


def test_body_over_limit_is_413_even_when_the_app_catches_it_and_answers_500(server):
    """Flask catches the OSError of a read past max_body_size and answers 500: the cause is
    the client's body, so the client gets 413 (RFC 9110 section 15.5.14), not the app's 500."""
    wire = b"400\r\n" + b"y" * 1024 + b"\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n0\r\n\r\n"
    data = server.raw(b"POST /bad/catch-body-error HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n" + wire)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"the app's own 500" not in data
    small = server.request("POST", "/bad/catch-body-error", body=b"x" * 100)
    assert (small[0], small[2]) == (200, b"read it all")


# nginx reads a chunked body and refuses it before the app is called, so only Portico's own
# host gets this far.
@needs("binary")
def test_asgi_app_giving_up_on_a_refused_body_is_one_log_line_not_a_traceback(portico):
    """The app is told with `http.disconnect` that the rest of its body was refused; what it
    raises then (Starlette's ClientDisconnect; the probe's ConnectionError) is one line."""
    server = portico(app_table("probe", "asgi_probe:app", interface="asgi", max_body_size="1K"))
    wire = b"400\r\n" + b"y" * 1024 + b"\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n0\r\n\r\n"
    data = server.raw(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + wire)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    server.wait_for_log("POST /echo: its request body was refused, and the app ended with "
                        "ConnectionError")
    assert "Traceback" not in server.log()


@needs("binary")
def test_asgi_app_returning_on_a_refused_body_is_not_logged_as_an_error(portico):
    """An app that simply returns when `receive()` says `http.disconnect` has done nothing
    wrong: the client gets 413, and the log holds no error about the app."""
    server = portico(app_table("probe", "asgi_probe:app", interface="asgi", max_body_size="1K"))
    wire = b"400\r\n" + b"y" * 1024 + b"\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n0\r\n\r\n"
    data = server.raw(b"POST /return-on-disconnect HTTP/1.1\r\nHost: x\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n" + wire)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    server.wait_for_log("return-on-disconnect told http.disconnect")
    assert server.get("/hello")[0] == 200  # the loop has finished with the refused request
    assert "ERROR" not in server.log(), server.log()


def test_stalled_body_is_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /bad/slow-read HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly some")
        data = read_all(s)
    assert data.startswith(b"HTTP/1.1 408")


def test_stalled_body_is_408_even_when_the_app_answers_after_request_timeout(server):
    # The body times out at about the time request_timeout passes; the app, told of it,
    # takes 0.5 s more before it gives up. The client's failure came first: 408, not 504.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /bad/slow-to-give-up HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nsome")
        data = read_all(s)
    assert data.startswith(b"HTTP/1.1 408")


def test_blocked_app_times_out_with_504_and_stalls_nothing_else(server):
    results = {}

    def blocked():
        results["blocked"] = server.get("/bad/block")[0]

    t = threading.Thread(target=blocked)
    t.start()
    # While the bad app's only thread is stuck, the other app answers at once, many times.
    for _ in range(20):
        assert server.get("/hello")[2] == b"Hello, world!"
    t.join(10)
    assert results["blocked"] == 504
    # Once the stuck call returns, its thread serves again.
    wait_until(lambda: server.get("/bad/ok")[0] == 200, what="bad app recovers")


def test_unmounted_path_is_404(portico):
    server = portico(app_table("only", "validated:application", mount="/only"))
    assert server.get("/elsewhere")[0] == 404
    assert server.get("/onlyx")[0] == 404


def test_mounts_split_script_name_and_path_info(server):
    status, _, body = server.get("/bad/deep/path")
    assert body == b"misbehaving app: /bad|/deep/path"
    status, _, body = server.get("/bad")
    assert body == b"misbehaving app: /bad|"


@needs("binary")
def test_access_log_combined_format(server):
    server.get("/hello", headers={"User-Agent": "tester/1.0", "Referer": "http://r/"})
    server.wait_for_log('"GET /hello HTTP/1.1" 200 13 "http://r/" "tester/1.0"')
    assert "listening on http://127.0.0.1:%d" % server.port in server.log()
    assert "mounted app `bad` at /bad" in server.log()


def test_malformed_request_is_400(server):
    data = server.raw(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400")


@needs("server_config")
def test_a_client_that_reads_nothing_lets_the_app_go_after_send_timeout(portico):
    """As nginx's send_timeout: a response that waits on its client past send_timeout ends,
    with its connection, and the app's iterable is closed; its thread serves the next."""
    server = portico(app_table("raw", "misbehaving:application", threads=1),
                     server_extra='send_timeout = "1s"')
    with socket.create_connection(("127.0.0.1", server.port)) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        server.wait_for_log("endless stream closed")
        server.wait_for_log("GET /endless: the client took none of the response for send_timeout")
        # The app's one thread is free again.
        assert server.get("/content-length")[0] == 200


@needs("server_config")
def test_a_slow_but_steady_client_gets_a_big_body_whole_past_send_timeout(portico):
    """send_timeout bounds a stall, not a download: a client that takes 16 MiB, given at once
    by the app, at a steady 5 MiB/s (over 3 s) gets all of it with a send_timeout of 2 s."""
    size, rate = 16 * 1024 * 1024, 5 * 1024 * 1024
    server = portico(app_table("raw", "misbehaving:application"),
                     server_extra='send_timeout = "2s"')
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(f"GET /one-big-item?{size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(65536)
        head, body = head.split(b"\r\n\r\n", 1)
        got, started = len(body), time.monotonic()
        while got < size:
            piece = client.recv(65536)
            assert piece, f"the response ended after {got} of {size} bytes: {server.log()}"
            got += len(piece)
            # Paced: never ahead of the steady rate.
            time.sleep(max(0.0, started + got / rate - time.monotonic()))
    assert head.startswith(b"HTTP/1.1 200"), head


@needs("server_config")
def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(portico):
    server = portico(app_table("v", "validated:application"), server_extra='keepalive_timeout = "1s"')
    with socket.create_connection(("127.0.0.1", server.port), timeout=8) as s:
        s.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        # read_all returns only once the server closes the idle connection (or the socket
        # timeout fails the test).
        data = read_all(s)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"Hello, world!")


@needs("binary", "server_config")
def test_sigterm_lets_requests_in_flight_finish(portico):
    server = portico(app_table("bad", "misbehaving:application", threads=1),
                     server_extra='graceful_timeout = "5s"')
    result = {}

    def slow():
        result["response"] = server.get("/block", timeout=15)

    t = threading.Thread(target=slow)
    t.start()
    server.wait_for_log("blocking in /block")
    server.proc.send_signal(signal.SIGTERM)
    t.join(15)
    assert result["response"][0] == 200 and result["response"][2] == b"unblocked"
    assert server.proc.wait(15) == 0


@needs("binary", "server_config")
def test_sigterm_closes_idle_connections_and_exits_without_waiting_out_graceful_timeout(portico):
    """gunicorn, uvicorn and nginx end a graceful stop once nothing is in flight; Pingora alone
    sleeps its whole grace period, which systemd or `docker stop` (10 s, then SIGKILL) wait out
    or cut short."""
    server = portico(app_table("v", "validated:application"),
                     server_extra='graceful_timeout = "60s"\nkeepalive_timeout = "60s"')
    between_requests = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    between_requests.request("GET", "/hello")
    assert between_requests.getresponse().read() == b"Hello, world!"
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    server.proc.send_signal(signal.SIGTERM)
    # Well before the 60 s: the process must not wait out its grace period.
    assert server.proc.wait(30) == 0
    assert between_requests.sock.recv(1) == b""
    try:
        assert silent.recv(1) == b""
    except ConnectionResetError:
        # Still in the listen backlog when the listener closed: the kernel resets it.
        pass
    between_requests.close()
    silent.close()
    log = server.log()
    assert "stopping (SIGTERM)" in log, log
    assert any(line.endswith("] stopped") for line in log.splitlines()), log


def test_full_queue_is_503_with_retry_after(portico):
    server = portico(app_table("bad", "misbehaving:application", threads=1, queue_size=1))
    results = []

    def call(path):
        status, headers, _ = server.get(path, timeout=15)
        results.append((path, status, headers.get("Retry-After")))

    busy = threading.Thread(target=call, args=("/block",))
    busy.start()
    server.wait_for_log("blocking in /block")
    # The only thread is busy and the queue holds one request: of three more, whichever
    # arrives first waits its turn and the other two are turned away at once.
    others = [threading.Thread(target=call, args=("/ok",)) for _ in range(3)]
    for t in others:
        t.start()
    for t in [busy, *others]:
        t.join(15)
    assert sorted(results) == [("/block", 200, None), ("/ok", 200, None),
                               ("/ok", 503, "1"), ("/ok", 503, "1")]


def test_a_request_that_waited_past_queue_timeout_gets_504_and_never_reaches_the_app(portico):
    """queue_timeout, as mod_wsgi's queue-timeout: a request that waited longer than that for
    a thread (for a worker, in pool mode) is answered 504 when its turn comes, and the app
    never runs it; the log says so, and the next request is served as usual."""
    server = portico(app_table("bad", "misbehaving:application", threads=1,
                               queue_timeout="1s"))
    results = {}

    def call(path):
        results[path] = server.get(path, timeout=30)

    busy = threading.Thread(target=call, args=("/block",))
    busy.start()
    server.wait_for_log("blocking in /block")
    # /block holds the only thread for 3 s: /stderr waits past its 1 s, then gets its turn.
    waiting = threading.Thread(target=call, args=("/stderr",))
    waiting.start()
    for t in (busy, waiting):
        t.join(30)
    assert results["/block"][0] == 200 and results["/block"][2] == b"unblocked"
    status, _, body = results["/stderr"]
    assert status == 504, body
    log = server.log()
    assert "a line for wsgi.errors" not in log, "the app ran the request that timed out"
    assert "in app `bad`'s queue, past its queue_timeout (1000 ms)" in log, log
    status, _, body = server.get("/stderr")
    assert (status, body) == (200, b"logged")
    server.wait_for_log("a line for wsgi.errors")


def test_as_many_clients_as_threads_and_queue_are_never_refused(portico):
    """threads = 1 and queue_size = 1 take two requests at a time. Two keep-alive clients
    never have more than two unanswered, so neither is ever refused, even though each
    answer's close() keeps the thread 50 ms after the client has it and sent its next."""
    server = portico(app_table("bad", "misbehaving:application", threads=1, queue_size=1))
    statuses = []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=15)
        try:
            for _ in range(15):
                conn.request("GET", "/slow-close")
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
        finally:
            conn.close()
    clients = [threading.Thread(target=client) for _ in range(2)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(30)
    assert statuses == [200] * 30


@pytest.fixture
def raw_app(portico):
    return portico(app_table("raw", "misbehaving:application"))


def test_no_content_length_on_204(raw_app):
    data = raw_app.raw(b"GET /no-content HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 204")
    assert b"content-length" not in data.lower()


@pytest.mark.parametrize("path", ["/no-content-with-body", "/not-modified-with-body"])
def test_a_body_given_with_204_or_304_never_reaches_the_wire(raw_app, path):
    """RFC 9112 section 6.3: a 204 or 304 ends at its head. Sent, the app's body would be
    read as the start of the next response on the connection."""
    data = raw_app.raw(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"
                       "GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert b"never on the wire" not in data, data
    first, second = data.split(b"\r\n\r\n", 1)
    assert first.split(b" ")[1] in (b"204", b"304"), data
    assert second.startswith(b"HTTP/1.1 200"), data
    assert second.endswith(b"misbehaving app: |/next"), data


def test_a_body_short_of_its_content_length_ends_with_the_connection(raw_app):
    """PEP 3333 (Buffering and Streaming): an app that does not send the Content-Length it
    stated gets its connection closed, and the error logged, so the client sees the body cut
    short instead of waiting for the rest."""
    with socket.create_connection(("127.0.0.1", raw_app.port), timeout=10) as s:
        s.sendall(b"GET /short-of-content-length HTTP/1.1\r\nHost: x\r\n\r\n")
        data = read_all(s)
    assert data.startswith(b"HTTP/1.1 200"), data
    assert b"content-length: 10\r\n" in data.lower(), data
    assert data.endswith(b"\r\n\r\n12345"), data
    raw_app.wait_for_log("Content-Length")



def test_a_body_past_its_content_length_is_cut_there(raw_app):
    """PEP 3333: no more bytes than the app's Content-Length go out; the rest would be read
    as the next response on the connection."""
    data = raw_app.raw(b"GET /past-content-length HTTP/1.1\r\nHost: x\r\n\r\n"
                       b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"and-more" not in data, data
    first, rest = data.split(b"\r\n\r\n", 1)
    assert rest.startswith(b"0123456789"), data
    # Either the next response follows at once, or the connection ended after the ten bytes.
    assert rest[10:] == b"" or rest[10:].startswith(b"HTTP/1.1 200"), data


def test_file_wrapper_after_write(raw_app, tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"file body")
    status, _, body = raw_app.get(f"/write-then-file?{path}")
    assert (status, body) == (200, b"prefix-file body")


def test_body_read_error_stays_an_error(portico):
    """A broken chunk: a buffering host answers 400 before the app is called; an app that
    streams its body gets the error on each read, not a part of the body for all of it."""
    buffered = portico(app_table("raw", "misbehaving:application"))
    data = buffered.raw(b"POST /read-after-error HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"3\r\nabc\r\nZZ\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data[:100]
    assert b"raised" not in data
    raw_app = portico(app_table("raw", "misbehaving:application", request_buffering=False))
    data = raw_app.raw(b"POST /read-after-error HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"3\r\nabc\r\nZZ\r\n")
    if HOST == "nginx" and data.startswith(b"HTTP/1.1 400"):
        # nginx may parse the broken chunk before the app reads, and answer 400 itself: then
        # the app never sees the body, let alone takes a part of it for all of it.
        raw_app.wait_for_log("client sent invalid chunked body")
        return
    assert data.endswith(b"raised raised")


def test_repeated_identical_content_length_is_one(raw_app):
    data = raw_app.raw(b"POST /content-length HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                       b"Content-Length: 3\r\nConnection: close\r\n\r\nabc")
    if HOST == "nginx":
        # nginx refuses any repeated Content-Length itself (RFC 9112 section 6.3 allows either).
        assert data.startswith(b"HTTP/1.1 400")
        raw_app.wait_for_log('client sent duplicate header line: "Content-Length: 3"')
        return
    assert data.endswith(b"\r\n\r\n3")
