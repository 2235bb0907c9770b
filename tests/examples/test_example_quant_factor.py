"""The quant factor-mining example, and its expression language and back-test."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import pytest
from looplib import virtual_clock_params

from examples.quant_factor import (
    FactorCodeError,
    FactorEmptyError,
    FactorLoop,
    FactorRecord,
    FactorRejectedError,
    model_bill,
    model_calls,
    read_review,
)
from examples.quant_factor.backtest import backtest
from examples.quant_factor.expr import FactorSyntaxError, evaluate, parse, ranks
from examples.quant_factor.loop import Review
from examples.quant_factor.market import generate
from rdagent_loop import LoopSettings, Question, StepResult

pytestmark = pytest.mark.anyio


def make_loop(tmp_path: Path, parallel: int = 1, **kwargs: float) -> FactorLoop:
    settings = LoopSettings(
        trace_path=tmp_path / "trace", step_semaphore=parallel, progress=False, durability="flush"
    )
    return FactorLoop(settings, stocks=20, days=120, llm_latency=0, **kwargs)


async def test_mines_factors_and_keeps_the_best(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, parallel=2, mistake_rate=0)
    async with loop.run(loop_n=4) as results:
        seen = [r async for r in results]
    assert results.summary is not None
    assert (results.summary.steps, results.summary.loops) == (20, 4)
    # results of one loop arrive in step order
    for li in range(4):
        assert [r.step_idx for r in seen if r.loop_idx == li] == [0, 1, 2, 3, 4]
    assert len(loop.library) == 4
    assert all(isinstance(r, FactorRecord) and r.result is not None for r in loop.library)
    assert loop.best is not None and loop.best.result is not None
    assert loop.best.result.ic == max(r.result.ic for r in loop.library if r.result)
    factor = tmp_path / "trace" / "workspace" / f"loop_{loop.best.loop_idx}" / "factor.py"
    assert loop.best.expression in factor.read_text()
    # every model call is charged: the step that made it, the run and the session
    summary = results.summary
    assert summary.cost > 0 and summary.tokens > 0
    assert summary.cost == pytest.approx(sum(r.cost for r in seen))
    assert summary.tokens == sum(r.tokens for r in seen)
    assert (loop.spending.cost, loop.spending.tokens) == (summary.cost, summary.tokens)
    assert {r.step_name for r in seen if r.cost} == {"propose", "coding"}
    assert all(r.tokens > 0 for r in seen if r.step_name in ("propose", "coding"))


def test_a_model_call_costs_what_its_tokens_cost() -> None:
    cost, tokens = model_bill((0, None, set()), "short answer")
    assert 1000 < tokens < 1100 and cost == pytest.approx((tokens - 123) * 3e-6 + 123 * 15e-6)
    longer, more = model_bill((0, None, {"x" * 4000}), "short answer")
    assert more > tokens + 990 and longer > cost  # the prompt grows with the factors tried


async def test_a_bad_factor_skips_to_feedback(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, mistake_rate=1)  # every proposal is a known mistake
    await loop.run(loop_n=3)
    assert len(loop.library) == 3
    for li, record in enumerate(loop.library):
        error = loop.loop_prev_out[li][loop.EXCEPTION_KEY]
        assert isinstance(error, (FactorCodeError, FactorEmptyError))
        assert loop.loop_prev_out[li]["feedback"].decision is False
        assert record.result is None and record.error
    assert loop.best is None


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "close.real", "ts_mean(ret, n)", "open", "ts_skew(ret, 5)",
     "ts_mean(ret, 0)", "rank(ret, 5)", "close[0]", "lambda: 1"],
)  # fmt: skip
def test_the_expression_language_rejects_anything_else(expression: str) -> None:
    with pytest.raises(FactorSyntaxError):
        parse(expression)


def test_factors_compute_on_the_panel() -> None:
    market = generate(1, stocks=5, days=30)
    mean = evaluate("ts_mean(close, 3)", market)
    close = market.fields["close"]
    assert all(math.isnan(v) for v in mean[1])
    assert mean[10][2] == pytest.approx(sum(close[t][2] for t in (8, 9, 10)) / 3)
    assert evaluate("-delta(close, 1) / delay(close, 1)", market)[5][0] == pytest.approx(
        -(close[5][0] - close[4][0]) / close[4][0]
    )
    assert ranks([3.0, 1.0, 2.0, math.nan, 2.0]) == pytest.approx(
        [1.0, 0.0, 0.5, math.nan, 0.5], nan_ok=True
    )


def test_a_factor_that_knows_tomorrow_has_an_ic_of_one() -> None:
    market = generate(2, stocks=15, days=80)
    result = backtest(market.forward_return, market)
    assert result.ic == pytest.approx(1.0)
    assert result.long_short > 0
    with pytest.raises(FactorEmptyError):
        backtest(evaluate("log(-close)", market), market)


# -- a person in the loop (--ask), and the model calls a re-run does not pay for twice -------


def asking_loop(
    tmp_path: Path, name: str = "trace", parallel: int = 1, **options: Any
) -> FactorLoop:
    settings = LoopSettings(
        trace_path=tmp_path / name,
        step_semaphore=parallel,
        progress=False,
        durability="flush",
        **options,
    )
    return FactorLoop(settings, stocks=20, days=120, llm_latency=0, mistake_rate=0, ask_person=True)


async def test_without_ask_nothing_is_asked(tmp_path: Path) -> None:
    loop = make_loop(tmp_path, mistake_rate=0)
    seen = []
    async with loop.run(loop_n=2) as results:
        async for item in results:
            assert isinstance(item, StepResult), item  # never a Question: nobody would answer
            seen.append(item)
    assert len(seen) == 10
    assert [(c["call"], c["loop"]) for c in model_calls(tmp_path / "trace")] == [
        ("propose", 0), ("implement", 0), ("propose", 1), ("implement", 1)
    ]  # fmt: skip


async def test_a_person_approves_edits_and_rejects_factors(tmp_path: Path) -> None:
    """Answers given in process: approve, edit, reject, then an answer that means nothing
    (asked again) and "yes". Parallel: coding runs in worker processes, memoized there."""
    loop = asking_loop(tmp_path, parallel=2)
    edit = "-ts_mean(ret, 3)"
    answers: dict[int, list[Any]] = {0: [True], 1: [edit], 2: [False], 3: ["bogus(", 7, "yes"]}
    asked: list[Question] = []
    async with loop.run(loop_n=4) as results:
        async for item in results:
            if isinstance(item, Question):
                asked.append(item)
                results.answer(item.id, answers[item.loop_idx].pop(0))
    assert all(not left for left in answers.values())
    assert [(q.loop_idx, q.step_name) for q in asked] == [
        (0, "propose"), (1, "propose"), (2, "propose"), (3, "propose"), (3, "propose"),
        (3, "propose"),
    ]  # fmt: skip
    proposed = {c["loop"]: c["expression"] for c in model_calls(tmp_path / "trace")
                if c["call"] == "propose"}  # fmt: skip
    for q in asked:  # the factor is the payload
        assert q.payload["expression"] == proposed[q.loop_idx]
        assert set(q.payload) == {"name", "expression", "hypothesis"}
    assert "is not a valid factor" in asked[4].question
    assert "yes, no or an edited factor expression" in asked[5].question

    by_loop = {r.loop_idx: r for r in loop.library}
    assert by_loop[0].expression == proposed[0] and by_loop[0].result is not None
    assert by_loop[1].expression == edit and by_loop[1].name.endswith("(edited)")
    assert by_loop[1].result is not None  # the edited factor was coded, run and judged
    assert loop.loop_prev_out[1]["coding"] == edit
    assert edit in (tmp_path / "trace" / "workspace" / "loop_1" / "factor.py").read_text()
    assert by_loop[2].rejected and by_loop[2].result is None
    assert by_loop[2].expression == proposed[2]
    assert isinstance(loop.loop_prev_out[2][loop.EXCEPTION_KEY], FactorRejectedError)
    assert "coding" not in loop.loop_prev_out[2]  # skipped to feedback
    assert loop.loop_prev_out[2]["feedback"].decision is False
    assert by_loop[3].expression == proposed[3] and not by_loop[3].rejected
    # a rejected factor is never the best, and is not coded
    implemented = [c["loop"] for c in model_calls(tmp_path / "trace") if c["call"] == "implement"]
    assert sorted(implemented) == [0, 1, 3]


@pytest.mark.parametrize(
    ("answer", "verdict", "expression"),
    [(True, "approve", None), ("Yes ", "approve", None), ("y", "approve", None),
     (False, "reject", None), (None, "reject", None), ("no", "reject", None),
     ("ts_sum(ret, 5)", "edit", "ts_sum(ret, 5)"), ({"edit": " rank(ret) "}, "edit", "rank(ret)")],
)  # fmt: skip
def test_what_an_answer_means(answer: Any, verdict: str, expression: str | None) -> None:
    assert read_review(answer) == Review(verdict, expression)


@pytest.mark.parametrize(
    ("answer", "problem"),
    [("", "the answer is empty"), ("ts_skew(ret, 5)", "not a valid factor"),
     (3, "answer yes, no or an edited"), (["yes"], "answer yes, no or an edited"),
     ({"edit": 1}, "an edit must be a factor expression"),
     ({"edit": " "}, "edited expression is empty"), ({"x": "y"}, "answer yes, no or an edited")],
)  # fmt: skip
def test_an_answer_that_means_nothing_is_a_value_error(answer: Any, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        read_review(answer)


async def _stop_at_the_question_of_loop_1(loop: FactorLoop, stop: str) -> Question:
    """Run ``loop`` (loop 0 approved) until loop 1 asks; stop it there: cancelled at once,
    or by a deadline 30 s ahead (on a virtual clock). Loop 1's proposal was paid for."""
    asked = None
    with anyio.CancelScope() as scope:
        async with loop.run(loop_n=3) as results:
            async for item in results:
                if isinstance(item, Question) and item.loop_idx == 0:
                    results.answer(item.id, True)
                elif isinstance(item, Question):
                    asked = item
                    if stop == "cancel":
                        scope.cancel()
                    else:
                        scope.deadline = anyio.current_time() + 30
    assert scope.cancelled_caught
    assert asked is not None and asked.loop_idx == 1
    return asked


