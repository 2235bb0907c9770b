"""The step journal and questions (DESIGN §3.1, §3.2), on asyncio and trio.

Memoized calls are counted in a file (``journal_loops.Calls``), so calls made in worker
processes count too. Crash tests (SIGKILL of the whole run) are in test_journal_crash.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from journal_loops import (
    Approval,
    EveryLoopMemo,
    MemoThenWait,
    RetryAfterMemo,
    SyncAsk,
    SyncRetryAfterMemo,
    WithdrawAfterMemo,
)
from looplib import virtual_clock_params

import rdagent_loop
from rdagent_loop import (
    LoopBase,
    LoopError,
    LoopSettings,
    Question,
    QuestionTimeoutError,
    StepResult,
    pending_questions,
    step,
)
from rdagent_loop._session._entries import read_journal

pytestmark = pytest.mark.anyio


def journal_files(settings: LoopSettings) -> list[Path]:
    folder = Path(settings.trace_path) / "__session__" / ".journal"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def asks_once(tmp_path: Path, settings: LoopSettings) -> Approval:
    """An ``Approval`` loop whose only question is ``propose``'s."""
    loop = Approval(tmp_path / "calls", settings=settings)
    loop.review_asks = False
    return loop


async def collect(run: Any, answer: Any = None) -> list[Any]:
    """Every item of ``run``; questions answered with ``answer(question)`` when given."""
    items = []
    async with run as results:
        async for item in results:
            items.append(item)
            if isinstance(item, Question) and answer is not None:
                results.answer(item.id, answer(item))
    return items


# -- memo ---------------------------------------------------------------------------------


async def test_memo_replays_after_the_run_is_stopped_mid_step(
    tmp_path: Path, settings: LoopSettings
) -> None:
    calls, release = tmp_path / "calls", tmp_path / "release"
    loop = MemoThenWait(calls, release, settings=settings)
    async with loop.run(loop_n=1):
        with anyio.move_on_after(30):
            while len(loop.calls.made()) < 2:  # the step has journaled both calls
                await anyio.sleep(0.01)
            # the consumer leaves: the step is cancelled mid-way, like Ctrl-C or a deadline
    assert loop.calls.made() == ["a", "b"]
    assert len(journal_files(settings)) == 2

    release.write_text("go")
    # nothing was saved (the first step never completed): started again the same way, the
    # run finds the journal of loop 0's first step
    resumed = MemoThenWait(calls, release, settings=settings)
    summary = await resumed.run(loop_n=1)
    assert resumed.calls.made() == ["a", "b"]  # not paid for twice
    assert summary.replayed == 2
    assert resumed.loop_prev_out[0]["think"] == ["value of a", "value of b"]
    assert journal_files(settings) == []  # dropped once the step completed


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_memo_replays_after_a_deadline_cancel(tmp_path: Path, settings: LoopSettings) -> None:
    calls, release = tmp_path / "calls", tmp_path / "release"
    # nothing saved (so no thread works while the virtual clock runs): the journal lives
    # on the loop object, for its next run
    settings = settings.model_copy(update={"save_snapshots": False})
    loop = MemoThenWait(calls, release, settings=settings)
    summary = await loop.run(loop_n=1, all_duration=100)
    assert summary.reason == "all_duration"
    assert loop.calls.made() == ["a", "b"]
    release.write_text("go")
    loop.timer.add_duration(timedelta(seconds=100))
    summary = await loop.run()  # the same loop object, in process
    assert summary.replayed == 2
    assert loop.calls.made() == ["a", "b"]


