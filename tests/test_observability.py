"""Logging, the progress display and run statistics."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from looplib import Chain

from rdagent_loop import LoopSettings, RunSummary
from rdagent_loop._progress import NoProgress, TqdmProgress, make_progress
from rdagent_loop._results import StepResult

pytestmark = pytest.mark.anyio


async def test_every_step_record_names_its_loop_and_step(
    settings: LoopSettings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="rdagent_loop"):
        await Chain(settings).run(loop_n=2)
    step_records = [r for r in caplog.records if getattr(r, "step_name", None)]
    assert len(step_records) >= 8
    assert {(r.loop_idx, r.step_name) for r in step_records} == {  # type: ignore[attr-defined]
        (li, s) for li in range(2) for s in ("s0", "s1", "s2", "s3")
    }
    assert any("run ended" in r.getMessage() for r in caplog.records)


def test_the_progress_display_is_off_without_a_terminal(tmp_path: Path) -> None:
    loop = Chain(LoopSettings(trace_path=tmp_path, progress=True))
    assert isinstance(make_progress(12, enabled=loop.settings.progress), NoProgress)  # no tty
    assert isinstance(make_progress(1, enabled=False), NoProgress)


def test_the_progress_bar_counts_steps_and_stays_away_while_the_application_writes() -> None:
    from datetime import datetime, timezone

    out = io.StringIO()
    progress = TqdmProgress(total=4, file=out)
    now = datetime.now(timezone.utc)
    progress.step_completed(StepResult(0, 0, "s0", 1, None, now, now))
    assert "run" in out.getvalue()  # redrawn at most every 0.1 s, or at resume
    progress.pause()
    drawn = out.getvalue()
    progress.step_completed(StepResult(1, 0, "s0", 1, None, now, now))
    assert out.getvalue() == drawn  # nothing drawn while the application holds a result
    progress.resume()
    assert "2/4" in out.getvalue()[len(drawn) :]
    assert "loop 1 s0" in out.getvalue()[len(drawn) :]
    progress.close()
    progress.close()  # twice is harmless


async def test_statistics_count_the_run(settings: LoopSettings) -> None:
    handle = Chain(settings.model_copy(update={"step_semaphore": 2}), delay=0.01).run(loop_n=3)
    async with handle as results:
        async for _ in results:
            stats = handle.statistics()
            assert stats.loops_in_flight <= 2
    stats = handle.statistics()
    assert stats.steps_completed == 12
    assert stats.loops_completed == 3
    assert set(stats.peak_steps_running) == {"s0", "s1", "s2", "s3"}
    assert max(stats.peak_steps_running.values()) <= 2
    assert stats.steps_running == {"s0": 0, "s1": 0, "s2": 0, "s3": 0}


async def test_executors_are_started_only_as_loops_need_them(settings: LoopSettings) -> None:
    # room for 64 loops, 3 to run: three executor tasks, not 64, and the loops still overlap
    loop = Chain(settings.model_copy(update={"step_semaphore": 64}), delay=0.02)
    handle = loop.run(loop_n=3)
    await handle
    stats = handle.statistics()
    assert stats.loops_completed == 3
    assert stats.executors == 3
    spans = [(li, t.start, t.end) for li in range(3) for t in loop.loop_trace[li]]
    assert any(a < d and c < b for i, a, b in spans for j, c, d in spans if i < j)


async def test_a_resume_with_more_unfinished_loops_than_executors_runs_each_step_once(
    settings: LoopSettings,
) -> None:
    # four loops past their first step, saved by a run with room for four; resumed with room
    # for two: two executors take turns over four loops
    first = Chain(settings.model_copy(update={"step_semaphore": 4}))
    for li in range(4):
        first.loop_prev_out[li] = {first.LOOP_IDX_KEY: li, "s0": f"s0@{li}"}
        first.step_idx[li] = 1
        first.executed.append((li, "s0"))
    first.loop_idx = 4
    first.dump(first.session_folder / "3" / "0_s0")
    resumed = Chain.load(
        first.session_folder, settings=settings.model_copy(update={"step_semaphore": 2})
    )
    handle = resumed.run(loop_n=4)
    assert await handle == RunSummary(steps=12, loops=4, reason="loop_n")
    assert handle.statistics().executors == 2
    assert sorted(resumed.executed) == sorted((li, s) for li in range(4) for s in resumed.steps)


async def test_records_logged_inside_a_step_carry_its_loop_and_step(
    settings: LoopSettings, caplog: pytest.LogCaptureFixture
) -> None:
    from rdagent_loop._logging import log

    class Logs(Chain):
        async def s1(self, prev_out: dict) -> str:  # type: ignore[type-arg]
            log.info("inside s1")
            return await super().s1(prev_out)

    with caplog.at_level(logging.INFO, logger="rdagent_loop"):
        await Logs(settings.model_copy(update={"save_snapshots": False})).run(loop_n=1)
    inside = [r for r in caplog.records if r.getMessage() == "inside s1"]
    assert [(r.loop_idx, r.step_name) for r in inside] == [(0, "s1")]  # type: ignore[attr-defined]
    ended = next(r for r in caplog.records if "run ended" in r.getMessage())
    assert ended.loop_idx is None  # type: ignore[attr-defined]
