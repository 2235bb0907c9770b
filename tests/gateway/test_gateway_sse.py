"""The gateway over real HTTP: Hypercorn on asyncio and trio, read with httpx."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from gateway_helpers import events, reading, serve

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
            # the example charges for its simulated model calls: the text says what it spent
            done = "10 steps, 2 loops completed; stopped by loop_n, cost "
            assert summary["text"].startswith(done)
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
            bad = await client.get("/runs/stream", params={"review": "1"})
            assert bad.status_code == 400
            assert bad.text == "example 'broken' cannot ask a person; review works with []"
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


async def test_a_question_pauses_its_loop_until_answered_over_http(
    tmp_path: Path, anyio_backend_name: str
) -> None:
    """``review=1000``: loop 0 alone asks (in ``feedback``). While its question is open the
    other loops keep streaming and loop 0 sends nothing; the answer POSTed lets it go on."""
    app = create_app(tmp_path)

    async def test(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            query = {"example": "quant_factor", "loops": "1000", "parallel": "2", "review": "1000"}
            run_id = ""
            question: dict[str, Any] = {}
            while_open: list[dict[str, Any]] = []  # steps streamed while the question was open
            answered = False
            after: list[dict[str, Any]] = []  # loop 0's steps after the answer
            async with (
                client.stream("GET", "/runs/stream", params=query) as response,
                reading(response) as stream,
            ):
                with anyio.fail_after(90), pytest.raises((httpx.StreamError, httpx.TransportError)):
                    async for kind, data in stream:
                        if kind == "start":
                            run_id = data["run_id"]
                            assert data["review"] == 1000
                        elif kind == "question":
                            assert not question, f"a second question: {data}"
                            question = data
                        elif kind != "step":
                            raise AssertionError(f"unexpected {kind} event: {data}")
                        elif not question:
                            assert data["loop_idx"] != 0 or data["step_name"] != "feedback"
                        elif not answered and data["loop_idx"] != 0:
                            while_open.append(data)
                            if len(while_open) == 5:  # a whole loop's worth: now answer
                                await check_and_answer(client, run_id, question)
                                answered = True
                        elif not answered:
                            raise AssertionError(f"loop 0 went on before the answer: {data}")
                        elif data["loop_idx"] == 0:
                            after.append(data)
                            if data["step_name"] == "record":
                                await response.aclose()  # hang up: the run stops
            assert question["loop_idx"] == 0 and question["step_name"] == "feedback"
            assert question["question"].startswith("loop 0: keep the factor ")
            payload = question["payload"]  # the step's dataclasses, as JSON objects
            assert sorted(payload) == ["backtest", "factor", "machine"]
            assert payload["factor"]["expression"] in question["question"]
            assert isinstance(payload["backtest"]["ic"], float)
            assert json.loads(question["payload_text"]) == payload
            assert all(d["loop_idx"] != 0 for d in while_open)
            feedback, record = after
            assert feedback["step_name"] == "feedback" and record["step_name"] == "record"
            # the answer reached the step: false rejects, whatever the machine thought
            assert feedback["output"].startswith("reject: ")
            assert feedback["output"].endswith("(the reviewer said false)")
            assert "new best" not in record["output"]
            runs = await wait_until_idle(client)
            ended = runs["ended"][-1]
            assert (ended["ended"], ended["questions"], ended["review"]) == (
                "disconnected",
                1,
                1000,
            )
            answer = await client.post(f"/runs/{run_id}/questions/{question['id']}", json=True)
            assert answer.status_code == 404
            assert answer.json()["error"] == f"no run {run_id!r} in progress"

    await serve(app, anyio_backend_name, test)


async def check_and_answer(
    client: httpx.AsyncClient, run_id: str, question: dict[str, Any]
) -> None:
    """The question is open: it is listed, bad ids and bodies are refused, then answered."""
    qid = question["id"]
    listed = (await client.get(f"/runs/{run_id}/questions")).json()["questions"]
    assert [q["id"] for q in listed] == [qid]
    assert listed[0]["question"] == question["question"]
    url = f"/runs/{run_id}/questions/"
    bad = await client.post(url + "nope", json="yes")
    assert bad.status_code == 404
    assert bad.json() == {
        "error": f"run {run_id!r} has no open question 'nope' (unknown, or answered already)",
        "question_id": "nope",
    }
    bad = await client.post(f"/runs/no-such-run/questions/{qid}", json="yes")
    assert bad.status_code == 404
    assert bad.json()["error"] == "no run 'no-such-run' in progress"
    headers = {"content-type": "application/json"}
    bad = await client.post(url + qid, content=b"{yes", headers=headers)
    assert bad.status_code == 400 and bad.json()["error"].startswith("the answer is not valid JSON")
    bad = await client.post(url + qid, content=b"NaN", headers=headers)
    assert bad.status_code == 400 and bad.json()["error"] == "NaN is not JSON"
    bad = await client.post(url + qid, content=b" ", headers={"content-type": "text/plain"})
    assert bad.status_code == 400 and bad.json()["error"] == "the answer is empty"
    bad = await client.post(url + qid, content=b"\xff", headers={"content-type": "text/plain"})
    assert bad.status_code == 400 and bad.json()["error"] == "the answer must be UTF-8 text"
    bad = await client.post(url + qid, json="yes", headers={"origin": "https://example.com"})
    assert bad.status_code == 403
    assert bad.json()["error"] == "answers are not taken from pages of https://example.com"
    # still open after all that; a JSON false rejects the factor
    ok = await client.post(url + qid, content=b"false", headers=headers)
    assert ok.status_code == 200 and ok.json() == {"answered": qid, "run_id": run_id}
    again = await client.post(url + qid, json=True)
    assert again.status_code == 404 and repr(qid) in again.json()["error"]
