"""A FastAPI app for tests/test_frameworks_asgi.py: OpenAPI docs, pydantic validation (and its
422 errors), path and query parameters, a lifespan, and a WebSocket route."""

from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Header, Request, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field


@asynccontextmanager
async def lifespan(app):
    yield {"greeting": "set at startup"}


app = FastAPI(title="Portico test API", version="1.0.0", lifespan=lifespan)


class Item(BaseModel):
    name: str = Field(min_length=1)
    price: float = Field(gt=0)
    tags: list[str] = []


@app.get("/")
async def root():
    return {"hello": "fastapi"}


@app.post("/items", status_code=201)
async def create_item(item: Item, x_request_id: Optional[str] = Header(default=None)):
    return {"item": item, "total": round(item.price * 1.2, 2), "request_id": x_request_id}


@app.get("/items/{item_id}")
def read_item(item_id: int, q: Optional[str] = None):
    # A sync view: FastAPI runs it in its thread pool.
    return {"item_id": item_id, "q": q}


@app.get("/state")
async def state(request: Request):
    # What the lifespan yielded, through the server's lifespan state.
    return {"greeting": request.state.greeting}


@app.websocket("/ws")
async def websocket(ws: WebSocket):
    await ws.accept()
    try:
        while True:
            data = await ws.receive_json()
            await ws.send_json({"echo": data, "count": len(data)})
    except WebSocketDisconnect:
        pass
