"""The quant factor-mining example, and its expression language and back-test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from examples.quant_factor import FactorCodeError, FactorEmptyError, FactorLoop, FactorRecord
from examples.quant_factor.backtest import backtest
from examples.quant_factor.expr import FactorSyntaxError, evaluate, parse, ranks
from examples.quant_factor.market import generate
from rdagent_loop import LoopSettings

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
