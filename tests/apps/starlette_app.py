"""A Starlette app for tests/test_frameworks_asgi.py: routing with path parameters, JSON, a
form, a streaming response, server-sent events, a file response, lifespan state, and a
WebSocket route."""

import asyncio
import contextlib
import os

from starlette.applications import Starlette
from starlette.responses import (FileResponse, JSONResponse, PlainTextResponse, RedirectResponse,
                                 StreamingResponse)
from starlette.routing import Route, WebSocketRoute

HERE = os.path.dirname(os.path.abspath(__file__))


async def home(request):
    return PlainTextResponse("Hello from Starlette")


async def user(request):
    return JSONResponse({"name": request.path_params["name"],
                         "query": dict(request.query_params)})


async def form(request):
    data = await request.form()
    return JSONResponse({"fields": {k: data.getlist(k) for k in data.keys()}})


async def stream(request):
    async def numbers():
        for i in range(5):
            yield f"line {i}\n".encode()
            await asyncio.sleep(0.01)
    return StreamingResponse(numbers(), media_type="text/plain")


async def events(request):
    """Server-sent events whose first event never comes; the generator writes `marker` when it
    is stopped."""
    marker = request.query_params["marker"]

    async def waiting():
        try:
            await asyncio.Event().wait()
            yield b"data: never\n\n"
        finally:
            with open(marker, "w") as out:
                out.write("stopped\n")
    return StreamingResponse(waiting(), media_type="text/event-stream")


async def file(request):
    # Starlette sends this with http.response.pathsend where the server offers it.
    return FileResponse(os.path.join(HERE, "starlette_app.py"), media_type="text/x-python")


async def state(request):
    return JSONResponse({"greeting": request.state.greeting})


async def old(request):
    return RedirectResponse("/users/moved", status_code=301)


async def echo(websocket):
    await websocket.accept(subprotocol=None)
    async for text in websocket.iter_text():
        await websocket.send_text(text.upper())
    await websocket.close()


@contextlib.asynccontextmanager
async def lifespan(app):
    yield {"greeting": "hello from lifespan"}


app = Starlette(routes=[
    Route("/", home),
    Route("/users/{name}", user),
    Route("/form", form, methods=["POST"]),
    Route("/stream", stream),
    Route("/events", events),
    Route("/file", file),
    Route("/state", state),
    Route("/old", old),
    WebSocketRoute("/ws", echo),
], lifespan=lifespan)