async def _resume_answering(loop: FactorLoop, first: Question) -> tuple[Any, Any, FactorLoop]:
    """Resume ``loop``'s session (the loop itself, if it saves none) and approve everything;
    the summary and statistics, and the loop resumed."""
    resumed = FactorLoop.load(loop.session_folder) if loop.settings.save_snapshots else loop
    run = resumed.run()  # the budget the session saved: 3 loops
    asked = []
    async with run as results:
        async for item in results:
            if isinstance(item, Question):
                asked.append(item)
                results.answer(item.id, True)
    assert asked[0] == first  # open again, the same question (its id too)
    assert [q.loop_idx for q in asked] == [1, 2]
    assert [r.loop_idx for r in resumed.library] == [0, 1, 2]
    return results.summary, run.statistics(), resumed


# the calls of a run of 3 loops that never stops (test_without_ask_nothing_is_asked, too)
PAID = [(call, li) for call in ("implement", "propose") for li in range(3)]


async def _spending_of_a_run_that_never_stops(tmp_path: Path) -> tuple[float, int]:
    loop = asking_loop(tmp_path, name="reference")
    async with loop.run(loop_n=3) as results:
        async for item in results:
            if isinstance(item, Question):
                results.answer(item.id, True)
    return loop.spending.cost, loop.spending.tokens


