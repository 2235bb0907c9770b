"""A real Hypercorn server for the gateway tests, on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from hypercorn.config import Config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_listening(port: int, timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                await anyio.sleep(0.02)
            else:
                await stream.aclose()
                return


async def serve(app: Any, backend: str, test: Callable[[str], Awaitable[None]]) -> None:
    """Run ``app`` under Hypercorn on the current backend while ``test(base_url)`` runs."""
    port = free_port()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.graceful_timeout = 1.0
    config.errorlog = None
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        if backend == "trio":
            from hypercorn.trio import serve as hypercorn_serve
        else:
            from hypercorn.asyncio import serve as hypercorn_serve  # type: ignore[assignment]
        tg.start_soon(lambda: hypercorn_serve(app, config, shutdown_trigger=stop.wait))
        await wait_listening(port)
        try:
            await test(f"http://127.0.0.1:{port}")
        finally:
            stop.set()


@asynccontextmanager
async def reading(
    response: httpx.Response,
) -> AsyncIterator[AsyncIterator[tuple[str, dict[str, Any]]]]:
    """``events(response)`` for a test that may leave it early (a failed assertion, a
    timeout): on the way out the response is closed and the reading goes on until it fails,
    so that httpx's async generators end there instead of being left to the GC (whose
    finalizer can hang the asyncio runner's shutdown)."""
    stream = events(response)
    try:
        yield stream
    finally:
        await response.aclose()
        with contextlib.suppress(httpx.StreamError, httpx.TransportError):
            async for _ in stream:
                pass


async def events(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Parse a ``text/event-stream`` body into (event, data) pairs."""
    event, data = "message", ""
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, json.loads(data)
            event, data = "message", ""
        elif line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            data += line[len("data: ") :]
