"""The data-science example: real scripts, real child processes, skip and withdraw errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import anyio
import psutil
import pytest

from examples.data_science import CoderError, DataScienceLoop, Record, RunnerError
from examples.data_science.coder import FakeLLM, Proposal
from examples.data_science.demo import resume_report, watch_runs
from rdagent_loop import LoopSettings, StepResult

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]


def make_settings(tmp_path: Path, parallel: int = 1) -> LoopSettings:
    return LoopSettings(
        trace_path=tmp_path / "trace", step_semaphore=parallel, progress=False, durability="flush"
    )


class ScriptedLLM(FakeLLM):
    """Always proposes ``config``."""

    config: dict[str, Any] = {}

    def propose(self, loop_idx: int) -> Proposal:
        return Proposal({**self.config, "seed": loop_idx}, "scripted")


class SingularLinear(ScriptedLLM):
    # the data has a duplicated column: an unregularised linear fit cannot be solved
    config = {"model": "linear", "degree": 1, "l2": 0.0}


class SlowKnn(ScriptedLLM):
    config = {"model": "knn", "k": 5, "weights": "uniform"}


class SingularLoop(DataScienceLoop):
    def _llm(self) -> FakeLLM:
        return SingularLinear(self.trace_folder / "llm_calls.jsonl", self.seed, 0.0, 0.0)


class SlowLoop(DataScienceLoop):
    def _llm(self) -> FakeLLM:
        return SlowKnn(self.trace_folder / "llm_calls.jsonl", self.seed, 0.0, 0.0)


def llm_calls(trace: Path) -> list[dict[str, Any]]:
    """The calls the stand-in LLM really made (its call log)."""
    log = trace / "llm_calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


async def collect(loop: DataScienceLoop, **budget: Any) -> list[StepResult]:
    async with loop.run(**budget) as results:
        return [r async for r in results]


async def test_parallel_loops_train_real_models(tmp_path: Path) -> None:
    loop = DataScienceLoop(
        make_settings(tmp_path, parallel=2), bad_proposal_rate=0, bug_rate=0, llm_latency=0
    )
    results = await collect(loop, loop_n=4)
    assert len(results) == 4 * 5
    records = [r.output for r in results if r.step_name == "record"]
    assert sorted(r.loop_idx for r in records) == [0, 1, 2, 3]
    assert all(isinstance(r, Record) and r.error is None for r in records)
    assert loop.best is not None
    assert loop.best.rmse == min(r.rmse for r in records if r.rmse is not None)
    # the baseline first, then models that beat it
    baseline = next(r for r in records if r.loop_idx == 0)
    assert baseline.config == {"model": "mean"}
    assert loop.best.rmse < baseline.rmse
    for li in range(4):
        workspace = tmp_path / "trace" / "workspace" / f"loop_{li}"
        scores = json.loads((workspace / "scores.json").read_text())
        assert scores["rmse"] == pytest.approx(loop.loop_prev_out[li]["running"].rmse)
    # the model calls are charged (two in direct_exp_gen, the script in coding), nothing else
    assert {r.step_name for r in results if r.cost} == {"direct_exp_gen", "coding"}
    assert all(r.cost > 0 and r.tokens > 0 for r in results if r.step_name == "coding")
    assert loop.spending.cost == pytest.approx(sum(r.cost for r in results))
    assert loop.spending.cost > 0
    assert loop.spending.tokens == sum(r.tokens for r in results)


async def test_code_that_does_not_compile_skips_to_record(tmp_path: Path) -> None:
    loop = DataScienceLoop(make_settings(tmp_path), bad_proposal_rate=0, bug_rate=1, llm_latency=0)
    results = await collect(loop, loop_n=2)
    assert [r.step_name for r in results] == ["direct_exp_gen", "coding", "record"] * 2
    coding = [r for r in results if r.step_name == "coding"]
    assert all(isinstance(r.exception, CoderError) and r.output is None for r in coding)
    assert all("does not compile" in (r.error or "") for r in loop.trace)
    assert loop.best is None


async def test_a_crashing_script_is_a_runner_error(tmp_path: Path) -> None:
    loop = SingularLoop(make_settings(tmp_path), llm_latency=0)
    results = await collect(loop, loop_n=1)
    assert [r.step_name for r in results] == ["direct_exp_gen", "coding", "running", "record"]
    running = results[2]
    assert isinstance(running.exception, RunnerError)
    assert "singular normal equations" in str(running.exception)
    assert loop.trace[0].rmse is None
    assert "RunnerError" in (loop.trace[0].error or "")


async def test_a_bad_proposal_withdraws_the_loop_and_asks_again(tmp_path: Path) -> None:
    # every first answer breaks the policy; the answer to the second question does not
    loop = DataScienceLoop(make_settings(tmp_path), bad_proposal_rate=1, bug_rate=0, llm_latency=0)
    results = await collect(loop, loop_n=3)
    assert [r.loop_idx for r in results if r.step_name == "record"] == [0, 1, 2]
    assert [r.loop_idx for r in loop.trace] == [0, 1, 2]
    assert all("train_on" not in r.config for r in loop.trace)
    calls = [c for c in llm_calls(tmp_path / "trace") if c["call"] == "propose"]
    assert [(c["loop"], c["attempt"]) for c in calls] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)
    ]  # fmt: skip
    assert calls[0]["config"]["train_on"] == "train+valid"


async def test_the_deadline_kills_the_training_script(tmp_path: Path) -> None:
    """A run stopped mid-``running`` leaves no child process and resumes that step."""
    loop = SlowLoop(make_settings(tmp_path), n_rows=8000, llm_latency=0)
    me = psutil.Process()
    started = time.monotonic()
    with anyio.fail_after(30):
        summary = await loop.run(loop_n=1, all_duration="1.5s")
    assert summary.reason == "all_duration"
    assert time.monotonic() - started < 10
    assert loop.step_idx[0] == 2  # running did not complete: a resume runs it again
    assert me.children(recursive=True) == []


# -- memoized model calls: a stopped step run again does not pay for them twice -------------


class StopsInCritique(DataScienceLoop):
    """While ``stopping`` is set, loop 1's critique sets it and never answers (a model call
    that hangs until the run is stopped)."""

    stopping: ClassVar[anyio.Event | None] = None

    async def _think(self, call: Callable[..., Any], *args: Any) -> Any:
        stopping = type(self).stopping
        if stopping is not None and call.__name__ == "critique" and args[0] == 1:
            stopping.set()
            await anyio.sleep_forever()
        return await super()._think(call, *args)


async def test_a_resume_replays_the_model_calls_a_stopped_step_made(tmp_path: Path) -> None:
    loop = StopsInCritique(make_settings(tmp_path), bad_proposal_rate=0, bug_rate=0, llm_latency=0)
    StopsInCritique.stopping = stopping = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:

            async def stop() -> None:
                await stopping.wait()
                tg.cancel_scope.cancel("stopped during loop 1's critique")

            tg.start_soon(stop)
            await collect(loop, loop_n=2)
    finally:
        StopsInCritique.stopping = None
    trace = tmp_path / "trace"
    paid = [(c["call"], c["loop"]) for c in llm_calls(trace)]
    assert paid == [("propose", 0), ("critique", 0), ("code", 0), ("propose", 1)]

    resumed = DataScienceLoop.load(trace)
    assert type(resumed) is StopsInCritique and resumed.step_idx.get(1, 0) == 0
    with watch_runs() as runs:
        results = await collect(resumed)  # the saved budget: loop 1 still to do
    assert [r.loop_idx for r in results if r.step_name == "record"] == [1]
    paid = [(c["call"], c["loop"]) for c in llm_calls(trace)]
    assert paid[4:] == [("critique", 1), ("code", 1)]  # loop 1's proposal: paid for once
    assert [run.statistics().memo_replayed for run in runs] == [1]
    # and charged once: the session spent what two loops that never stopped spend
    reference = DataScienceLoop(
        make_settings(tmp_path / "reference"), bad_proposal_rate=0, bug_rate=0, llm_latency=0
    )
    await collect(reference, loop_n=2)
    assert resumed.spending.tokens == reference.spending.tokens > 0
    assert resumed.spending.cost == pytest.approx(reference.spending.cost)
    assert resume_report(runs) == [
        "the resume replayed 1 model call from the journal instead of paying for it again; "
        "2 new model calls made"
    ]


def test_the_demo_says_what_a_resume_replayed(tmp_path: Path) -> None:
    """Ctrl-C while loop 1's critique thinks, then ``demo --resume``: the last line says the
    resume replayed loop 1's proposal, and the model was asked for it once."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "rdagent_loop", "demo", "--trace-path", "t", "--no-progress"]
    journaled = tmp_path / "t" / "__session__" / ".journal" / "1" / "0.0"  # loop 1's proposal
    with subprocess.Popen(
        [*command, "--loop-n", "2", "--parallel", "1", "--llm-latency", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as first:  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not journaled.exists():  # then the critique thinks for 2 s: stop it there
                assert first.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            first.send_signal(signal.SIGINT)
            out, err = first.communicate(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
    assert first.returncode == 130, err
    assert "interrupted by Ctrl-C (SIGINT) after 5 steps" in out
    assert [c["call"] for c in llm_calls(tmp_path / "t") if c["loop"] == 1] == ["propose"]

    done = subprocess.run(
        [*command, "--resume", "t"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "finished: 5 steps, 1 loop completed; stopped by loop_n" in done.stdout
    assert lines[-1] == (
        "the resume replayed 1 model call from the journal instead of paying for it again; "
        "2 new model calls made"
    )
    calls = [c["call"] for c in llm_calls(tmp_path / "t") if c["loop"] == 1]
    assert calls == ["propose", "critique", "code"]
