"""Drive an ASGI app in-process: its lifespan, and requests whose responses stream back as they are sent.

A replica runs the single-process server's FastAPI app this way, so the scale-out serves exactly its
routes, errors, streaming and auth, with no socket between the replica's entry point and the app.
(httpx's ``ASGITransport`` would collect a streamed body whole before returning it.)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it; ``prompt`` is the text the request router matches."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prompt: str | None = None


@dataclass(frozen=True)
class ResponseStart:
    """The status and headers of a response, sent before its body chunks."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class LifespanError(RuntimeError):
    """The app's startup or shutdown failed."""


class AsgiApp:
    """One ASGI app, started with ``startup`` and served one ``request`` at a time or concurrently."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._lifespan: asyncio.Task | None = None
        self._to_app: asyncio.Queue = asyncio.Queue()
        self._from_app: asyncio.Queue = asyncio.Queue()

    async def startup(self) -> None:
        """Run the app's lifespan startup (for the server: start the engine loop)."""
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.create_task(self.app(scope, self._to_app.get, self._from_app.put))
        await self._lifespan_step("startup")

    async def shutdown(self) -> None:
        """Run the app's lifespan shutdown (for the server: stop the engine loop)."""
        if self._lifespan is not None and not self._lifespan.done():
            await self._lifespan_step("shutdown")

    async def _lifespan_step(self, step: str) -> None:
        await self._to_app.put({"type": f"lifespan.{step}"})
        message = await self._from_app.get()
        if message["type"] != f"lifespan.{step}.complete":
            raise LifespanError(f"lifespan {step} failed: {message.get('message', message['type'])}")

    async def request(self, req: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """The response to ``req``: a ``ResponseStart``, then body chunks as the app sends them.

        Closing the iterator early is a client disconnect: the app sees ``http.disconnect`` (the server
        then cancels the request's generation) and is cancelled if it does not finish by itself."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req.method,
                 "scheme": "http", "path": req.path, "raw_path": req.path.encode(), "root_path": "",
                 "query_string": req.query_string, "headers": req.headers, "client": ("127.0.0.1", 0),
                 "server": ("127.0.0.1", 80)}
        sent: asyncio.Queue = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        task = asyncio.create_task(self.app(scope, receive, sent.put))
        task.add_done_callback(lambda _: sent.put_nowait(None))  # wakes the reader however the app ends
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    yield ResponseStart(message["status"], list(message.get("headers", [])))
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        return
            task.result()  # the app ended without finishing its response: raise what it raised
        finally:
            disconnected.set()
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), 5.0)
                except Exception:  # noqa: BLE001 - a timeout or the app's error: the client is gone either way
                    task.cancel()
