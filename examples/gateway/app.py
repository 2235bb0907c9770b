"""A web gateway: start a loop on request and stream its steps to the browser as they finish.

Routes:

* ``GET /`` — a small page that starts a run and shows loops and steps appearing live,
  then the summary;
* ``GET /runs/stream?example=data_science&loops=6&parallel=2`` — starts a run and streams
  it as Server-Sent Events: ``start``, one ``step`` per finished step, then ``summary`` (or
  ``failure``). The run belongs to the request: a client that disconnects stops it, and
  nothing keeps running on the server;
* ``GET /runs`` — the runs in progress and the last runs that ended, and how they ended.

The stream is the bare ``async for result in loop.run(...)`` form, closed with ``aclosing``
so that the engine has stopped (child processes killed) when the response ends, however it
ends. Serve it with Hypercorn on asyncio or trio::

    hypercorn examples.gateway.app:app --worker-class trio      # 127.0.0.1:8000
    python -m examples.gateway --backend trio --port 8000
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from rdagent_loop import LoopBase, LoopRun, LoopSettings, RunSummary, StepResult, parse_duration

PAGE = Path(__file__).with_name("index.html")
# browsers ask for /favicon.ico whatever the page says: answer with a dot, not a 404
FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<circle cx="8" cy="8" r="6" fill="#4477aa"/></svg>'
)
Factory = Callable[[LoopSettings], LoopBase]
Emit = Callable[[str, Mapping[str, Any]], Awaitable[None]]


def default_examples() -> dict[str, Factory]:
    from examples.data_science import DataScienceLoop
    from examples.quant_factor import FactorLoop

    return {"data_science": DataScienceLoop, "quant_factor": FactorLoop}


def summarize(value: Any, width: int = 120) -> str:
    if value is None:
        return ""
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def step_event(result: StepResult, started: float) -> dict[str, Any]:
    error = result.exception
    return {
        "loop_idx": result.loop_idx,
        "step_idx": result.step_idx,
        "step_name": result.step_name,
        "ok": error is None,
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "output": summarize(result.output),
        "started_at": result.started_at.isoformat(),
        "ended_at": result.ended_at.isoformat(),
        "duration": result.duration.total_seconds(),
        "elapsed": time.monotonic() - started,
    }


# -- the runs of this app -------------------------------------------------------------------


@dataclass
class RunRecord:
    run_id: str
    example: str
    trace_path: str
    started_at: str
    steps: int = 0
    ended: str | None = None  # "finished", "failed", "disconnected"


@dataclass
class Registry:
    """The runs this app has in progress: the server's own word on whether a run stopped."""

    active: dict[str, RunRecord] = field(default_factory=dict)
    ended: deque[RunRecord] = field(default_factory=lambda: deque(maxlen=50))
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def new_id(self) -> str:
        return f"{datetime.now().strftime('%H%M%S')}-{next(self._ids)}"

    def snapshot(self) -> dict[str, Any]:
        return {
            "active": [asdict(r) for r in self.active.values()],
            "ended": [asdict(r) for r in self.ended],
        }


