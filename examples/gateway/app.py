"""A web gateway: start a loop on request and stream its steps to the browser as they finish.

Routes:

* ``GET /`` — a small page that starts a run and shows loops and steps appearing live,
  then the summary;
* ``GET /runs/stream?example=data_science&loops=6&parallel=2`` — starts a run and streams
  it as Server-Sent Events: ``start``, one ``step`` per finished step, then ``summary`` (or
  ``failure``). The run belongs to the request: a client that disconnects stops it, and
  nothing keeps running on the server. With ``review=K`` a person judges the result of
  every K-th loop (:mod:`.review`): each question is a ``question`` event, and only the loop
  that asked waits for the answer;
* ``POST /runs/<run id>/questions/<question id>`` — answers an open question; the body is
  the answer, JSON (``Content-Type: application/json``) or plain text (taken as a string).
  404 (JSON, naming the id) for a run not in progress or a question not open, 400 for a
  body that is not an answer, 403 when a page of another site sends it (its ``Origin``);
* ``GET /runs/<run id>/questions`` — the run's open questions, as its session lists them;
* ``GET /runs`` — the runs in progress and the last runs that ended, and how they ended.

The stream is the bare ``async for result in loop.run(...)`` form, closed with ``aclosing``
so that the engine has stopped (child processes killed) when the response ends, however it
ends. Serve it with Hypercorn on asyncio or trio::

    hypercorn examples.gateway.app:app --worker-class trio      # 127.0.0.1:8000
    python -m examples.gateway --backend trio --port 8000
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import reprlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from rdagent_loop import (
    LoopBase,
    LoopRun,
    LoopSettings,
    Question,
    RunSummary,
    StepResult,
    parse_duration,
    pending_questions,
)

PAGE = Path(__file__).with_name("index.html")
# browsers ask for /favicon.ico whatever the page says: answer with a dot, not a 404
FAVICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<circle cx="8" cy="8" r="6" fill="#4477aa"/></svg>'
)
Factory = Callable[[LoopSettings], LoopBase]
ReviewFactory = Callable[..., LoopBase]  # (settings, *, review_every: int)
Emit = Callable[[str, Mapping[str, Any]], Awaitable[None]]
MAX_ANSWER = 64 * 1024  # bytes of an answer's body
MAX_PAYLOAD = 20_000  # characters of a question's payload as JSON; longer ones go as text


def default_examples() -> dict[str, Factory]:
    from examples.data_science import DataScienceLoop
    from examples.quant_factor import FactorLoop

    return {"data_science": DataScienceLoop, "quant_factor": FactorLoop}


def default_reviewed() -> dict[str, ReviewFactory]:
    from .review import ReviewedDataScienceLoop, ReviewedFactorLoop

    return {"data_science": ReviewedDataScienceLoop, "quant_factor": ReviewedFactorLoop}


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


def _plain(value: Any) -> Any:
    """``json.dumps``'s ``default``: dataclasses as objects, sets as lists, nothing else."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    raise TypeError(f"{type(value).__name__} is not JSON")


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict = 400, 400, 30, 30


