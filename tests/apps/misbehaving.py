"""Fixture WSGI app that breaks the rules on purpose; not wrapped in the validator, which
would catch the mistakes before the server could."""

import sys
import threading
import time

BLOCK = threading.Event()


def too_late(start_response, first=None):
    """A body that sends `first` (then pauses) and `sent;`, then calls start_response with
    exc_info after the head went out: PEP 3333 says that re-raises, ending the response."""
    if first:
        yield first
        time.sleep(0.2)
    yield b"sent;"
    try:
        raise RuntimeError("too late")
    except RuntimeError:
        start_response("500 Oops", [], sys.exc_info())
    yield b"never"


class SlowClose:
    """A body whose close() takes 50 ms."""

    def __init__(self, body):
        self.body = body

    def __iter__(self):
        yield self.body

    def close(self):
        time.sleep(0.05)


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/raise":
        raise ValueError("the app fails on purpose")
    if path == "/raise-in-iter":
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body():
            yield b"partial;"
            raise ValueError("fails while streaming")
        return body()
    if path == "/crlf-header":
        start_response("200 OK", [("X-Evil", "a\r\nSet-Cookie: stolen=1")])
        return [b"should never be seen"]
    if path == "/crlf-swallowed":
        # The app catches the refusal and carries on: the response must still be a 500.
        try:
            start_response("200 OK", [("X-Evil", "a\nb")])
        except ValueError:
            pass
        return [b"should never be seen"]
    if path == "/bad-status":
        start_response("twohundred", [])
        return [b"should never be seen"]
    if path == "/str-body":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return ["a str is not bytes"]
    if path == "/no-start-response":
        return [b"forgot start_response"]
    if path == "/exc-info-after-a-pause":
        # The head and a first piece go out on their own; the second piece and the failure
        # then reach the host together.
        start_response("200 OK", [("Content-Type", "text/plain")])
        return too_late(start_response, first=b"first;")
    if path == "/exc-info-after-send":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return too_late(start_response)
    if path == "/block":
        print("blocking in /block", file=environ["wsgi.errors"])
        environ["wsgi.errors"].flush()
        BLOCK.wait(3)  # stuck for longer than request_timeout, then free again
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"unblocked"]
    if path == "/unblock":
        BLOCK.set()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok"]
    if path == "/stderr":
        print("a line for wsgi.errors", file=environ["wsgi.errors"])
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"logged"]
    if path == "/file":
        # Unwrapped, so the server sees its own file_wrapper and can send the descriptor.
        f = open(environ["QUERY_STRING"], "rb")
        f.seek(10)
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](f, 4096)
    if path == "/one-big-item":
        # A whole response in one list item, made in memory (every page touched).
        n = int(environ["QUERY_STRING"])
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(n))])
        return [b"x" * n]
    if path == "/write-then-file":
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        write(b"prefix-")
        return environ["wsgi.file_wrapper"](open(environ["QUERY_STRING"], "rb"))
    if path == "/no-content":
        start_response("204 No Content", [])
        return []
    if path in ("/no-content-with-body", "/not-modified-with-body"):
        # RFC 9110 sections 15.3.5 and 15.4.5: neither status has a body, whatever the app
        # returns.
        status = "204 No Content" if path == "/no-content-with-body" else "304 Not Modified"
        start_response(status, [("ETag", '"x"')])
        return [b"never on the wire"]
    if path in ("/short-of-content-length", "/past-content-length"):
        # Streamed (a generator), so the host frames it by the app's own Content-Length.
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        body = b"12345" if path == "/short-of-content-length" else b"0123456789-and-more"

        def pieces():
            yield body

        return pieces()
    if path == "/read-after-error":
        outcomes = []
        for _ in range(2):
            try:
                environ["wsgi.input"].read(100)
                outcomes.append("read")
            except OSError:
                outcomes.append("raised")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [" ".join(outcomes).encode()]
    if path == "/content-length":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ.get("CONTENT_LENGTH", "-").encode()]
    if path == "/file-like":
        import io
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"from a BytesIO" * 1000), 100)
    if path == "/catch-body-error":
        # As Flask does: the failed read is caught and answered with the app's own 500.
        try:
            environ["wsgi.input"].read()
        except OSError:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"the app's own 500"]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"read it all"]
    if path == "/endless":
        # A download with no end, for a client that reads none of it.
        errors = environ["wsgi.errors"]

        def pieces():
            sent = 0
            try:
                while sent < 1 << 34:
                    yield b"x" * 65536
                    sent += 65536
            finally:
                errors.write("endless stream closed\n")
                errors.flush()

        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return pieces()
    if path == "/slow-close":
        # Not a mistake either: work after the answer, in close() (PEP 3333), as Flask's
        # teardown handlers and Django's request_finished run there.
        start_response("200 OK", [("Content-Type", "text/plain")])
        return SlowClose(b"answered")
    if path == "/list-not-for-head":
        # Not a mistake: a HEAD answered with an empty list, as a bare app does it. Here
        # because the validator would wrap the list, which the server treats apart.
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [b"the GET body"]
    if path == "/slow-to-give-up":
        # Told that the client's body failed, the app takes its time before it gives up.
        try:
            environ["wsgi.input"].read()
        except Exception:
            time.sleep(0.5)
            raise
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"never"]
    if path == "/slow-read":
        data = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"read %d" % len(data)]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"misbehaving app: " + environ["SCRIPT_NAME"].encode() + b"|" + path.encode()]
