"""Benchmark app: raw ASGI 3 WebSocket echo.

A WebSocket connection is accepted and every message is sent back as it came (text as text,
bytes as bytes) until the client disconnects. Plain HTTP requests get a 200 "ws echo", so the
benchmark can tell when the server is up. Like asgi_hello.py, the first connection or request
writes `bench-loop: <module>.<class>` of the running event loop to standard error once, and
lifespan startup and shutdown complete at once.
"""

import asyncio
import sys

HTTP_BODY = b"ws echo"
HTTP_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(HTTP_BODY)).encode())],
}
HTTP_RESPONSE_BODY = {"type": "http.response.body", "body": HTTP_BODY}
ACCEPT = {"type": "websocket.accept"}

_loop_reported = False


def report_loop():
    global _loop_reported
    _loop_reported = True
    loop = type(asyncio.get_running_loop())
    print(f"bench-loop: {loop.__module__}.{loop.__qualname__}", file=sys.stderr, flush=True)


async def lifespan(receive, send):
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def websocket(receive, send):
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send(ACCEPT)
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
        elif kind == "websocket.disconnect":
            return


async def app(scope, receive, send):
    kind = scope["type"]
    if kind == "lifespan":
        await lifespan(receive, send)
        return
    if not _loop_reported:
        report_loop()
    if kind == "websocket":
        await websocket(receive, send)
    elif kind == "http":
        await receive()
        await send(HTTP_START)
        await send(HTTP_RESPONSE_BODY)