def payload_json(payload: Any) -> tuple[Any, str]:
    """A question's payload for the browser: as a JSON value when it is one (dataclasses
    become objects), else ``None``; and as text: the JSON, or a bounded repr. Never raises:
    the payload is whatever the step passed."""
    if payload is None:
        return None, ""
    try:
        text = json.dumps(payload, default=_plain, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        pass
    else:
        if len(text) <= MAX_PAYLOAD:
            return json.loads(text), text
    try:
        text = _repr.repr(payload)
    except Exception:  # a broken __repr__ must not cost the run its stream
        text = f"<{type(payload).__name__} object>"
    return None, summarize(text, 2000)


def question_event(question: Question, started: float | None = None) -> dict[str, Any]:
    payload, payload_text = payload_json(question.payload)
    event = {
        "id": question.id,
        "loop_idx": question.loop_idx,
        "step_idx": question.step_idx,
        "step_name": question.step_name,
        "question": question.question,
        "payload": payload,
        "payload_text": payload_text,
        "asked_at": question.asked_at.isoformat(),
    }
    if started is not None:
        event["elapsed"] = time.monotonic() - started
    return event


class BadAnswer(ValueError):
    """The body of ``POST .../questions/<id>`` is not an answer."""


def _no_constant(name: str) -> Any:
    raise BadAnswer(f"{name} is not JSON")


async def read_answer(request: Request) -> Any:
    """The answer in a request's body: JSON with a JSON content type, else the text."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ANSWER:
            raise BadAnswer(f"the answer is longer than {MAX_ANSWER} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadAnswer("the answer must be UTF-8 text") from None
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            return json.loads(text, parse_constant=_no_constant)
        except BadAnswer:
            raise
        except (ValueError, RecursionError) as exc:
            raise BadAnswer(f"the answer is not valid JSON: {exc}") from None
    if media not in ("", "text/plain"):
        raise BadAnswer(f"send the answer as application/json or text/plain, not {media}")
    if not text.strip():
        raise BadAnswer("the answer is empty")
    return text


# -- the runs of this app -------------------------------------------------------------------


@dataclass
class RunRecord:
    run_id: str
    example: str
    trace_path: str
    started_at: str
    review: int = 0  # every review-th loop asks a person (0: none)
    steps: int = 0
    questions: int = 0  # asked so far
    ended: str | None = None  # "finished", "failed", "disconnected"


@dataclass(frozen=True)
class LiveRun:
    """What the other routes need of a run in progress: its ``answer`` and its session."""

    answer: Callable[[str, Any], None]
    trace_path: Path
    settings: LoopSettings


@dataclass
class Registry:
    """The runs this app has in progress: the server's own word on whether a run stopped."""

    active: dict[str, RunRecord] = field(default_factory=dict)
    live: dict[str, LiveRun] = field(default_factory=dict)
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
async def stepping(run: LoopRun) -> AsyncIterator[AsyncIterator[StepResult | Question]]:
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
    reviewed: Mapping[str, ReviewFactory] | None = None,
    max_loops: int = 1000,
    heartbeat: float = 15.0,
) -> Starlette:
    """The gateway; each run's session goes to ``trace_root/<run id>``.

    ``reviewed``: the examples that can ask a person (``?review=K``), built as
    ``factory(settings, review_every=K)``; by default those of :mod:`.review`, or none when
    ``examples`` is given.
    """
    root = Path(trace_root or os.environ.get("RDAGENT_GATEWAY_TRACE_ROOT", "log/gateway"))
    factories = dict(examples) if examples is not None else default_examples()
    if reviewed is None:
        reviewed = default_reviewed() if examples is None else {}
    reviewers = dict(reviewed)
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
            review = _int(request, "review", 0, 0, max_loops) or 0
            if review and example not in reviewers:
                raise ValueError(
                    f"example {example!r} cannot ask a person; review works with "
                    f"{sorted(reviewers)}"
                )
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
        if review:
            loop = reviewers[example](settings, review_every=review)
        else:
            loop = factories[example](settings)
        now = datetime.now(timezone.utc).isoformat()
        record = RunRecord(run_id, example, str(trace), now, review=review)

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
                        "review": review,
                        "trace_path": str(trace),
                    },
                )
                try:
                    handle = loop.run(loop_n=loop_n, step_n=step_n, all_duration=timeout)
                    async with stepping(handle) as results:
                        registry.live[run_id] = LiveRun(handle.answer, trace, loop.settings)
                        async for result in results:
                            if isinstance(result, Question):
                                record.questions += 1
                                await emit("question", question_event(result, started))
                                continue
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
                registry.live.pop(run_id, None)
                registry.active.pop(run_id, None)
                registry.ended.append(record)

        return EventStream(produce, heartbeat=heartbeat)

    def not_running(run_id: str) -> Response:
        return JSONResponse(
            {"error": f"no run {run_id!r} in progress", "run_id": run_id}, status_code=404
        )

    async def questions(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        live = registry.live.get(run_id)
        if live is None:
            return not_running(run_id)
        # the session's own list (answers left from elsewhere count); read off the event loop
        try:
            found = await anyio.to_thread.run_sync(
                lambda: pending_questions(live.trace_path, settings=live.settings)
            )
        except FileNotFoundError:  # the engine has not written the session yet
            found = []
        listed = [question_event(q) for q in found]
        return JSONResponse({"run_id": run_id, "questions": listed})

    async def answer(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        question_id = request.path_params["question_id"]
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            # a browser says where a page's request comes from: only this gateway's page
            # answers, not any site the person has open
            return JSONResponse(
                {"error": f"answers are not taken from pages of {origin}"}, status_code=403
            )
        live = registry.live.get(run_id)
        if live is None:
            return not_running(run_id)
        try:
            value = await read_answer(request)
            live.answer(question_id, value)
        except KeyError:
            return JSONResponse(
                {
                    "error": f"run {run_id!r} has no open question {question_id!r} "
                    "(unknown, or answered already)",
                    "question_id": question_id,
                },
                status_code=404,
            )
        except (BadAnswer, TypeError) as exc:  # TypeError: it does not pickle
            return JSONResponse({"error": str(exc), "question_id": question_id}, status_code=400)
        return JSONResponse({"answered": question_id, "run_id": run_id})

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/favicon.ico", favicon),
            Route("/runs", runs),
            Route("/runs/stream", stream),
            Route("/runs/{run_id}/questions", questions),
            Route("/runs/{run_id}/questions/{question_id}", answer, methods=["POST"]),
        ]
    )
    app.state.registry = registry
    return app


app = create_app()