@pytest.mark.parametrize("fail_with", ["timeout", "error"])
async def test_memo_replays_on_a_retry(
    tmp_path: Path, settings: LoopSettings, fail_with: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(RetryAfterMemo, "fail_with", fail_with)
    loop = RetryAfterMemo(tmp_path / "calls", settings=settings)
    results = [r async for r in loop.run(loop_n=1)]
    assert [r.attempts for r in results] == [2]
    assert type(results[0].retried[0]).__name__ == (
        "StepTimeoutError" if fail_with == "timeout" else "ConnectionError"
    )
    assert results[0].output == "value of model"
    assert loop.calls.made() == ["model"]


@pytest.mark.parametrize("executor", ["inline", "thread", "process"])
async def test_memo_blocking_replays_on_every_executor(
    tmp_path: Path, settings: LoopSettings, executor: str
) -> None:
    settings = settings.model_copy(update={"step_executor": {"think": executor}})
    loop = SyncRetryAfterMemo(tmp_path / "calls", settings=settings)
    summary = await loop.run(loop_n=1)
    assert loop.calls.made() == ["model"]  # made once, in whichever process ran the step
    assert summary.replayed == 1
    assert loop.loop_prev_out[0]["record"] == "value of model"
    assert journal_files(settings) == []


async def test_no_replay_across_a_completed_step_or_loop(
    tmp_path: Path, settings: LoopSettings
) -> None:
    loop = EveryLoopMemo(tmp_path / "calls", settings=settings)
    summary = await loop.run(loop_n=3)
    assert loop.calls.made() == ["model"] * 6  # each (loop, step) pays once
    assert summary.replayed == 0
    assert journal_files(settings) == []
    assert not (Path(settings.trace_path) / "__session__" / ".journal" / "0").exists()


async def test_a_withdraw_drops_the_journal_of_the_loop_it_rolls_back(
    tmp_path: Path, settings: LoopSettings
) -> None:
    loop = WithdrawAfterMemo(tmp_path / "calls", settings=settings)
    results = [r async for r in loop.run(loop_n=1)]
    assert loop.calls.made() == ["model", "model"]  # rolled back: paid again, not replayed
    assert [r.step_name for r in results][-1] == "coding"
    assert journal_files(settings) == []


async def test_memo_outside_a_run_just_calls(tmp_path: Path, settings: LoopSettings) -> None:
    loop = EveryLoopMemo(tmp_path / "calls", settings=settings)
    assert await loop.propose({}) == "value of model"
    assert await loop.propose({}) == "value of model"
    assert loop.calls.made() == ["model", "model"]


# -- bad input ------------------------------------------------------------------------------


class BadMemo(LoopBase):
    what = "key"

    async def think(self, prev_out: dict[str, Any]) -> Any:
        if self.what == "key":
            return await self.memo(42, lambda: 1)  # type: ignore[arg-type]
        if self.what == "unpicklable":
            return await self.memo("lock", anyio_lock)
        if self.what == "blocking in async":
            return self.memo_blocking("x", lambda: 1)
        return await self.ask("when?", timeout=-1)


def anyio_lock() -> Any:
    import threading

    return threading.Lock()


@pytest.mark.parametrize(
    ("what", "error", "words"),
    [
        ("key", TypeError, "memo key must be a str, got int 42"),
        ("unpicklable", TypeError, "the result of memo key 'lock' cannot be pickled"),
        ("blocking in async", RuntimeError, "step 'think' is async"),
        ("timeout", ValueError, "timeout must be a positive number"),
    ],
)
async def test_bad_input_is_a_clear_error_and_journals_nothing(
    settings: LoopSettings,
    what: str,
    error: type[Exception],
    words: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(BadMemo, "what", what)
    with pytest.raises(error, match=words):
        await BadMemo(settings=settings).run(loop_n=1)
    assert journal_files(settings) == []


async def test_answering_an_unknown_or_answered_question_is_a_key_error(
    tmp_path: Path, settings: LoopSettings
) -> None:
    loop = asks_once(tmp_path, settings)
    run = loop.run(loop_n=1)
    async with run as results:
        async for item in results:
            if isinstance(item, Question):
                with pytest.raises(KeyError, match="'no-such-id'"):
                    results.answer("no-such-id", True)
                with pytest.raises(KeyError, match="'no-such-id'"):
                    rdagent_loop.answer(settings.trace_path, "no-such-id", True)
                results.answer(item.id, True)
                with pytest.raises(KeyError, match=repr(item.id)):
                    results.answer(item.id, False)
                with pytest.raises(KeyError, match=repr(item.id)):
                    run.answer(item.id, False)
    assert loop.loop_prev_out[0]["record"] == (True, "no review")


# -- questions ------------------------------------------------------------------------------


async def test_a_question_is_on_disk_before_the_consumer_sees_it(
    tmp_path: Path, settings: LoopSettings
) -> None:
    loop = asks_once(tmp_path, settings)
    seen: list[Question] = []

    def approve(question: Question) -> Any:
        assert pending_questions(settings.trace_path) == [question]  # durable already
        seen.append(question)
        return "approved"

    items = await collect(loop.run(loop_n=1), approve)
    question = seen[0]
    assert isinstance(question, Question)
    assert (question.loop_idx, question.step_idx, question.step_name) == (0, 0, "propose")
    assert question.question == "approve the hypothesis?"
    assert question.payload == "value of h0"
    assert question.asked_at.tzinfo is not None
    assert [type(i).__name__ for i in items] == ["Question"] + ["StepResult"] * 3
    assert items[1].output == "approved"
    assert pending_questions(settings.trace_path) == []
    with pytest.raises(AttributeError):
        question.id = "other"  # type: ignore[misc]


async def test_a_run_that_never_asks_yields_no_question(
    tmp_path: Path, settings: LoopSettings
) -> None:
    items = await collect(EveryLoopMemo(tmp_path / "calls", settings=settings).run(loop_n=2))
    assert all(isinstance(i, StepResult) for i in items)


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_a_waiting_loop_lends_its_slot_to_a_sibling(
    tmp_path: Path, settings: LoopSettings
) -> None:
    """``review`` has a limit of 1. Loop 0's review waits for an answer that is given only
    once loop 1's review has completed: without the slot lent, the run would never end."""
    settings = settings.model_copy(update={"step_semaphore": 2, "save_snapshots": False})
    loop = Approval(tmp_path / "calls", settings=settings)
    order: list[str] = []
    with anyio.fail_after(1000):
        async with loop.run(loop_n=2) as results:
            pending: Question | None = None
            async for item in results:
                if isinstance(item, Question):
                    order.append(f"asked {item.loop_idx} {item.step_name}")
                    if item.step_name == "propose":
                        results.answer(item.id, f"ok {item.loop_idx}")
                    else:
                        pending = item
                else:
                    order.append(f"done {item.loop_idx} {item.step_name}")
                    if (item.loop_idx, item.step_name) == (1, "review"):
                        assert pending is not None
                        results.answer(pending.id, "reviewed")
    assert results._run.statistics().peak_steps_running["review"] == 1  # the limit held
    assert order.index("asked 0 review") < order.index("done 1 review")
    assert order.index("done 1 review") < order.index("done 0 review")
    assert loop.loop_prev_out[0]["record"] == ("ok 0", "reviewed")


@pytest.mark.parametrize("executor", ["inline", "thread", "process"])
async def test_ask_blocking_pauses_one_loop_on_every_executor(
    tmp_path: Path, settings: LoopSettings, executor: str
) -> None:
    """Loop 0's sync ``review`` waits; loop 1 runs to its end meanwhile; then loop 0 is
    answered. What the step memoized before it asked is not paid for twice (inline: the
    step runs again once answered)."""
    # one review at a time: loop 1's review runs only if loop 0's lends its slot, and its
    # thread or worker process
    limits = {"propose": 2, "review": 1, "record": 1}
    settings = settings.model_copy(
        update={
            "step_semaphore": limits,
            "step_executor": {"review": executor},
            "process_workers": 1,
        }
    )
    loop = SyncAsk(tmp_path / "calls", settings=settings)
    order: list[str] = []
    with anyio.fail_after(60):  # without the slot, thread or worker lent: never ends
        await _answer_loop_0_after_loop_1(loop, order)
    assert order.index("asked 0") < order.index("done 1 record") < order.index("done 0 record")
    assert loop.loop_prev_out[0]["record"] == {"verdict": "good"}
    assert sorted(loop.calls.made()) == ["draft0", "draft1"]
    trace = loop.loop_trace[0][1]
    assert trace.step_name == "review" and len(trace.waits) == 1
    assert trace.start <= trace.waits[0][0] <= trace.waits[0][1] <= trace.end


async def _answer_loop_0_after_loop_1(loop: SyncAsk, order: list[str]) -> None:
    async with loop.run(loop_n=2) as results:
        asked: dict[int, Question] = {}
        async for item in results:
            if isinstance(item, Question):
                order.append(f"asked {item.loop_idx}")
                asked[item.loop_idx] = item
                if len(asked) == 2:  # loop 0 waits: now let loop 1 go on to its end
                    results.answer(asked[1].id, "fine")
            else:
                order.append(f"done {item.loop_idx} {item.step_name}")
                if (item.loop_idx, item.step_name) == (1, "record"):
                    results.answer(asked[0].id, {"verdict": "good"})


async def test_an_answer_from_another_process_is_taken(
    tmp_path: Path, settings: LoopSettings
) -> None:
    loop = asks_once(tmp_path, settings)
    async with loop.run(loop_n=1) as results:
        async for item in results:
            if isinstance(item, Question):
                code = (
                    "import sys, rdagent_loop; "
                    "rdagent_loop.answer(sys.argv[1], sys.argv[2], {'from': 'elsewhere'})"
                )
                done = await anyio.run_process(
                    [sys.executable, "-c", code, str(settings.trace_path), item.id],
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                    check=False,
                    stderr=subprocess.PIPE,
                )
                assert done.returncode == 0, done.stderr.decode()
    assert loop.loop_prev_out[0]["propose"] == {"from": "elsewhere"}


async def test_a_question_open_when_the_run_stops_is_open_again_with_the_same_id(
    tmp_path: Path, settings: LoopSettings
) -> None:
    loop = asks_once(tmp_path, settings)
    async with loop.run(loop_n=1) as results:
        async for item in results:
            assert isinstance(item, Question)
            first = item
            break  # the consumer leaves, like Ctrl-C: the waiting step is cancelled
    assert [q.id for q in pending_questions(settings.trace_path)] == [first.id]
    with pytest.raises(FileNotFoundError, match="the journal of the first loop's first step"):
        Approval.load(settings.trace_path)  # nothing was saved: started again, it goes on

    resumed = asks_once(tmp_path, settings)
    items = await collect(resumed.run(loop_n=1), lambda q: f"answered {q.id}")
    questions = [i for i in items if isinstance(i, Question)]
    assert questions == [first]  # the same question, the same id, asked once more
    assert resumed.loop_prev_out[0]["propose"] == f"answered {first.id}"
    assert resumed.calls.made() == ["h0"]  # the hypothesis was not paid for twice
    assert pending_questions(settings.trace_path) == []


async def test_an_answer_left_while_no_run_goes_is_taken_without_asking_again(
    tmp_path: Path, settings: LoopSettings
) -> None:
    loop = asks_once(tmp_path, settings)
    async with loop.run(loop_n=1) as results:
        async for _ in results:
            break
    (question,) = pending_questions(settings.trace_path)
    rdagent_loop.answer(settings.trace_path, question.id, "approved offline")
    assert pending_questions(settings.trace_path) == []
    with pytest.raises(KeyError, match=repr(question.id)):
        rdagent_loop.answer(settings.trace_path, question.id, "again")

    resumed = asks_once(tmp_path, settings)
    items = await collect(resumed.run(loop_n=1))
    assert not any(isinstance(i, Question) for i in items)
    assert resumed.loop_prev_out[0]["propose"] == "approved offline"
    answers = Path(settings.trace_path) / "__session__" / ".answers"
    assert not any(answers.iterdir())


class RetriedAsk(LoopBase):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attempts = 0

    @step(retries=1, backoff=0.01)
    async def decide(self, prev_out: dict[str, Any]) -> Any:
        verdict = await self.ask("go?")
        self.attempts += 1
        if self.attempts == 1:
            raise ConnectionError("lost the result")
        return verdict


async def test_a_replayed_answer_never_produces_a_second_question(
    settings: LoopSettings,
) -> None:
    loop = RetriedAsk(settings=settings)
    items = await collect(loop.run(loop_n=1), lambda q: "yes")
    assert [type(i).__name__ for i in items] == ["Question", "StepResult"]
    assert items[1].output == "yes" and items[1].attempts == 2


class Timeouts(LoopBase):
    with_default = True

    @step(timeout=50)
    async def decide(self, prev_out: dict[str, Any]) -> Any:
        if self.with_default:
            return await self.ask("go?", timeout=100, default="no answer")
        try:
            return await self.ask("go?", timeout=100)
        except QuestionTimeoutError as exc:
            return exc


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
@pytest.mark.parametrize("with_default", [True, False])
async def test_a_question_times_out_with_its_default_or_an_error(
    settings: LoopSettings, with_default: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's own timeout (50) does not run while it waits (100) for an answer."""
    monkeypatch.setattr(Timeouts, "with_default", with_default)
    settings = settings.model_copy(update={"save_snapshots": False})
    loop = Timeouts(settings=settings)
    started = anyio.current_time()
    items = await collect(loop.run(loop_n=1))
    assert anyio.current_time() - started == pytest.approx(100, abs=1)
    output = items[-1].output
    if with_default:
        assert output == "no answer"
    else:
        assert isinstance(output, QuestionTimeoutError)
        assert isinstance(output, LoopError) and isinstance(output, TimeoutError)
        assert items[0].id in str(output)
        assert "100s" in str(output)


async def test_inspecting_the_journal_while_a_question_waits(
    tmp_path: Path, settings: LoopSettings
) -> None:
    loop = asks_once(tmp_path, settings)
    async with loop.run(loop_n=1) as results:
        async for item in results:
            if not isinstance(item, Question):
                continue
            found = read_journal(Path(settings.trace_path) / "__session__", None)
            assert [e.kind for e in found[(0, 0)].entries] == ["memo", "question"]
            stats = results._run.statistics()
            assert stats.steps_waiting == {"propose": 1} and stats.questions_open == 1
            assert stats.memo_recorded == 1
            results.answer(item.id, "ok")


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_the_deadline_cancels_a_step_waiting_for_an_answer(
    tmp_path: Path, settings: LoopSettings
) -> None:
    settings = settings.model_copy(update={"save_snapshots": False})
    loop = asks_once(tmp_path, settings)
    started = anyio.current_time()
    items = []
    async with loop.run(loop_n=1, all_duration=10) as results:
        async for item in results:
            items.append(item)  # never answered
    assert anyio.current_time() - started == pytest.approx(10, abs=0.1)
    assert results.summary is not None and results.summary.reason == "all_duration"
    assert [type(i).__name__ for i in items] == ["Question"]
