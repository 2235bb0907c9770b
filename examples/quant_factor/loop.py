"""A factor-mining R&D loop in the style of RD-Agent's qlib factor app, on generated prices.

Every loop:

* ``propose`` asks the "LLM" for a factor expression with a hypothesis — a known family
  with fresh windows, a variation of the best factor, or a blend of the best with another;
* ``coding`` turns it into a factor implementation in the loop's workspace and checks it
  (an unknown function or a bad window is a :class:`FactorCodeError`, skipping to feedback);
* ``running`` computes the factor on the whole panel and back-tests it: daily rank IC and a
  long-short quintile portfolio (a factor with no values is a :class:`FactorEmptyError`);
* ``feedback`` compares its IC with the best factor so far;
* ``record`` adds it to the factor library and keeps the best (the one step changing ``self``).

It runs under asyncio and trio alike::

    rdagent-loop run examples.quant_factor:FactorLoop --loop-n 10 --parallel 2 --backend trio
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from rdagent_loop import LoopBase, LoopSettings, step

from .backtest import BacktestResult, FactorEmptyError, backtest
from .expr import FactorSyntaxError, complexity, evaluate, parse
from .market import generate


class FactorCodeError(Exception):
    """The factor could not be implemented: the expression is not valid."""


@dataclass(frozen=True, slots=True)
class FactorProposal:
    name: str
    expression: str
    hypothesis: str

    def __str__(self) -> str:
        return f"{self.name}: {self.expression}"


@dataclass(frozen=True, slots=True)
class FactorFeedback:
    decision: bool
    reason: str

    def __str__(self) -> str:
        return ("accept: " if self.decision else "reject: ") + self.reason


@dataclass(frozen=True, slots=True)
class FactorRecord:
    loop_idx: int
    name: str
    expression: str
    result: BacktestResult | None
    error: str | None
    new_best: bool

    def __str__(self) -> str:
        if self.result is None:
            return f"loop {self.loop_idx}: {self.expression} failed ({self.error})"
        mark = " * new best" if self.new_best else ""
        return f"loop {self.loop_idx}: {self.expression} {self.result}{mark}"


# families a quant researcher would try first: (name, template, windows to pick from)
_FAMILIES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("reversal", "-ts_sum(ret, {n})", (2, 3, 5, 8, 10)),
    ("momentum", "ts_sum(ret, {n})", (10, 20, 40, 60)),
    ("low_vol", "-ts_std(ret, {n})", (10, 20, 40, 60)),
    ("mean_reversion", "-(close - ts_mean(close, {n})) / ts_std(close, {n})", (5, 10, 20)),
    ("volume_confirmation", "volume / ts_mean(volume, {n}) * ret", (5, 10, 20)),
    ("price_volume_corr", "-ts_corr(close, volume, {n})", (5, 10, 20)),
)
# what a model gets wrong now and then: a function that does not exist, a window too long,
# a factor with no values
_MISTAKES = ("ts_skew(ret, 20)", "-ts_mean(ret, 400)", "log(-close)")


class FactorLLM:
    """A seeded stand-in for the model that proposes factors."""

    def __init__(self, seed: int, mistake_rate: float) -> None:
        self.seed = seed
        self.mistake_rate = mistake_rate

    def propose(self, loop_idx: int, best: FactorRecord | None, tried: set[str]) -> FactorProposal:
        rng = random.Random(f"{self.seed}/{loop_idx}")
        if rng.random() < self.mistake_rate:
            expression = rng.choice(_MISTAKES)
            return FactorProposal("hallucinated", expression, "an idea from a paper, as recalled")
        for _ in range(30):
            roll = rng.random()
            if best is not None and best.result is not None and roll < 0.35:
                name, expression = best.name, _nudge_windows(rng, best.expression)
                why = f"the best so far ({best.name}, IC {best.result.ic:+.4f}) with other windows"
            elif best is not None and best.result is not None and roll < 0.55:
                family, template, windows = rng.choice(_FAMILIES)
                other = template.format(n=rng.choice(windows))
                name = f"{best.name}+{family}"
                expression = f"zscore({best.expression}) + zscore({other})"
                why = f"blend the best factor with {family}: the two may be uncorrelated"
            else:
                name, template, windows = rng.choice(_FAMILIES)
                expression = template.format(n=rng.choice(windows))
                why = f"{name.replace('_', ' ')} may predict tomorrow's return"
            if expression not in tried and len(expression) < 400:
                break
        return FactorProposal(name, expression, why)


def _nudge_windows(rng: random.Random, expression: str) -> str:
    def nudge(match: re.Match[str]) -> str:
        n = int(match.group(0))
        return str(max(2, min(100, round(n * rng.choice((0.5, 0.75, 1.5, 2.0))))))

    return re.sub(r"(?<=, )\d+(?=\))", nudge, expression)


class FactorLoop(LoopBase):
    """propose → coding → running → feedback → record, mining factors."""

    skip_loop_error = (FactorCodeError, FactorEmptyError)  # skip to feedback (the default)

    def __init__(
        self,
        settings: LoopSettings | None = None,
        *,
        seed: int = 0,
        stocks: int = 40,
        days: int = 300,
        mistake_rate: float = 0.1,
        llm_latency: float = 0.02,
    ) -> None:
        super().__init__(settings)
        self.seed = seed
        self.stocks = stocks
        self.days = days
        self.mistake_rate = mistake_rate
        self.llm_latency = llm_latency
        self.library: list[FactorRecord] = []
        self.best: FactorRecord | None = None

    def _workspace(self, loop_idx: int) -> Path:
        return Path(self.settings.trace_path).absolute() / "workspace" / f"loop_{loop_idx}"

    async def propose(self, prev_out: dict[str, Any]) -> FactorProposal:
        await anyio.sleep(self.llm_latency)
        tried = {r.expression for r in self.library}
        llm = FactorLLM(self.seed, self.mistake_rate)
        return llm.propose(prev_out[self.LOOP_IDX_KEY], self.best, tried)

    def coding(self, prev_out: dict[str, Any]) -> str:
        """Write the factor's implementation; return its (checked) expression."""
        proposal: FactorProposal = prev_out["propose"]
        try:
            parse(proposal.expression)
        except FactorSyntaxError as exc:
            raise FactorCodeError(str(exc)) from None
        workspace = self._workspace(prev_out[self.LOOP_IDX_KEY])
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "factor.py").write_text(
            f'"""{proposal.name}: {proposal.hypothesis}."""\n'
            "from examples.quant_factor.expr import evaluate\n\n"
            f"EXPRESSION = {proposal.expression!r}\n\n\n"
            "def compute(market):\n    return evaluate(EXPRESSION, market)\n"
        )
        return proposal.expression

    @step(executor="thread")  # CPU-bound, and it changes nothing in self
    def running(self, prev_out: dict[str, Any]) -> BacktestResult:
        """Compute the factor on the panel and back-test it."""
        market = generate(self.seed, self.stocks, self.days)
        return backtest(evaluate(prev_out["coding"], market), market)

    def feedback(self, prev_out: dict[str, Any]) -> FactorFeedback:
        error = prev_out.get(self.EXCEPTION_KEY)
        if error is not None:
            return FactorFeedback(False, f"{type(error).__name__}: {error}")
        result: BacktestResult = prev_out["running"]
        best = self.best
        if best is None or best.result is None:
            return FactorFeedback(result.ic > 0, f"first factor: IC {result.ic:+.4f}")
        if result.ic > best.result.ic:
            return FactorFeedback(True, f"IC {result.ic:+.4f} beats {best.result.ic:+.4f}")
        return FactorFeedback(False, f"IC {result.ic:+.4f} does not beat {best.result.ic:+.4f}")

    def record(self, prev_out: dict[str, Any]) -> FactorRecord:
        proposal: FactorProposal = prev_out["propose"]
        error = prev_out.get(self.EXCEPTION_KEY)
        result: BacktestResult | None = None if error is not None else prev_out.get("running")
        best = self.best
        new_best = (
            result is not None
            and result.ic > 0
            and (
                best is None
                or best.result is None
                or result.ic > best.result.ic
                or (
                    result.ic == best.result.ic
                    and complexity(proposal.expression) < complexity(best.expression)
                )
            )
        )
        record = FactorRecord(
            prev_out[self.LOOP_IDX_KEY],
            proposal.name,
            proposal.expression,
            result,
            None if error is None else f"{type(error).__name__}: {error}",
            new_best,
        )
        self.library.append(record)
        if new_best:
            self.best = record
        return record
