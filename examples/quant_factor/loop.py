"""A factor-mining R&D loop in the style of RD-Agent's qlib factor app, on generated prices.

Every loop:

* ``propose`` asks the "LLM" for a factor expression with a hypothesis — a known family
  with fresh windows, a variation of the best factor, or a blend of the best with another.
  With ``ask_person=True`` (``python -m examples.quant_factor --ask``) a person then approves
  the factor, edits its expression, or rejects it (:class:`FactorRejectedError`, skipping to
  feedback; see :func:`read_review` for the answers understood);
* ``coding`` has the "LLM" write the factor's implementation into the loop's workspace and
  checks it (an unknown function or a bad window is a :class:`FactorCodeError`, skipping to
  feedback);
* ``running`` computes the factor on the whole panel and back-tests it: daily rank IC and a
  long-short quintile portfolio (a factor with no values is a :class:`FactorEmptyError`);
* ``feedback`` compares its IC with the best factor so far;
* ``record`` adds it to the factor library and keeps the best (the one step changing ``self``).

Every model call is memoized (``memo`` / ``memo_blocking``): a step run again before it
completed (a crash, Ctrl-C, the deadline, a question still open when the run stopped) gets
the journaled answer instead of paying for the call twice. The "LLM" logs each call it
really makes to ``llm_calls.jsonl`` beside the session (:func:`model_calls` reads it), and
each call charges what a real model would bill for it (``self.charge``, inside the memoized
call: a replayed answer is not billed again; :func:`model_bill`), in US dollars, so
``--cost`` caps what a session may spend.

It runs under asyncio and trio alike::

    rdagent-loop run examples.quant_factor:FactorLoop --loop-n 10 --parallel 2 --backend trio
    rdagent-loop run examples.quant_factor:FactorLoop --cost 0.05   # until $0.05 is spent
    python -m examples.quant_factor --ask --loop-n 5     # a person approves every factor
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
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


class FactorRejectedError(Exception):
    """A person rejected the proposed factor: the loop skips to feedback, and ``record``
    keeps the rejection in the library (so the "LLM" does not propose it again)."""

    def __init__(self, proposal: FactorProposal) -> None:
        super().__init__(f"a person rejected {proposal.expression}")
        self.proposal = proposal

    def __reduce__(self) -> tuple[Any, ...]:  # it travels in snapshots
        return (type(self), (self.proposal,))


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
    rejected: bool = False  # by the person asked to approve it

    def __str__(self) -> str:
        if self.rejected:
            return f"loop {self.loop_idx}: {self.expression} rejected"
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
    """A seeded stand-in for the model that proposes factors and writes their code.

    Each call it answers is appended to ``log_path`` (when given), like a real model's call
    log: one JSON line ``{"call": ..., "loop": ...}``, outside the loop's state.
    """

    def __init__(self, seed: int, mistake_rate: float, log_path: Path | None = None) -> None:
        self.seed = seed
        self.mistake_rate = mistake_rate
        self.log_path = log_path

    def _log(self, call: str, loop_idx: int, **details: Any) -> None:
        if self.log_path is None:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps({"call": call, "loop": loop_idx, **details}) + "\n")

    def propose(self, loop_idx: int, best: FactorRecord | None, tried: set[str]) -> FactorProposal:
        proposal = self._propose(loop_idx, best, tried)
        self._log("propose", loop_idx, expression=proposal.expression)
        return proposal

    def implement(self, loop_idx: int, proposal: FactorProposal) -> str:
        """The factor's implementation: a module computing it with the expression language."""
        self._log("implement", loop_idx, expression=proposal.expression)
        return (
            f'"""{proposal.name}: {proposal.hypothesis}."""\n'
            "from examples.quant_factor.expr import evaluate\n\n"
            f"EXPRESSION = {proposal.expression!r}\n\n\n"
            "def compute(market):\n    return evaluate(EXPRESSION, market)\n"
        )

    def _propose(self, loop_idx: int, best: FactorRecord | None, tried: set[str]) -> FactorProposal:
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


# what the simulated model bills, like a hosted model's list prices (US dollars)
PRICE_PER_PROMPT_TOKEN = 3.0 / 1_000_000
PRICE_PER_COMPLETION_TOKEN = 15.0 / 1_000_000
INSTRUCTION_TOKENS = 900  # the scenario, the expression language and the answer's format


def model_bill(args: tuple[Any, ...], answer: Any) -> tuple[float, int]:
    """What one model call costs, and its tokens: about four characters a token, the prompt
    (the instructions and the call's arguments: the best factor, the factors tried) and the
    answer, plus the model's reasoning."""
    prompt = INSTRUCTION_TOKENS + len(repr(args)) // 4
    completion = 120 + len(repr(answer)) // 4
    cost = prompt * PRICE_PER_PROMPT_TOKEN + completion * PRICE_PER_COMPLETION_TOKEN
    return cost, prompt + completion


def model_calls(trace_path: str | Path) -> list[dict[str, Any]]:
    """The calls the "LLM" really made in the session at ``trace_path``, oldest first."""
    log = Path(trace_path) / "llm_calls.jsonl"
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


# what a person may answer when asked to approve a factor (case and spaces do not matter)
APPROVALS = ("yes", "y", "ok", "approve", "true")
REJECTIONS = ("no", "n", "reject", "false")


@dataclass(frozen=True, slots=True)
class Review:
    """What a person's answer means: ``approve``, ``reject`` or ``edit`` (``expression``)."""

    verdict: str
    expression: str | None = None


