"""An ASGI app whose requests go on after their response has ended, as Starlette's
BackgroundTasks run in the app's call: `/later` works BACKGROUND_SECONDS more, `/forever`
until it is cancelled. Each step is a line on stderr, so a test can tell their order against
the lifespan shutdown."""

import asyncio
import os
import sys


def say(line):
    print(f"background: {line}", file=sys.stderr, flush=True)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                say("lifespan shutdown")
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"answered"})
    if scope["path"] == "/later":
        say("task begun")
        await asyncio.sleep(float(os.environ.get("BACKGROUND_SECONDS", "1.5")))
        say("task done")
    elif scope["path"] == "/forever":
        say("forever begun")
        try:
            await asyncio.sleep(3600)
        finally:
            say("forever cleaned up")
