"""The data-science example: real scripts, real child processes, skip and withdraw errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

from examples.data_science import CoderError, DataScienceLoop, Record, RunnerError
from examples.data_science.coder import FakeLLM, Proposal
from rdagent_loop import LoopSettings, StepResult

pytestmark = pytest.mark.anyio


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
    log = (tmp_path / "trace" / "llm_calls.jsonl").read_text()
    calls = [json.loads(line) for line in log.splitlines()]
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