def read_review(answer: Any) -> Review:
    """The meaning of an answer to "try this factor?".

    ``True`` or ``"yes"`` (``y``, ``ok``, ``approve``) approve it; ``False``, ``None`` or
    ``"no"`` (``n``, ``reject``) reject it; any other string, or ``{"edit": "..."}``, is an
    edited expression that replaces the proposed one. A ``ValueError`` says why an answer
    means nothing (an edit that is not a valid factor, a number...).
    """
    if isinstance(answer, dict) and set(answer) == {"edit"}:
        answer = answer["edit"]
        if isinstance(answer, bool) or not isinstance(answer, str):
            raise ValueError(f"an edit must be a factor expression, got {answer!r}")
        if not answer.strip():
            raise ValueError("the edited expression is empty")
    if answer is True:
        return Review("approve")
    if answer is False or answer is None:
        return Review("reject")
    if isinstance(answer, str):
        word = answer.strip().lower()
        if word in APPROVALS:
            return Review("approve")
        if word in REJECTIONS:
            return Review("reject")
        if not word:
            raise ValueError("the answer is empty")
        try:
            parse(answer)
        except FactorSyntaxError as exc:
            raise ValueError(f"the edit is not a valid factor: {exc}") from None
        return Review("edit", answer.strip())
    raise ValueError(
        f"answer yes, no or an edited factor expression (a JSON string), got {answer!r}"
    )


class FactorLoop(LoopBase):
    """propose → coding → running → feedback → record, mining factors."""

    # skip to feedback (the default)
    skip_loop_error = (FactorCodeError, FactorEmptyError, FactorRejectedError)

    def __init__(
        self,
        settings: LoopSettings | None = None,
        *,
        seed: int = 0,
        stocks: int = 40,
        days: int = 300,
        mistake_rate: float = 0.1,
        llm_latency: float = 0.02,
        ask_person: bool = False,
    ) -> None:
        super().__init__(settings)
        self.seed = seed
        self.stocks = stocks
        self.days = days
        self.mistake_rate = mistake_rate
        self.llm_latency = llm_latency
        self.ask_person = ask_person  # every proposal waits for a person's approval
        self.library: list[FactorRecord] = []
        self.best: FactorRecord | None = None

    # paths follow the session when it is loaded from, or checked out to, another folder
    @property
    def trace_folder(self) -> Path:
        return Path(self.settings.trace_path).absolute()

    def _workspace(self, loop_idx: int) -> Path:
        return self.trace_folder / "workspace" / f"loop_{loop_idx}"

    def _llm(self) -> FactorLLM:
        return FactorLLM(self.seed, self.mistake_rate, self.trace_folder / "llm_calls.jsonl")

    async def _think(self, call: Callable[..., Any], *args: Any) -> Any:
        """A model call: it takes ``llm_latency`` seconds, then answers (and bills it)."""
        await anyio.sleep(self.llm_latency)
        return self._answer(call, *args)

    def _answer(self, call: Callable[..., Any], *args: Any) -> Any:
        """The model answers ``call(*args)``, and the step is charged for its tokens."""
        answer = call(*args)
        cost, tokens = model_bill(args, answer)
        self.charge(cost, tokens=tokens)
        return answer

    async def propose(self, prev_out: dict[str, Any]) -> FactorProposal:
        li = prev_out[self.LOOP_IDX_KEY]
        tried = {r.expression for r in self.library}
        # the key names the call, not its arguments: run again (the best factor may have
        # changed meanwhile), the step gets the answer it already paid for
        proposal: FactorProposal = await self.memo(
            "propose", self._think, self._llm().propose, li, self.best, tried
        )
        if not self.ask_person:
            return proposal
        return await self._review(li, proposal)

    async def _review(self, li: int, proposal: FactorProposal) -> FactorProposal:
        """Ask a person to approve, edit or reject ``proposal``; ask again until the answer
        means something (each question and answer is journaled: a re-run is not asked
        again what was answered)."""
        payload = {
            "name": proposal.name,
            "expression": proposal.expression,
            "hypothesis": proposal.hypothesis,
        }
        question = (
            f"loop {li}: try the factor {proposal.expression}? yes, no, or an edited expression"
        )
        while True:
            answer = await self.ask(question, payload=payload)
            try:
                review = read_review(answer)
            except ValueError as exc:
                question = f"{exc}. Loop {li}: try {proposal.expression}? yes, no, or an edit"
                continue
            if review.verdict == "reject":
                raise FactorRejectedError(proposal)
            if review.verdict == "approve" or review.expression == proposal.expression:
                return proposal
            assert review.expression is not None
            return FactorProposal(
                f"{proposal.name} (edited)",
                review.expression,
                f"{proposal.hypothesis}; edited by a person, was {proposal.expression}",
            )

    def coding(self, prev_out: dict[str, Any]) -> str:
        """Have the factor implemented; check it; return its (checked) expression."""
        li = prev_out[self.LOOP_IDX_KEY]
        proposal: FactorProposal = prev_out["propose"]
        code = self.memo_blocking("implement", self._answer, self._llm().implement, li, proposal)
        try:
            parse(proposal.expression)
        except FactorSyntaxError as exc:
            raise FactorCodeError(str(exc)) from None
        workspace = self._workspace(li)
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "factor.py").write_text(code)
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
        error = prev_out.get(self.EXCEPTION_KEY)
        rejected = isinstance(error, FactorRejectedError)
        proposal: FactorProposal = error.proposal if rejected else prev_out["propose"]
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
            rejected,
        )
        self.library.append(record)
        if new_best:
            self.best = record
        return record
