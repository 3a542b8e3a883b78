"""The smallest ASGI 3 app: `portico run hello_asgi:app --interface asgi`."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return  # no lifespan or WebSocket handling in this example
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"13")],
    })
    await send({"type": "http.response.body", "body": b"Hello, world!"})
