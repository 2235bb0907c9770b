"""The examples with a person in the loop: a person judges a loop's result.

``/runs/stream?review=K`` runs these instead of the plain examples: in every K-th loop
(loops 0, K, 2K, ...) that got a result, ``feedback`` asks (``await self.ask(...)``) whether
to keep it, and waits for the answer. Only that loop waits; the others keep going. The
answer: ``yes`` keeps the result, ``no`` rejects it (it never becomes the best), anything
else is a note and the machine's verdict stands. ``feedback``'s result says what the
person answered.

The question is asked in ``feedback``, not in the first step: the engine runs the first
steps one loop at a time (RD-Agent's proposals rely on it), so a question there would hold
back every loop not started yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from examples.data_science import DataScienceLoop, Feedback, Record
from examples.quant_factor import FactorLoop, FactorRecord
from examples.quant_factor.loop import FactorFeedback
from rdagent_loop import LoopSettings

YES = frozenset({"y", "yes", "ok", "keep", "accept", "approve", "approved", "true"})
NO = frozenset({"n", "no", "drop", "reject", "rejected", "false"})


def answer_text(answer: Any) -> str:
    """The answer as it came: JSON when it is JSON, else its repr."""
    try:
        return json.dumps(answer, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(answer)


def verdict(answer: Any, machine: bool) -> bool:
    """``yes``/``true`` keeps, ``no``/``false`` rejects; any other answer leaves ``machine``."""
    if isinstance(answer, bool):
        return answer
    if isinstance(answer, str):
        word = answer.strip().lower().rstrip(".!")
        if word in YES:
            return True
        if word in NO:
            return False
    return machine


def _check_every(review_every: int) -> int:
    if isinstance(review_every, bool) or not isinstance(review_every, int) or review_every < 0:
        raise ValueError(f"review_every must be a whole number >= 0, got {review_every!r}")
    return review_every


# slots dataclasses are rebuilt by @dataclass: their methods name the base, not a bare super()
@dataclass(frozen=True, slots=True)
class ReviewedFactorFeedback(FactorFeedback):
    """The feedback on a factor once a person judged it."""

    answer: str = ""

    def __str__(self) -> str:
        return f"{FactorFeedback.__str__(self)} (the reviewer said {self.answer})"


@dataclass(frozen=True, slots=True)
class ReviewedFeedback(Feedback):
    """The feedback on an experiment once a person judged it."""

    answer: str = ""

    def __str__(self) -> str:
        return f"{Feedback.__str__(self)} (the reviewer said {self.answer})"


class ReviewedFactorLoop(FactorLoop):
    """:class:`FactorLoop` where a person judges every ``review_every``-th loop's factor
    (0: nobody is asked)."""

    def __init__(
        self, settings: LoopSettings | None = None, *, review_every: int = 1, **options: Any
    ) -> None:
        super().__init__(settings, **options)
        self.review_every = _check_every(review_every)

    # async, where the base's step is sync: the wait is on the event loop, in no worker
    async def feedback(self, prev_out: dict[str, Any]) -> FactorFeedback:  # type: ignore[override]
        machine = super().feedback(prev_out)
        li = prev_out[self.LOOP_IDX_KEY]
        if prev_out.get(self.EXCEPTION_KEY) is not None or not _asks(li, self.review_every):
            return machine
        proposal = prev_out["propose"]
        result = prev_out["running"]
        answer = await self.ask(
            f"loop {li}: keep the factor {proposal.expression}? {result}. "
            f"The machine says {machine}. Answer yes, no, or a note",
            payload={"factor": proposal, "backtest": result, "machine": str(machine)},
        )
        decision = verdict(answer, machine.decision)
        return ReviewedFactorFeedback(decision, machine.reason, answer_text(answer))

    def record(self, prev_out: dict[str, Any]) -> FactorRecord:
        best = self.best
        record = super().record(prev_out)
        if record.new_best and _rejected(prev_out.get("feedback")):
            self.best = best  # a person said no: it does not become the best
            record = replace(record, new_best=False)
            self.library[-1] = record
        return record


class ReviewedDataScienceLoop(DataScienceLoop):
    """:class:`DataScienceLoop` where a person judges every ``review_every``-th loop's
    experiment (0: nobody is asked)."""

    def __init__(
        self, settings: LoopSettings | None = None, *, review_every: int = 1, **options: Any
    ) -> None:
        super().__init__(settings, **options)
        self.review_every = _check_every(review_every)

    async def feedback(self, prev_out: dict[str, Any]) -> Feedback:
        machine = await super().feedback(prev_out)
        li = prev_out[self.LOOP_IDX_KEY]
        if not _asks(li, self.review_every):
            return machine
        proposal = prev_out["direct_exp_gen"]
        result = prev_out["running"]
        answer = await self.ask(
            f"loop {li}: keep the experiment {proposal}? {result}. "
            f"The machine says {machine}. Answer yes, no, or a note",
            payload={"experiment": proposal, "result": result, "machine": str(machine)},
        )
        decision = verdict(answer, machine.decision)
        return ReviewedFeedback(decision, machine.reason, machine.rmse, answer_text(answer))

    def record(self, prev_out: dict[str, Any]) -> Record:
        best = self.best
        record = super().record(prev_out)
        if record.new_best and _rejected(prev_out.get("feedback")):
            self.best = best  # a person said no: it does not become the best
            record = replace(record, new_best=False)
            self.trace[-1] = record
        return record


def _asks(loop_idx: int, every: int) -> bool:
    return every > 0 and loop_idx % every == 0


def _rejected(feedback: object) -> bool:
    return isinstance(feedback, (ReviewedFactorFeedback, ReviewedFeedback)) and not (
        feedback.decision
    )
