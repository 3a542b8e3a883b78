"""Fixture ASGI 3 app (no framework) that shows the tests what the server gives it and does what
they ask: scope dumps, body echo, streaming, trailers, pathsend, errors on purpose, disconnects.

Routes are matched on the path below the app's mount (`path` minus `root_path`). Lines printed
to stderr start with "probe:" and land in the server's log. The lifespan part is steered by the
environment: PROBE_LIFESPAN = ok (default) | fail | raise | hang-shutdown; PROBE_MARKER = a file
that gets a line on each lifespan event."""

import asyncio
import json
import os
import sys
import threading
import time
import urllib.parse

EVENTS = {}
EVENTS_LOCK = threading.Lock()


def event(key):
    # threading.Event, polled from async code: right whatever threads or loops the server uses.
    with EVENTS_LOCK:
        return EVENTS.setdefault(key, threading.Event())


async def wait_event(key, timeout=10.0):
    ev = event(key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ev.is_set():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def log(text):
    print(f"probe: {text}", file=sys.stderr, flush=True)


def mark(text):
    marker = os.environ.get("PROBE_MARKER")
    if marker:
        with open(marker, "a") as f:
            f.write(text + "\n")


def describe(value):
    """JSON-able form of a scope value that keeps str and bytes apart."""
    if isinstance(value, bytes):
        return {"bytes": value.decode("latin-1")}
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"repr": repr(value), "type": type(value).__name__}


async def read_body(receive):
    """Reads the whole request body; returns (body, number of http.request events)."""
    body, events = b"", 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away while sending the body")
        assert message["type"] == "http.request", message
        events += 1
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body, events


async def respond(send, status, body, headers=(), content_type=b"text/plain"):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode())] + list(headers)})
    await send({"type": "http.response.body", "body": body})


