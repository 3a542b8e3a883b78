"""Fixture WSGI app wrapped in wsgiref.validate.validator: any PEP 3333 violation by the
server (environ types, start_response use, input stream) raises inside the app, which the
server turns into a 500 with the traceback in its log."""

import hashlib
import json
import threading
from wsgiref.validate import validator

RELEASE = threading.Event()
CLOSED = []


class Tracked:
    """An iterable whose close() is recorded, to show the server always calls it."""

    def __init__(self, name, chunks, wait_for=None):
        self.name, self.chunks, self.wait_for = name, chunks, wait_for

    def __iter__(self):
        for i, chunk in enumerate(self.chunks):
            if i == 1 and self.wait_for is not None:
                # Hold the second chunk back until the test says so, proving the first one
                # reached the client on its own.
                self.wait_for.wait(30)
            yield chunk

    def close(self):
        CLOSED.append(self.name)


def endless(name):
    try:
        while True:
            yield b"x" * 65536
    finally:
        CLOSED.append(name)


def _app(environ, start_response):
    path = environ["PATH_INFO"]
    method = environ["REQUEST_METHOD"]
    if path == "/hello":
        body = b"Hello, world!"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "13")])
        return [body]
    if path == "/echo":
        # The validator allows only read(size): loop until the terminated body ends.
        pieces = []
        while True:
            piece = environ["wsgi.input"].read(65536)
            if not piece:
                break
            pieces.append(piece)
        data = b"".join(pieces)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(data)))])
        return [data]
    if path == "/read-content-length":
        # As Django reads a body: CONTENT_LENGTH bytes, and nothing without it.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length) if length else b""
        out = json.dumps({"CONTENT_LENGTH": environ.get("CONTENT_LENGTH"),
                          "HTTP_TRANSFER_ENCODING": environ.get("HTTP_TRANSFER_ENCODING"),
                          "read": len(data), "sha256": hashlib.sha256(data).hexdigest()}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [out]
    if path == "/echo-lines":
        stream = environ["wsgi.input"]
        first = stream.readline()
        second = stream.readline(3)
        rest = stream.readlines()
        out = json.dumps({"first": first.decode("latin-1"), "second": second.decode("latin-1"),
                          "rest": [r.decode("latin-1") for r in rest]}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [out]
    if path == "/echo-iter":
        lines = [line for line in environ["wsgi.input"]]
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"%d lines;" % len(lines)] + lines
    if path == "/echo-chunks":
        stream = environ["wsgi.input"]
        sizes = []
        while True:
            piece = stream.read(1000)
            if not piece:
                break
            sizes.append(len(piece))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [("%d pieces, %d bytes" % (len(sizes), sum(sizes))).encode()]
    if path.startswith("/environ"):
        keys = {k: [type(v).__name__, v if isinstance(v, (str, bool, int)) else repr(v)]
                for k, v in environ.items()}
        body = json.dumps(keys).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    if path == "/quick-generator":
        # A generator done at once: streamed all the same (no Content-Length it never gave).
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (piece for piece in (b"quick ", b"pieces"))
    if path == "/stream":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Tracked("stream", [b"first;", b"second;", b"third"], wait_for=RELEASE)
    if path == "/release":
        RELEASE.set()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"released"]
    if path == "/endless":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return endless("endless")
    if path == "/closed":
        body = json.dumps(CLOSED).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written;")
        return [b"returned"]
    if path == "/body-not-for-head":
        # As werkzeug and Django answer: the GET's headers, and for HEAD no body at all.
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [] if environ["REQUEST_METHOD"] == "HEAD" else [b"the GET body"]
    if path == "/empty":
        start_response("204 No Content", [])
        return []
    if path == "/headers":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Set-Cookie", "a=1"),
                                  ("Set-Cookie", "b=2"), ("X-Custom", "yes")])
        return [b"ok"]
    if path == "/exc-info":
        # Start a response, fail, and replace it: allowed while nothing was sent.
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise RuntimeError("replaced")
        except RuntimeError:
            import sys
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")],
                           sys.exc_info())
        return [b"replaced by the app"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [("no route %s %s" % (method, path)).encode()]


application = validator(_app)
