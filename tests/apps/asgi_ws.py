"""Fixture ASGI 3 WebSocket app (no framework). Routes by path below the mount; lines printed
to stderr start with "ws:" and land in the server's log."""

import asyncio
import json
import sys

from asgi_probe import describe


def log(text):
    print(f"ws: {text}", file=sys.stderr, flush=True)


async def report_disconnect(message, send):
    log(f"disconnect code={message.get('code')} reason={message.get('reason')!r} "
        f"has_reason={'reason' in message}")
    try:
        await send({"type": "websocket.send", "text": "after disconnect"})
        log("send after disconnect did not raise")
    except Exception as exc:  # noqa: BLE001 - the class is what the test looks at
        log(f"send after disconnect raised {type(exc).__name__} oserror={isinstance(exc, OSError)}")


async def wait_disconnect(receive, send):
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return await report_disconnect(message, send)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 426,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"14")]})
        await send({"type": "http.response.body", "body": b"websocket only"})
        return

    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):] or "/"
    connect = await receive()
    assert connect["type"] == "websocket.connect", connect

    if path == "/reject":
        await send({"type": "websocket.close"})
        return
    if path == "/deny":
        await send({"type": "websocket.http.response.start", "status": 401, "headers": [
            (b"content-type", b"text/plain"), (b"x-denied", b"yes"),
            (b"content-length", b"17")]})
        await send({"type": "websocket.http.response.body", "body": b"denied by the app"})
        return
    if path == "/raise-before-accept":
        raise ValueError("ws app fails before accept (on purpose)")

    offered = list(scope.get("subprotocols") or [])
    chosen = "chat.v2" if "chat.v2" in offered else None
    await send({"type": "websocket.accept", "subprotocol": chosen,
                "headers": [(b"x-ws-app", b"asgi_ws"), (b"set-cookie", b"ws=1")]})

    if path == "/push-only":
        # Pushes and never receives again, as a feed or a ticker does: a gone client is seen
        # only when a send raises.
        try:
            while True:
                await send({"type": "websocket.send", "text": "tick"})
                await asyncio.sleep(0.005)
        except Exception as exc:  # noqa: BLE001 - the class is what the test looks at
            log(f"push-only send raised {type(exc).__name__} oserror={isinstance(exc, OSError)}")
            return

    if path == "/heartbeat":
        # receive() under a timeout, as heartbeat loops do: a cancelled receive() must neither
        # break the next one nor swallow the message that arrives after it.
        for i in range(20):
            try:
                message = await asyncio.wait_for(receive(), 0.1)
            except asyncio.TimeoutError:
                await send({"type": "websocket.send", "text": f"idle {i}"})
                continue
            except Exception as exc:  # noqa: BLE001
                await send({"type": "websocket.send", "text": f"error {type(exc).__name__}"})
                continue
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": f"got {message.get('text')}"})
        await send({"type": "websocket.close"})
        return
    if path == "/close-then-receive":
        await send({"type": "websocket.close", "code": 4000, "reason": "bye"})
        message = await receive()
        log(f"after own close: {message['type']} code={message.get('code')}")
        return
    if path.startswith("/scope"):
        await send({"type": "websocket.send", "text": json.dumps(describe(scope))})
        await wait_disconnect(receive, send)
        return
    if path == "/server-close":
        await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
        return
    if path == "/raise-after-accept":
        await receive()
        raise ValueError("ws app fails after accept (on purpose)")

    # /echo and anything else: echo text as text and bytes as bytes.
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return await report_disconnect(message, send)
        text, data = message.get("text"), message.get("bytes")
        if text is not None:
            if text == "close-me":
                await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
                return
            if text.startswith("length:"):
                await send({"type": "websocket.send", "text": f"{len(text)}"})
                continue
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": data})