async def lifespan(scope, receive, send):
    mode = os.environ.get("PROBE_LIFESPAN", "ok")
    log(f"lifespan scope received, asgi={scope.get('asgi')}, state={'state' in scope}")
    if mode == "raise":
        raise RuntimeError("this app does not do lifespan (on purpose)")
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            mark("startup")
            if mode == "fail":
                await send({"type": "lifespan.startup.failed",
                            "message": "database unreachable (on purpose)"})
                return
            if "state" in scope:
                scope["state"]["started_by"] = "lifespan"
                scope["state"]["items"] = ["a", "b"]
            log("lifespan startup complete")
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            mark("shutdown")
            log("lifespan shutdown received")
            if mode == "hang-shutdown":
                await asyncio.sleep(3600)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(scope, receive, send)
    if scope["type"] != "http":
        raise RuntimeError(f"unexpected scope type {scope['type']}")
    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    query = dict(urllib.parse.parse_qsl(scope["query_string"].decode("latin-1")))

    if path.startswith("/scope"):
        body, events = await read_body(receive)
        info = {"scope": describe(scope), "body_length": len(body),
                "loop": type(asyncio.get_running_loop()).__module__}
        return await respond(send, 200, json.dumps(info).encode(), content_type=b"application/json")

    if path == "/hello":
        await read_body(receive)
        return await respond(send, 200, b"Hello, world!")

    if path == "/echo":
        body, events = await read_body(receive)
        return await respond(send, 200, body, [(b"x-body-events", str(events).encode())],
                             content_type=b"application/octet-stream")

    if path == "/headers":
        await read_body(receive)
        await send({"type": "http.response.start", "status": 201, "headers": [
            (b"content-type", b"text/plain"), (b"set-cookie", b"a=1"), (b"x-custom", b"yes"),
            (b"set-cookie", b"b=2")]})
        return await send({"type": "http.response.body", "body": b"created"})

    if path == "/stream":
        # Three pieces with no Content-Length; the second waits until /release?key= is called.
        await read_body(receive)
        key = query.get("key", "stream")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"first;", "more_body": True})
        if not await wait_event(key):
            log("stream: never released")
        await send({"type": "http.response.body", "body": b"second;", "more_body": True})
        await send({"type": "http.response.body", "body": b"third", "more_body": False})
        return

    if path in ("/release", "/set"):
        await read_body(receive)
        event(query.get("key", "stream")).set()
        return await respond(send, 200, b"set")

    if path == "/wait":
        await read_body(receive)
        ok = await wait_event(query["key"])
        return await respond(send, 200 if ok else 504, b"released" if ok else b"timed out")

    if path == "/big":
        await read_body(receive)
        size, piece = int(query["n"]), 65536
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream"),
                                (b"content-length", str(size).encode())]})
        sent = 0
        while sent < size:
            n = min(piece, size - sent)
            sent += n
            await send({"type": "http.response.body", "body": bytes([sent % 251]) * n,
                        "more_body": sent < size})
        return

    if path == "/pathsend":
        await read_body(receive)
        file_path = query["path"]
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/octet-stream"),
            (b"content-length", str(os.path.getsize(file_path)).encode())]})
        return await send({"type": "http.response.pathsend", "path": file_path})

    if path == "/trailers":
        # Trailers only where the server offers them (HTTP/2); elsewhere the same body alone.
        await read_body(receive)
        trailers = "http.response.trailers" in scope.get("extensions", {})
        await send({"type": "http.response.start", "status": 200, "trailers": trailers,
                    "headers": [(b"content-type", b"text/plain"), (b"trailer", b"x-checksum")]})
        await send({"type": "http.response.body", "body": b"part1;", "more_body": True})
        await send({"type": "http.response.body", "body": b"part2", "more_body": False})
        if trailers and "split" in query:  # two trailers messages (more_trailers)
            await send({"type": "http.response.trailers", "more_trailers": True,
                        "headers": [(b"x-checksum", b"abc123")]})
            await send({"type": "http.response.trailers", "more_trailers": False,
                        "headers": [(b"x-more", b"later")]})
        elif trailers:
            await send({"type": "http.response.trailers", "headers": [
                (b"x-checksum", b"abc123"), (b"x-more", b"later")]})
        return

    if path == "/early-hint":
        # Early hints go before the response starts (as uvicorn and hypercorn take them).
        await read_body(receive)
        offered = "http.response.early_hint" in scope.get("extensions", {})
        if offered:
            await send({"type": "http.response.early_hint",
                        "links": [b"</style.css>; rel=preload; as=style"]})
        return await respond(send, 200, b"hinted" if offered else b"not offered")

    if path == "/raise-before":
        raise ValueError("asgi app fails before the response (on purpose)")

    if path == "/no-response":
        await read_body(receive)
        return

    if path == "/raise-after":
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"partial;", "more_body": True})
        raise ValueError("asgi app fails while streaming (on purpose)")

    if path == "/disconnect":
        # Starts an endless response, then waits to hear that the client has gone.
        await read_body(receive)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"waiting;", "more_body": True})
        message = await receive()
        log(f"receive after the client left gave {message['type']}")
        for _ in range(200):
            try:
                await send({"type": "http.response.body", "body": b"more;", "more_body": True})
            except Exception as exc:  # noqa: BLE001 - the class is what the test looks at
                log(f"send after disconnect raised {type(exc).__name__} "
                    f"oserror={isinstance(exc, OSError)}")
                return
            await asyncio.sleep(0.01)
        log("send after disconnect never raised")
        return

    if path == "/block-loop":
        # Sync code in a coroutine: the whole event loop stops for the given seconds.
        await read_body(receive)
        time.sleep(float(query.get("seconds", "30")))
        return await respond(send, 200, b"unblocked")

    if path == "/return-on-disconnect":
        # Told its body was refused, it just returns, as uvicorn lets an app do.
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                log("return-on-disconnect told http.disconnect")
                return
            if not message.get("more_body", False):
                return await respond(send, 200, b"read it all")

    if path == "/wait-disconnect":
        # Reads the whole body, then only waits: the client leaving must end the wait.
        body, _ = await read_body(receive)
        log(f"wait-disconnect read {len(body)} bytes")
        message = await receive()
        log(f"wait-disconnect gave {message['type']}")
        return

    if path == "/cancelled-receive":
        # A receive() cancelled by a timeout must not break the next one (anyio cancel scopes
        # and Starlette's is_disconnected() do this all the time).
        await read_body(receive)
        outcomes = []
        for _ in range(2):
            try:
                await asyncio.wait_for(receive(), 0.05)
                outcomes.append("message")
            except asyncio.TimeoutError:
                outcomes.append("timeout")
            except Exception as exc:  # noqa: BLE001 - the class is what the test looks at
                outcomes.append(type(exc).__name__)
        return await respond(send, 200, ",".join(outcomes).encode())

    if path == "/hold-unread":
        # Answers without reading the body, once /set?key= says so.
        ok = await wait_event(query["key"], timeout=30)
        return await respond(send, 200, b"answered without reading" if ok else b"timed out")

    if path == "/state":
        await read_body(receive)
        state = scope.get("state")
        shown = describe(dict(state)) if state is not None else None
        if state is not None and "mutate" in query:
            state["mutated_by_request"] = True
            state["items"] = ["changed"]
        return await respond(send, 200, json.dumps({"state": shown}).encode(),
                             content_type=b"application/json")

    if path.startswith("/status/"):
        await read_body(receive)
        code = int(path.rsplit("/", 1)[1])
        await send({"type": "http.response.start", "status": code, "headers": []})
        return await send({"type": "http.response.body", "body": b""})

    await read_body(receive)
    return await respond(send, 404, b"no such probe route: " + path.encode())
