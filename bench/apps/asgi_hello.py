"""Benchmark app: raw ASGI 3, a 13-byte plain-text response to every HTTP request.

The first HTTP request also writes one line, `bench-loop: <module>.<class>` of the running
event loop, to standard error, so that bench/run.sh can report which loop each server used.
The lifespan protocol is answered (startup and shutdown complete at once), so that no server
has to guess whether the app supports it.
"""

import asyncio
import sys

BODY = b"Hello, world!"
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())],
}
RESPONSE_BODY = {"type": "http.response.body", "body": BODY}

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


async def app(scope, receive, send):
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        return
    if not _loop_reported:
        report_loop()
    await send(START)
    await send(RESPONSE_BODY)