@asynccontextmanager
async def stepping(run: LoopRun) -> AsyncIterator[AsyncIterator[StepResult]]:
    """``async for`` over a run, with the engine stopped for sure when the block ends."""
    results = aiter(run)
    try:
        yield results
    finally:
        aclose = getattr(results, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


def _summary(loop: LoopBase, results: object, steps: int, loops: int) -> RunSummary:
    """The run's summary: from the stream when it offers one, else from what was seen."""
    summary = getattr(results, "summary", None)
    if isinstance(summary, RunSummary):
        return summary
    reason: Literal["loop_n", "step_n", "all_duration"] = "loop_n"
    if loop.step_n == 0:
        reason = "step_n"
    elif loop.timer.is_timeout():
        reason = "all_duration"
    return RunSummary(steps, loops, reason)


# -- server-sent events ---------------------------------------------------------------------


class EventStream(Response):
    """A ``text/event-stream`` response whose producer is cancelled when the client leaves.

    ``produce(emit)`` sends events with ``await emit(event, data)``. The response watches
    ``http.disconnect`` beside it; a comment line every ``heartbeat`` seconds keeps proxies
    from closing an idle stream.
    """

    media_type = "text/event-stream"

    def __init__(self, produce: Callable[[Emit], Awaitable[None]], heartbeat: float = 15.0) -> None:
        # no body, so no content-length: the stream is as long as the run
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.produce = produce
        self.heartbeat = heartbeat
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lock = anyio.Lock()
        ids = itertools.count(1)

        async def send_body(body: bytes) -> None:
            async with lock:
                await send({"type": "http.response.body", "body": body, "more_body": True})

        async def emit(event: str, data: Mapping[str, Any]) -> None:
            payload = json.dumps(data, separators=(",", ":"), default=str)
            await send_body(f"id: {next(ids)}\nevent: {event}\ndata: {payload}\n\n".encode())

        async def watch_disconnect(scope: anyio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected = True
            scope.cancel()

        async def beat() -> None:
            while True:
                await anyio.sleep(self.heartbeat)
                await send_body(b": keep-alive\n\n")

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_disconnect, tg.cancel_scope)
            tg.start_soon(beat)
            await self.produce(emit)
            tg.cancel_scope.cancel()
        if not self.disconnected:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


# -- the app --------------------------------------------------------------------------------


def _int(request: Request, name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def create_app(
    trace_root: str | Path | None = None,
    *,
    examples: Mapping[str, Factory] | None = None,
    max_loops: int = 1000,
    heartbeat: float = 15.0,
) -> Starlette:
    """The gateway; each run's session goes to ``trace_root/<run id>``."""
    root = Path(trace_root or os.environ.get("RDAGENT_GATEWAY_TRACE_ROOT", "log/gateway"))
    factories = dict(examples) if examples is not None else default_examples()
    registry = Registry()

    async def index(request: Request) -> Response:
        return FileResponse(PAGE, media_type="text/html")

    async def favicon(request: Request) -> Response:
        return Response(
            FAVICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
        )

    async def runs(request: Request) -> Response:
        return JSONResponse(registry.snapshot())

    async def stream(request: Request) -> Response:
        example = request.query_params.get("example", next(iter(factories)))
        try:
            if example not in factories:
                raise ValueError(f"example must be one of {sorted(factories)}, got {example!r}")
            loop_n = _int(request, "loops", 6, 1, max_loops)
            parallel = _int(request, "parallel", 2, 1, 16)
            step_n = _int(request, "steps", None, 1, 100_000)
            raw_timeout = request.query_params.get("timeout")
            timeout = parse_duration(raw_timeout, name="timeout") if raw_timeout else None
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        run_id = registry.new_id()
        trace = root / run_id
        settings = LoopSettings(
            trace_path=trace.absolute(),
            step_semaphore=parallel or 1,
            progress=False,
            durability="flush",
        )
        loop = factories[example](settings)
        record = RunRecord(run_id, example, str(trace), datetime.now(timezone.utc).isoformat())

        async def produce(emit: Emit) -> None:
            registry.active[run_id] = record
            started = time.monotonic()
            finished: set[int] = set()
            record.ended = "disconnected"  # unless it gets further
            try:
                await emit(
                    "start",
                    {
                        "run_id": run_id,
                        "example": example,
                        "steps": list(loop.steps),
                        "loop_n": loop_n,
                        "parallel": loop.settings.max_parallel,
                        "trace_path": str(trace),
                    },
                )
                try:
                    async with stepping(
                        loop.run(loop_n=loop_n, step_n=step_n, all_duration=timeout)
                    ) as results:
                        async for result in results:
                            record.steps += 1
                            if loop.step_idx.get(result.loop_idx, 0) >= len(loop.steps):
                                finished.add(result.loop_idx)
                            await emit("step", step_event(result, started))
                except Exception as exc:
                    record.ended = "failed"
                    notes = "; ".join(getattr(exc, "__notes__", ()))
                    message = f"{type(exc).__name__}: {exc}" + (f" ({notes})" if notes else "")
                    await emit("failure", {"message": message})
                    return
                record.ended = "finished"
                best = getattr(loop, "best", None)
                summary = _summary(loop, results, record.steps, len(finished))
                await emit(
                    "summary",
                    {
                        "steps": summary.steps,
                        "loops": summary.loops,
                        "reason": summary.reason,
                        "text": str(summary),
                        "best": None if best is None else summarize(best, 200),
                        "seconds": round(time.monotonic() - started, 3),
                    },
                )
            finally:
                registry.active.pop(run_id, None)
                registry.ended.append(record)

        return EventStream(produce, heartbeat=heartbeat)

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/favicon.ico", favicon),
            Route("/runs", runs),
            Route("/runs/stream", stream),
        ]
    )
    app.state.registry = registry
    return app


app = create_app()