async def _check_stop_and_resume(tmp_path: Path, stop: str, **options: Any) -> None:
    paid = PAID
    loop = asking_loop(tmp_path, **options)
    first = await _stop_at_the_question_of_loop_1(loop, stop)
    assert loop.step_idx.get(1, 0) == 0  # loop 1's propose did not complete
    assert [(c["call"], c["loop"]) for c in model_calls(tmp_path / "trace")][-1] == ("propose", 1)

    summary, stats, resumed = await _resume_answering(loop, first)
    # the same calls as the run that never stopped: loop 1's proposal was not paid twice
    assert sorted((c["call"], c["loop"]) for c in model_calls(tmp_path / "trace")) == paid
    assert summary.replayed == 1 and stats.memo_replayed == 1
    assert stats.memo_recorded == 3  # loop 1's implement, loop 2's propose and implement
    # nor charged twice: the session spent what the run that never stopped spends
    cost, tokens = await _spending_of_a_run_that_never_stops(tmp_path)
    assert resumed.spending.tokens == tokens
    assert resumed.spending.cost == pytest.approx(cost)


async def test_a_run_that_never_stops_pays_for_each_call_once(tmp_path: Path) -> None:
    loop = asking_loop(tmp_path)
    async with loop.run(loop_n=3) as results:
        async for item in results:
            if isinstance(item, Question):
                results.answer(item.id, True)
    assert sorted((c["call"], c["loop"]) for c in model_calls(tmp_path / "trace")) == PAID


async def test_a_run_cancelled_mid_step_resumes_without_paying_twice(tmp_path: Path) -> None:
    await _check_stop_and_resume(tmp_path, "cancel")


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_a_run_stopped_at_its_deadline_mid_step_resumes_without_paying_twice(
    tmp_path: Path,
) -> None:
    # nothing saved: a virtual clock spins while real threads write (the journal lives on
    # the loop object, for its next run)
    await _check_stop_and_resume(tmp_path, "deadline", save_snapshots=False)
