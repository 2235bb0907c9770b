"""One ``run()`` of a loop: what lives across its generations.

A run owns the budgets and the deadline, the per-step limiters, the step runner (its
executors), the snapshot writer and the result outlet. It runs generations
(:mod:`._generation`) one after another: a withdraw restores a snapshot
(:mod:`._withdraw`) and a ``LoopResumeError`` starts again from the state as it is, each in
a new generation. The run handle (:mod:`._handle`) drives it and hands its results out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from ._budget import Spending, StepBudget, carry_budgets
from ._compat import BaseExceptionGroup, add_note
from ._current import current_run
from ._executors import StepRunner, StepTiming
from ._generation import Generation, GenerationEnd
from ._journal import Journal
from ._logging import log
from ._otel import NO_TRACE, RunTrace
from ._outlet import ResultOutlet
from ._results import Question, RunSummary, StepResult, StopReason
from ._session import SnapshotWriter, remove_orphans
from ._session._lock import SessionLock
from ._step_limit import StepLimit
from ._withdraw import Restorer

if TYPE_CHECKING:
    from ._loop import LoopBase


@dataclass(frozen=True, slots=True)
class RunStatistics:
    """A picture of a run in progress."""

    steps_completed: int
    loops_completed: int
    loops_in_flight: int
    steps_running: dict[str, int]
    peak_steps_running: dict[str, int]
    results_pending: int
    executors: int = 0
    """Executor tasks the current generation has started: one per loop handed over while
    none was free, at most ``max_parallel``."""
    steps_waiting: dict[str, int] = field(default_factory=dict)
    """Steps waiting for an answer (``loop.ask``), by name; they hold no step-limit slot."""
    questions_open: int = 0
    memo_recorded: int = 0
    """Memoized calls made and journaled in this run."""
    memo_replayed: int = 0
    """Memoized calls answered from the journal in this run, instead of made again."""


class Run:
    """The engine of one ``run()``."""

    def __init__(
        self,
        loop: LoopBase,
        outlet: ResultOutlet,
        *,
        step_n: int | None,
        loop_n: int | None,
        all_duration: timedelta | None,
        all_cost: float | None = None,
    ) -> None:
        self.loop = loop
        self.settings = settings = loop.settings
        self.outlet = outlet
        self._arguments = (step_n, loop_n, all_duration)
        self._all_cost = all_cost
        self.cost = 0.0  # charged by this run's steps
        self.tokens = 0
        self.cost_stopped = False  # the session's spending reached all_cost
        self.max_parallel = settings.max_parallel
        self.runner = StepRunner(type(loop), settings)
        self.limiters = {name: StepLimit(self.runner.limit_of(name)) for name in loop.steps}
        self.budget = StepBudget(None)
        # without snapshots nothing is written: no writer process is started
        writer_mode = settings.snapshot_writer if settings.save_snapshots else "thread"
        self.writer = SnapshotWriter(mode=writer_mode)
        self.writer.on_failure = self._writer_failed
        # one run per session: held from the start until the writer has finished
        self.session_lock = SessionLock(loop.session_folder) if settings.save_snapshots else None
        self.journal = Journal(self)
        self.otel: RunTrace = NO_TRACE  # its trace hooks (OpenTelemetry), while traced
        self.generation: Generation | None = None
        self.steps_completed = 0
        self.loops_completed: set[int] = set()  # in this run (and not rolled back)
        self.running: Counter[str] = Counter()
        self.waiting: Counter[str] = Counter()
        self.peak_running: Counter[str] = Counter()
        self.in_flight = 0
        self.closing = False  # past the deadline, inside the grace period
        self.last_snapshot: str | None = None  # relative to the session folder
        self._loop_folders: dict[int, tuple[Path, Path]] = {}  # li -> (session, its folder)
        self._loop_finished = anyio.Event()
        self._run_scope = anyio.CancelScope()
        self._grace_scope: anyio.CancelScope | None = None

    def statistics(self) -> RunStatistics:
        generation = self.generation
        return RunStatistics(
            steps_completed=self.steps_completed,
            loops_completed=len(self.loops_completed),
            loops_in_flight=0 if generation is None else len(generation.unfinished),
            steps_running=dict(self.running),
            peak_steps_running=dict(self.peak_running),
            results_pending=self.outlet.pending,
            executors=0 if generation is None else generation.executors,
            steps_waiting={k: v for k, v in self.waiting.items() if v},
            questions_open=len(self.journal.questions),
            memo_recorded=self.journal.recorded,
            memo_replayed=self.journal.replayed,
        )

    async def wait_loop_finished(self) -> None:
        """Wait until some loop finishes (or the run starts closing)."""
        await self._loop_finished.wait()

    def _notify_loop_finished(self) -> None:
        self._loop_finished.set()
        self._loop_finished = anyio.Event()

    # -- the run --------------------------------------------------------------------------

    async def main(self) -> RunSummary:
        """Run generations until a budget, the deadline, an error or the last loop ends it."""
        loop = self.loop
        token = current_run.set(self)
        try:
            if self.session_lock is not None:  # before anything is written or any step runs
                await anyio.to_thread.run_sync(self._take_session)
            self._apply_budgets()
            restorer = Restorer(loop, self.writer if self.settings.save_snapshots else None)
            # the journal closes last: the writer, as it drains, drops completed steps' journals
            async with self.journal, self.writer, self.runner:
                reason = await self._run_generations(restorer)
        finally:
            if self.session_lock is not None:
                self.session_lock.release()
            current_run.reset(token)
            loop.timer.disarm()
            self.outlet.engine_done()
        summary = RunSummary(
            self.steps_completed,
            len(self.loops_completed),
            reason,
            self.journal.replayed,
            self.cost,
            self.tokens,
        )
        log.info("run ended: %s", summary)
        self.otel.stopped(summary)
        return summary

    def _writer_failed(self, error: BaseException) -> None:
        """A snapshot could not be written: its step and every later one will never be
        delivered, so the run fails now (steps waiting for room in the stream included)."""
        generation = self.generation
        if generation is not None and generation.running and self.writer.take_error() is error:
            generation.fail(error)

    def _take_session(self) -> None:
        """Lock the session, then remove what a killed run left half written (blocking)."""
        assert self.session_lock is not None
        self.session_lock.acquire()
        removed = remove_orphans(self.loop.session_folder)
        if removed:
            log.info("removed %d files a killed run had left half written", removed)

    def _apply_budgets(self) -> None:
        loop = self.loop
        step_n, loop_n, all_duration = self._arguments
        loop.step_n, loop.loop_n = carry_budgets(loop, step_n=step_n, loop_n=loop_n)
        if all_duration is not None and not loop.timer.started:
            loop.timer.reset(all_duration)
        if not isinstance(loop.__dict__.get("spending"), Spending):  # saved by 0.1
            loop.spending = Spending()
        if self._all_cost is not None:
            loop.spending.limit = self._all_cost
        self.budget = StepBudget(loop.step_n)

    async def _run_generations(self, restorer: Restorer) -> StopReason:
        loop = self.loop
        deadline = loop.timer.arm()
        with anyio.CancelScope(deadline=deadline + self.settings.grace_period) as run_scope:
            self._run_scope = run_scope
            loop.timer.on_change(self._move_deadline)
            if deadline <= anyio.current_time():
                log.warning("all_duration is over: the run stops")
                return "all_duration"
            if loop.spending.exhausted:
                log.warning("all_cost is spent (%s): the run stops", loop.spending)
                return "all_cost"
            while not self.budget.exhausted:
                self.generation = Generation(self)
                end = await self.generation.run_until_done(deadline)
                _raise_errors(end.errors)
                if end.stop is not None:
                    break
                if end.withdraw is not None:
                    before = {
                        li: loop.step_idx.get(li, 0) for li in self.journal.loops_with_entries()
                    }
                    self.last_snapshot = await restorer.restore(loop, *end.withdraw)
                    self.otel.withdrew(*end.withdraw, self.last_snapshot)
                    self._drop_rolled_back(before, end.withdraw[0])
                    n = len(loop.steps)
                    self.loops_completed = {
                        li for li in self.loops_completed if loop.step_idx.get(li, 0) >= n
                    }
                elif end.restart:
                    log.warning("LoopResumeError: every in-flight step stopped; starting again")
                else:
                    return "loop_n"
        end = GenerationEnd() if self.generation is None else self.generation.outcome()
        # a step may have failed while the deadline was cancelling the generation
        _raise_errors(end.errors)
        if self.cost_stopped:
            return "all_cost"
        if self.closing or run_scope.cancelled_caught:
            log.warning("all_duration is over: the run stops")
            return "all_duration"
        return end.stop or "step_n"

    def _drop_rolled_back(self, before: dict[int, int], withdrawn: int) -> None:
        """A withdraw rolled loops back: their journals go (the failing loop's, those the
        restored snapshot does not have, and those whose step changed)."""
        loop = self.loop

        def rolled_back(li: int) -> bool:
            return (
                li == withdrawn
                or li >= loop.loop_idx
                or loop.step_idx.get(li, 0) != before.get(li, 0)
            )

        self.journal.drop_loops(rolled_back)

    def charge(self, cost: float, tokens: int, timing: StepTiming | None) -> None:
        """A step spent ``cost`` and ``tokens``: count them, and once the session's total
        reaches ``all_cost`` stop the run as at the deadline (the grace period applies)."""
        spending = self.loop.spending
        self.cost += cost
        self.tokens += tokens
        spending.cost += cost
        spending.tokens += tokens
        if timing is not None:
            timing.cost += cost
            timing.tokens += tokens
        if spending.exhausted and not self.cost_stopped:
            self.cost_stopped = True
            log.warning("all_cost is spent (%s): no step starts", spending)
            self._move_deadline(anyio.current_time())

    def _move_deadline(self, deadline: float) -> None:
        if self.cost_stopped:  # all_cost is spent: no later deadline
            deadline = min(deadline, self._run_scope.deadline - self.settings.grace_period)
        self._run_scope.deadline = deadline + self.settings.grace_period
        if self._grace_scope is not None:
            self._grace_scope.deadline = deadline

    async def watch_grace(self, deadline: float, *, task_status: TaskStatus[None]) -> None:
        """At the deadline start no new step; cancel once the steps in flight are done."""
        with anyio.CancelScope(deadline=deadline) as scope:
            self._grace_scope = scope
            task_status.started()
            await anyio.sleep_forever()
        self._grace_scope = None
        self.closing = True
        what = "all_cost is spent" if self.cost_stopped else "all_duration is over"
        log.warning("%s: in-flight steps may finish within the grace period", what)
        self._notify_loop_finished()
        if self.in_flight == 0:
            self._run_scope.cancel("all_duration is over")

    # -- what generations report ----------------------------------------------------------

    def step_started(self, loop_idx: int, step_idx: int, name: str) -> None:
        self.running[name] += 1
        self.peak_running[name] = max(self.peak_running[name], self.running[name])
        self.in_flight += 1
        log.debug(
            "loop %d step %d %s starts",
            loop_idx,
            step_idx,
            name,
            extra={"loop_idx": loop_idx, "step_name": name},
        )

    def step_parked(self, name: str, change: int) -> None:
        """A step started (+1) or stopped (-1) waiting for an answer: it counts as waiting,
        not running, as it holds no step-limit slot meanwhile."""
        self.waiting[name] += change
        self.running[name] -= change
        self.peak_running[name] = max(self.peak_running[name], self.running[name])

    async def deliver_question(self, question: Question) -> None:
        """Hand a journaled question to the consumer, in the result stream."""
        await self.outlet.reserve()
        self.outlet.deliver(question)
        log.info(
            "%s",
            question,
            extra={"loop_idx": question.loop_idx, "step_name": question.step_name},
        )

    def step_ended(self, name: str) -> None:
        """A step stopped running, completed or not."""
        self.running[name] -= 1
        self.in_flight -= 1
        if self.closing and self.in_flight == 0:
            self._run_scope.cancel("all_duration is over")

    def step_recorded(self, result: StepResult, *, loop_done: bool) -> None:
        """Count a step :func:`~._record.record_step` recorded, save the loop, deliver it."""
        loop = self.loop
        li, name = result.loop_idx, result.step_name
        self.otel.step_recorded(result, loop_done=loop_done)
        self.budget.spend()
        loop.step_n = self.budget.remaining
        self.steps_completed += 1
        if loop_done:
            loop.withdraw_base.pop(li, None)  # only a loop in flight can be withdrawn
            self.loops_completed.add(li)
            self._notify_loop_finished()
        journal = self.journal
        if not self.settings.save_snapshots:
            journal.step_done(li, result.step_idx, loop_done=loop_done)
            self._deliver(result)
            return
        path = self._loop_folder(li, finished=loop_done) / f"{result.step_idx}_{name}"
        try:
            loop.dump(path)
        except Exception as error:
            self.outlet.cancel_reservation()
            add_note(error, f"while saving the snapshot {path} after loop {li} step {name!r}")
            raise
        self.last_snapshot = f"{li}/{result.step_idx}_{name}"

        # durable before delivered: the consumer sees the step once its snapshot is on disk
        def on_disk() -> None:
            journal.step_done(li, result.step_idx, loop_done=loop_done)
            self._deliver(result)

        self.writer.then(on_disk)

    def _deliver(self, result: StepResult) -> None:
        self.outlet.deliver(result)
        log.info("%s", result, extra={"loop_idx": result.loop_idx, "step_name": result.step_name})

    def _loop_folder(self, li: int, *, finished: bool) -> Path:
        """``<session>/<li>``, built once per loop: pathlib's joins are slow."""
        session = self.loop.session_folder
        known = self._loop_folders.pop(li, None) if finished else self._loop_folders.get(li)
        if known is not None and known[0] is session:
            return known[1]
        folder = session / str(li)
        if not finished:
            self._loop_folders[li] = (session, folder)
        return folder


def _raise_errors(errors: tuple[BaseException, ...]) -> None:
    """Raise what steps raised: one error as itself, several as an ExceptionGroup."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise BaseExceptionGroup("several steps failed independently", list(errors))
