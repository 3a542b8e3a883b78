"""An ASGI 3 app whose call returns an awaitable that is not a coroutine (ASGI 3 only asks
for an awaitable)."""


class Response:
    def __init__(self, scope, receive, send):
        self.scope, self.send = scope, send

    async def run(self):
        if self.scope["type"] != "http":
            return
        await self.send({"type": "http.response.start", "status": 200,
                         "headers": [(b"content-type", b"text/plain")]})
        await self.send({"type": "http.response.body", "body": b"awaitable ok"})

    def __await__(self):
        return self.run().__await__()


def app(scope, receive, send):
    return Response(scope, receive, send)
