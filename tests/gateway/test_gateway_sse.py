"""The gateway over real HTTP: Hypercorn on asyncio and trio, read with httpx."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from gateway_helpers import events, serve

from examples.gateway.app import create_app
from examples.quant_factor import FactorLoop
from rdagent_loop import LoopSettings

pytestmark = pytest.mark.anyio

STEPS = ["propose", "coding", "running", "feedback", "record"]


@pytest.fixture
def anyio_backend_name(anyio_backend: Any) -> str:
    name: str = anyio_backend[0]
    return name


async def wait_until_idle(client: httpx.AsyncClient, timeout: float = 60) -> dict[str, Any]:
    """Poll ``/runs`` until nothing runs; return what it said last (``timeout`` only guards
    against a hang: how fast a run stops is told by its step count, not by the clock)."""
    with anyio.fail_after(timeout):
        while True:
            runs: dict[str, Any] = (await client.get("/runs")).json()
            if not runs["active"]:
                return runs
            await anyio.sleep(0.05)


async def test_streams_a_run(tmp_path: Path, anyio_backend_name: str) -> None:
    app = create_app(tmp_path)

    async def test(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            page = await client.get("/")
            assert page.status_code == 200 and "EventSource" in page.text
            seen: list[tuple[str, dict[str, Any]]] = []
            query = {"example": "quant_factor", "loops": "2", "parallel": "2"}
            async with client.stream("GET", "/runs/stream", params=query) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                seen = [item async for item in events(response)]
            kinds = [kind for kind, _ in seen]
            assert kinds == ["start"] + ["step"] * 10 + ["summary"]
            start, summary = seen[0][1], seen[-1][1]
            assert start["steps"] == STEPS and start["loop_n"] == 2
            for li in (0, 1):
                steps = [d for kind, d in seen if kind == "step" and d["loop_idx"] == li]
                assert [d["step_name"] for d in steps] == STEPS
                assert all(d["ok"] and d["duration"] >= 0 for d in steps)
            assert (summary["steps"], summary["loops"], summary["reason"]) == (10, 2, "loop_n")
            assert summary["text"] == "10 steps, 2 loops completed; stopped by loop_n"
            runs = await wait_until_idle(client)
            assert runs["ended"][-1]["ended"] == "finished"

    await serve(app, anyio_backend_name, test)


async def test_a_client_that_leaves_stops_its_run(tmp_path: Path, anyio_backend_name: str) -> None:
    """Nothing keeps running on the server: no run, no training script, no worker."""
    app = create_app(tmp_path)
    me = psutil.Process()

    async def test(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            query = {"example": "data_science", "loops": "1000", "parallel": "2"}
            async with client.stream("GET", "/runs/stream", params=query) as response:
                steps = 0
                # hang up mid-stream; the reading goes on until it fails, so that httpx's
                # async generators end there (breaking out would leave them to the GC)
                with pytest.raises((httpx.StreamError, httpx.TransportError)):
                    async for kind, _ in events(response):
                        steps += kind == "step"
                        if steps == 4:
                            assert len(app.state.registry.active) == 1
                            await response.aclose()
            runs = await wait_until_idle(client)
            ended = runs["ended"][-1]
            assert ended["ended"] == "disconnected"
            assert ended["steps"] < 40  # it stopped, long before its 1000 loops
            with anyio.fail_after(60):  # a process pool may take a moment to exit
                while me.children(recursive=True):
                    await anyio.sleep(0.05)

    await serve(app, anyio_backend_name, test)


class Broken(FactorLoop):
    def feedback(self, prev_out: dict[str, Any]) -> Any:
        raise RuntimeError("the judge is out")


def broken(settings: LoopSettings) -> Broken:
    return Broken(settings, stocks=10, days=60, llm_latency=0)


async def test_a_failing_run_ends_with_a_failure_event(
    tmp_path: Path, anyio_backend_name: str
) -> None:
    app = create_app(tmp_path, examples={"broken": broken})

    async def test(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            bad = await client.get("/runs/stream", params={"loops": "many"})
            assert bad.status_code == 400
            assert bad.text == "loops must be a whole number, got 'many'"
            bad = await client.get("/runs/stream", params={"example": "nope"})
            assert bad.status_code == 400 and "example must be one of ['broken']" in bad.text
            query = {"loops": "1", "parallel": "1"}
            async with client.stream("GET", "/runs/stream", params=query) as response:
                seen = [item async for item in events(response)]
            kinds = [kind for kind, _ in seen]
            # the engine may drop results recorded just before an error (see the report)
            assert kinds[0] == "start" and kinds[-1] == "failure"
            assert 1 <= kinds.count("step") == len(kinds) - 2
            message = seen[-1][1]["message"]
            assert message.startswith("RuntimeError: the judge is out")
            assert "feedback" in message  # the note naming the loop and the step
            runs = await wait_until_idle(client)
            assert runs["ended"][-1]["ended"] == "failed"

    await serve(app, anyio_backend_name, test)
