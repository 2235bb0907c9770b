"""The step journal: what a step in progress has already paid for, or been told.

A step that calls a model pays for it; run again (after a crash, a cancellation, the
deadline, a timeout, a retry) it must not pay twice. ``loop.memo(key, fn)`` calls ``fn``
once per (loop, step, key) and journals its result before returning it; a re-run of the
step before it completes gets the journaled result. ``loop.ask`` journals its question
before anyone sees it, and the answer before the step gets it, so a question open when a
run stops is open again after the resume (same id), and an answer is never asked for twice.

* :class:`Journal`: one per run. It holds the entries of the steps in progress (read from
  the session when the run starts), the open questions, and two tasks: one removes the
  files of steps that completed (once their snapshot is on disk), one takes the answers
  other processes leave in ``.answers`` (every ``POLL_INTERVAL`` while a question is open).
* :class:`StepJournal`: one per attempt of a step, in the ``current_step`` context variable;
  ``memo`` and ``ask`` of async steps use it directly.
* Ports, for sync steps (``memo_blocking``, ``ask_blocking``): on the event loop's thread
  (an inline step) the entry is written then and there, and a question unwinds the step
  (``AwaitingAnswer``), which runs again from its start once the answer is journaled (what
  it memoized replays); in a worker thread, calls go to the event loop
  (``anyio.from_thread``); in a worker process or a Ray task, through the executor's channel
  to the engine (``_executors``), which serves them with :func:`serve`.

A waiting step holds no step-limit slot, nor a place of its thread or process executor, and
its wait does not count against its own ``timeout``. The on-disk side is
:mod:`._session._entries`.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.abc import TaskGroup

from ._errors import QuestionTimeoutError
from ._logging import log
from ._results import Question
from ._session._entries import (
    ANSWER,
    MEMO,
    QUESTION,
    Entry,
    encode,
    loop_folder,
    pickle_value,
    read_answers,
    read_journal,
    remove_files,
    write_entry,
)
from ._session._format import signing_key

if TYPE_CHECKING:
    from ._executors import StepTiming
    from ._loop import LoopBase
    from ._run import Run
    from ._step_limit import StepSlot

POLL_INTERVAL = 0.5
"""How often a run looks for answers left by other processes while a question is open."""


class _NoDefault:
    """``ask``'s ``default`` when none is given: a timeout raises ``QuestionTimeoutError``.
    One object, also after a trip through pickle (to a worker process and back)."""

    def __repr__(self) -> str:
        return "<no default>"

    def __reduce__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"memo key must be a str, got {type(key).__name__} {key!r}")
    return key


def check_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return float(timeout)


@dataclass(slots=True)
class _Step:
    """The journal of one step in progress."""

    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Open:
    """An open question: answered once its answer is journaled."""

    question: Question
    answered: anyio.Event = field(default_factory=anyio.Event)
    answering: bool = False  # an answer (or the timeout's outcome) is being journaled
    entry: Entry | None = None


class Journal:
    """The step journal of one run; an async context manager around the run's work."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.loop: LoopBase = run.loop
        settings = run.settings
        self.on_disk = settings.save_snapshots
        self.durability = settings.durability
        self.key = signing_key(settings.signing_key)
        # with nothing saved, the journal lives on the loop object, for its next run()
        self._steps: dict[tuple[int, int], _Step] = (
            {} if self.on_disk else self.loop.__dict__.setdefault("_journal_steps", {})
        )
        self._next_n: dict[tuple[int, int], int] = {}  # never reused within a run
        self.questions: dict[str, _Open] = {}
        self._delivered: set[str] = set()  # questions this run's consumer has been given
        self._removals: list[tuple[list[str], tuple[str, ...]]] = []
        self._changed = anyio.Event()
        self._task_group: TaskGroup | None = None
        self._poll_scope = anyio.CancelScope()
        self.recorded = 0  # memoized calls made and journaled in this run
        self.replayed = 0  # memoized calls answered from the journal in this run

    @property
    def session(self) -> Any:
        return self.loop.session_folder

    # -- the run's side -------------------------------------------------------------------

    async def __aenter__(self) -> Journal:
        if self.on_disk:
            await anyio.to_thread.run_sync(self._load)
        self._open_questions()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._sweep)
        if self.on_disk:
            self._task_group.start_soon(self._poll_answers)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group, self._task_group = self._task_group, None
        self._poll_scope.cancel()
        self._signal()
        if task_group is not None:
            task_group.cancel_scope.shield = True  # answers being journaled, files to remove
            await task_group.__aexit__(None, None, None)

    def _load(self) -> None:
        """Take the journal of every step in progress; remove what completed steps left."""
        stale: list[str] = []
        for (li, written_at), found in read_journal(self.session, self.key).items():
            self._next_n[(li, written_at)] = found.next_n
            si = self._placed(li, written_at, found.entries)
            if si is None or (li, si) in self._steps:
                stale += found.paths  # its step completed; a killed run left it behind
                continue
            self._next_n[(li, si)] = max(self._next_n.get((li, si), 0), found.next_n)
            step = self._steps[(li, si)] = _Step(paths=found.paths)
            for entry in found.entries:
                step.entries[(entry.kind, entry.key)] = entry
        # answers left while no run went: journaled now, before any step can ask again
        asked = {
            e.meta["id"]: key
            for key, step in self._steps.items()
            for e in step.entries.values()
            if e.kind == QUESTION
        }
        for qid, (entry, path) in read_answers(self.session, self.key).items():
            where = asked.get(qid)
            if where is not None and self.get(*where, ANSWER, qid) is None:
                self.record_now(*where, entry)
            stale.append(path)
        remove_files(stale)

    def _placed(self, li: int, si: int, entries: list[Entry]) -> int | None:
        """Where the journal of step ``si`` of loop ``li`` belongs now: at the step the loop
        stands at, if that is the step the entries were written for (by name: the class may
        have gained or lost steps since, see ``migrate``), else nowhere (None)."""
        loop = self.loop
        now = loop.step_idx.get(li, 0)
        if li > loop.loop_idx or now >= len(loop.steps):
            return None
        written_for = next((e.meta["step"] for e in entries if "step" in e.meta), None)
        if written_for is None:  # entries of rdagent_loop before step names: by position
            return si if si == now else None
        return now if written_for == loop.steps[now] else None

    def _open_questions(self) -> None:
        """The questions of the journal that have no answer: open again in this run."""
        for step in self._steps.values():
            for entry in step.entries.values():
                if entry.kind == QUESTION:
                    question = entry.value()
                    if (ANSWER, question.id) not in step.entries:
                        self.questions[question.id] = _Open(question)
        if self.questions:
            log.info("%d questions are still open from an earlier run", len(self.questions))

    def step_done(self, li: int, si: int, *, loop_done: bool) -> None:
        """Step ``si`` of loop ``li`` completed and its snapshot is on disk: drop its journal."""
        step = self._steps.pop((li, si), None)
        if step is not None:
            self._forget_charges(step)
        folders = (loop_folder(self.session, li),) if loop_done and self.on_disk else ()
        if loop_done:
            for key in [k for k in self._next_n if k[0] == li]:
                del self._next_n[key]
        if step is not None and (step.paths or folders):
            self._removals.append((step.paths, folders))
            self._signal()

    def drop_loops(self, rolled_back: Callable[[int], bool]) -> None:
        """A withdraw rolled loops back: drop the journals of those ``rolled_back`` says."""
        for li, si in [k for k in self._steps if rolled_back(k[0])]:
            step = self._steps.pop((li, si))
            self._forget_charges(step)
            self._removals.append((step.paths, ()))
        for qid in [q for q, o in self.questions.items() if rolled_back(o.question.loop_idx)]:
            del self.questions[qid]
        self._signal()

    def _forget_charges(self, step: _Step) -> None:
        """The step's journal is dropped: the session no longer needs to know which of its
        memoized calls it counted."""
        counted = self.loop.spending.counted
        for entry in step.entries.values():
            uid = entry.meta.get("uid")
            if uid is not None:
                counted.discard(uid)

    def loops_with_entries(self) -> set[int]:
        return {li for li, _ in self._steps}

    def _signal(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _sweep(self) -> None:
        """Remove the files of dropped journals, off the event loop's thread."""
        while True:
            if not self._removals:
                if self._task_group is None:
                    return
                await self._changed.wait()
                continue
            removals, self._removals = self._removals, []
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove_all, removals)

    async def _poll_answers(self) -> None:
        """Take the answers other processes leave in the session, while a question is open."""
        with self._poll_scope:
            while True:
                if not any(not o.answering for o in self.questions.values()):
                    await self._changed.wait()
                    continue
                found = await anyio.to_thread.run_sync(read_answers, self.session, self.key)
                for qid, (entry, path) in found.items():
                    opened = self.questions.get(qid)
                    if opened is None or opened.answering:
                        log.warning("an answer to question %s came too late; ignored", qid)
                        self._removals.append(([path], ()))
                        continue
                    self._answer(opened, entry, path)
                await anyio.sleep(POLL_INTERVAL)

    # -- entries --------------------------------------------------------------------------

    def get(self, li: int, si: int, kind: str, key: str) -> Entry | None:
        step = self._steps.get((li, si))
        return None if step is None else step.entries.get((kind, key))

    async def record(self, li: int, si: int, entry: Entry) -> None:
        """Journal ``entry`` for step ``si`` of loop ``li``, on disk at the run's durability."""
        entry = self._named(si, entry)
        n = self._take_n(li, si)
        path = None
        if self.on_disk:
            data = encode(entry, self.key)
            with anyio.CancelScope(shield=True):  # once written, it must be known here too
                path = await anyio.to_thread.run_sync(
                    write_entry, self.session, li, si, n, data, self.durability
                )
        self._keep(li, si, entry, path)

    def record_now(self, li: int, si: int, entry: Entry) -> None:
        """``record`` for a sync step running on the event loop's thread: it blocks that
        thread anyway, so the entry is written here and now."""
        entry = self._named(si, entry)
        n = self._take_n(li, si)
        path = None
        if self.on_disk:
            path = write_entry(self.session, li, si, n, encode(entry, self.key), self.durability)
        self._keep(li, si, entry, path)

    def _named(self, si: int, entry: Entry) -> Entry:
        """``entry`` with the name of its step: a resume with changed steps places it by it."""
        return Entry(entry.kind, entry.key, entry.data, {**entry.meta, "step": self.loop.steps[si]})

    def _take_n(self, li: int, si: int) -> int:
        n = self._next_n.get((li, si), 0)
        self._next_n[(li, si)] = n + 1
        return n

    def _keep(self, li: int, si: int, entry: Entry, path: str | None) -> None:
        step = self._steps.get((li, si))
        if step is None:
            step = self._steps[(li, si)] = _Step()
        step.entries[(entry.kind, entry.key)] = entry
        if path is not None:
            step.paths.append(path)
        if entry.kind == MEMO:
            self.recorded += 1

    # -- questions ------------------------------------------------------------------------

    def answer(self, question_id: str, value: Any) -> None:
        """Answer an open question of this run (``results.answer``); KeyError if none."""
        opened = self.questions.get(question_id) if isinstance(question_id, str) else None
        if opened is None or opened.answering:
            raise KeyError(
                f"no open question {question_id!r}: unknown, or answered already"
                + ("" if self._task_group is not None else " (the run has ended)")
            )
        if self._task_group is None:
            raise KeyError(f"question {question_id!r}: the run has ended")
        data = pickle_value(value, f"the answer to question {question_id!r} ({value!r})")
        self._answer(opened, Entry(ANSWER, question_id, data), None)

    def _answer(self, opened: _Open, entry: Entry, file: str | None) -> None:
        opened.answering = True
        assert self._task_group is not None
        self._task_group.start_soon(self._journal_answer, opened, entry, file)

    async def _journal_answer(self, opened: _Open, entry: Entry, file: str | None) -> None:
        question = opened.question
        await self.record(question.loop_idx, question.step_idx, entry)
        self._answered(opened, entry)
        if file is not None:
            self._removals.append(([file], ()))
            self._signal()
        log.info(
            "question %s answered",
            question.id,
            extra={"loop_idx": question.loop_idx, "step_name": question.step_name},
        )

    def _answered(self, opened: _Open, entry: Entry) -> None:
        opened.entry = entry
        opened.answered.set()
        self.questions.pop(opened.question.id, None)
        self._signal()
        self.run.otel.answered(opened.question, entry.meta)

    async def ask(
        self, sj: StepJournal, k: int, text: str, payload: Any, limit: float | None, default: Any
    ) -> Any:
        """The ``k``-th question of step attempt ``sj``: journaled, delivered, answered."""
        li, si = sj.loop_idx, sj.step_idx
        asked = self.get(li, si, QUESTION, f"ask{k}")
        if asked is None:
            await sj.settle()
            question = Question(
                f"{li}.{si}.{k}-{secrets.token_hex(2)}",
                li,
                si,
                sj.step_name,
                str(text),
                payload,
                datetime.now(timezone.utc),
            )
            data = pickle_value(question, f"the payload of question {text!r} ({payload!r})")
            await self.record(li, si, Entry(QUESTION, f"ask{k}", data, {"id": question.id}))
            self.questions[question.id] = _Open(question)
            self._signal()
            self.run.otel.asked(question)
        else:
            question = asked.value()
        answer = self.get(li, si, ANSWER, question.id)
        if answer is None:
            opened = self.questions.get(question.id)
            if opened is None:  # dropped meanwhile: open it again
                opened = self.questions[question.id] = _Open(question)
            answer = await self._wait(sj, opened, limit, default)
        return outcome(answer, limit)

    async def _wait(
        self, sj: StepJournal, opened: _Open, limit: float | None, default: Any
    ) -> Entry:
        """Hand the question to the consumer (once per run) and wait for the answer, parked:
        the step's slots are lent out meanwhile (also while the stream has no room)."""
        question = opened.question
        async with sj.parked():
            if question.id not in self._delivered:
                self._delivered.add(question.id)
                await self.run.deliver_question(question)
            with anyio.move_on_after(math.inf if limit is None else limit):
                await opened.answered.wait()
            if opened.entry is None and opened.answering:  # it came just now: take it
                await opened.answered.wait()
        if opened.entry is not None:
            return opened.entry
        opened.answering = True
        has_default = default is not NO_DEFAULT
        data = pickle_value(default if has_default else None, f"the default {default!r}")
        meta = {"timed_out": True, "default": has_default, "timeout": limit}
        entry = Entry(ANSWER, question.id, data, meta)
        await self.record(question.loop_idx, question.step_idx, entry)
        self._answered(opened, entry)
        log.warning(
            "question %s got no answer within %gs",
            question.id,
            limit,
            extra={"loop_idx": question.loop_idx, "step_name": question.step_name},
        )
        return entry


def _charges(cost: float, tokens: int) -> dict[str, Any]:
    """A memo entry's meta: the charges made inside the call, journaled with its result,
    and a uid by which the session's ``spending`` says whether it counted them."""
    if not cost and not tokens:
        return {}
    return {"cost": cost, "tokens": tokens, "uid": secrets.token_hex(8)}


def outcome(entry: Entry, timeout: float | None) -> Any:
    """What ``ask`` returns for a journaled answer (or raises, for a timeout without default)."""
    meta = entry.meta
    if meta.get("timed_out") and not meta.get("default"):
        raise QuestionTimeoutError(entry.key, meta.get("timeout") or timeout or 0.0)
    return entry.value()


class Lender(Protocol):
    """An executor place a waiting step lends out (a thread, a worker process)."""

    def lend(self) -> None: ...

    def take_back(self) -> None: ...


current_step: ContextVar[StepJournal | None] = ContextVar(
    "rdagent_loop_current_step_journal", default=None
)


class StepJournal:
    """The journal as one attempt of one step sees it (made for every attempt of every
    step, so kept small: slots, nothing computed until a step uses it)."""

    __slots__ = (
        "_waits",
        "asks",
        "closed",
        "cost",
        "deferred",
        "is_async",
        "journal",
        "lenders",
        "loop",
        "loop_idx",
        "mark",
        "slot",
        "step_idx",
        "step_name",
        "thread",
        "timeout_scope",
        "timing",
        "tokens",
    )

    def __init__(
        self,
        journal: Journal,
        loop: LoopBase,
        loop_idx: int,
        step_idx: int,
        step_name: str,
        slot: StepSlot | None,
        *,
        is_async: bool,
        timing: StepTiming | None = None,
    ) -> None:
        self.journal = journal
        self.loop = loop
        self.loop_idx = loop_idx
        self.step_idx = step_idx
        self.step_name = step_name
        self.slot = slot
        self.is_async = is_async
        self.timing = timing
        # the snapshots submitted when the attempt started, among them the one showing its
        # loop at this step: on disk before the step's first entry, so that a resume finds
        # the loop at this step and takes its journal (not an older snapshot, which would
        # call the entries left over)
        self.mark = journal.run.writer.submitted
        self.asks = 0
        self.cost = 0.0  # charged in this attempt
        self.tokens = 0
        self.deferred: list[list[Any]] = []  # [cost, tokens] of each memoized call running
        self.closed = False
        self.thread = threading.get_ident()
        self.lenders: list[Lender] = []
        self.timeout_scope: anyio.CancelScope | None = None
        self._waits: set[anyio.CancelScope] = set()

    def close(self) -> None:
        """The attempt ended: a thread it left behind cannot journal or wait any more."""
        self.closed = True
        for scope in self._waits:
            scope.cancel()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(
                f"step {self.step_name!r} of loop {self.loop_idx} was stopped; "
                "its abandoned thread cannot use the journal"
            )

    def settled(self) -> bool:
        return self.journal.run.writer.is_written(self.mark)

    async def settle(self) -> None:
        """Wait until the snapshot showing this loop at this step is on disk."""
        if not self.settled():
            await self.journal.run.writer.wait_written(self.mark)

    def lookup(self, key: str) -> tuple[bool, Any]:
        """``(True, result)`` for a journaled memo key, else ``(False, None)``. The charges
        journaled with it count once: now, if no run counted them (they were made in a run
        that was killed)."""
        journal = self.journal
        entry = journal.get(self.loop_idx, self.step_idx, MEMO, key)
        if entry is None:
            return False, None
        journal.replayed += 1
        uid = entry.meta.get("uid")
        if uid is not None and uid not in self.loop.spending.counted:
            # made in a run killed before a snapshot counted it: counted now, once
            self._count(entry.meta.get("cost", 0.0), entry.meta.get("tokens", 0), uid)
        return True, entry.value()

    def charge(self, cost: float, tokens: int) -> None:
        """What the step spent: the step's, the run's and the session's totals grow; inside
        a memoized call, once its result is journaled (with them)."""
        if self.deferred:
            self.deferred[-1][0] += cost
            self.deferred[-1][1] += tokens
        else:
            self._count(cost, tokens)

    def _count(self, cost: float, tokens: int, uid: str | None = None) -> None:
        """Count a charge; with the ``uid`` of the memo entry it came with, in the same
        instant, so a snapshot holds both or neither."""
        if uid is not None:
            self.loop.spending.counted.add(uid)
        if cost or tokens:
            self.cost += cost
            self.tokens += tokens
            self.journal.run.charge(cost, tokens, self.timing)

    def defer(self) -> None:
        """A memoized call starts: its charges wait for its entry (``collect``)."""
        self.deferred.append([0.0, 0])

    def collect(self) -> tuple[float, int]:
        cost, tokens = self.deferred.pop()
        return cost, tokens

    async def record_memo(self, key: str, data: bytes, cost: float = 0.0, tokens: int = 0) -> None:
        """Journal a memoized result with its charges, then count them. Shielded: a call
        that was paid for is journaled, also when the run is being stopped."""
        if self.closed:  # an abandoned thread: its charges count, nothing is journaled
            self._count(cost, tokens)
            return
        entry = Entry(MEMO, key, data, _charges(cost, tokens))
        with anyio.CancelScope(shield=True):
            await self.settle()
            await self.journal.record(self.loop_idx, self.step_idx, entry)
        self._count(cost, tokens, entry.meta.get("uid"))

    def record_memo_now(self, key: str, data: bytes, cost: float = 0.0, tokens: int = 0) -> None:
        entry = Entry(MEMO, key, data, _charges(cost, tokens))
        self.journal.record_now(self.loop_idx, self.step_idx, entry)
        self._count(cost, tokens, entry.meta.get("uid"))

    async def ask(self, text: str, payload: Any, limit: float | None, default: Any) -> Any:
        self._check_open()
        k = self.asks
        self.asks += 1
        with anyio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                return await self.journal.ask(self, k, text, payload, limit, default)
            finally:
                self._waits.discard(scope)
        self._check_open()  # cancelled by close(): the step is gone
        raise AssertionError("unreachable")  # pragma: no cover

    def parked(self) -> _Parked:
        return _Parked(self)


class _Parked:
    """While a step waits for an answer: its step-limit slot and its executor place are
    lent out, and its own timeout is held (moved on by the time it waited)."""

    def __init__(self, sj: StepJournal) -> None:
        self.sj = sj
        self.left = math.inf  # of the step's own timeout
        self.since_at = datetime.now(timezone.utc)

    async def __aenter__(self) -> None:
        sj = self.sj
        self.since_at = datetime.now(timezone.utc)
        if sj.timeout_scope is not None:
            self.left = sj.timeout_scope.deadline - anyio.current_time()
            sj.timeout_scope.deadline = math.inf
        if sj.slot is not None:
            sj.slot.release()
        for lender in sj.lenders:
            lender.lend()
        sj.journal.run.step_parked(sj.step_name, +1)

    async def __aexit__(self, *exc_info: object) -> None:
        sj = self.sj
        sj.journal.run.step_parked(sj.step_name, -1)
        for lender in sj.lenders:
            lender.take_back()
        if sj.timeout_scope is not None:
            sj.timeout_scope.deadline = anyio.current_time() + self.left
        if sj.timing is not None:
            sj.timing.waits.append((self.since_at, datetime.now(timezone.utc)))
        if sj.slot is not None and exc_info[0] is None:
            await sj.slot.retake()


class AwaitingSnapshot(BaseException):
    """Raised by ``memo_blocking`` in a sync step on the event loop's thread before its
    first call, while the snapshot showing the loop at this step is not on disk yet: the
    engine waits for it, then runs the step again (nothing was paid for yet)."""


class AwaitingAnswer(BaseException):
    """Raised by ``ask_blocking`` in a sync step on the event loop's thread, whose question
    has no answer yet: the engine waits for it without blocking, then runs the step again
    (what it memoized replays). A ``BaseException``, so a step's ``except Exception`` lets
    it through."""

    def __init__(self, k: int, text: str, payload: Any, timeout: float | None, default: Any):
        super().__init__(k, text)
        self.k, self.text, self.payload, self.timeout, self.default = (
            k,
            text,
            payload,
            timeout,
            default,
        )


# -- ports: how a sync step reaches the journal -----------------------------------------


class Port(Protocol):
    def lookup(self, key: str) -> tuple[bool, Any]: ...

    def prepare(self) -> None: ...

    def record(self, key: str, data: bytes, cost: float, tokens: int) -> None: ...

    def ask(self, text: str, payload: Any, timeout: float | None, default: Any) -> Any: ...

    def charge(self, cost: float, tokens: int) -> None: ...

    def defer(self) -> None: ...

    def collect(self) -> tuple[float, int]: ...


class RequestPort:
    """A port whose every call is one request to the engine (``_call``: send it, wait for
    ``(True, result)`` or ``(False, exception)``): a worker process's pipe, a Ray mailbox.
    The engine answers with :func:`serve`."""

    deferred: list[list[Any]] | None = None  # charges of the memoized calls running here

    def _call(self, *request: Any) -> Any:
        raise NotImplementedError

    def lookup(self, key: str) -> tuple[bool, Any]:
        found, value = self._call("lookup", key)
        return found, value

    def prepare(self) -> None:
        """Nothing: the engine waits for the snapshot when the result is recorded."""

    def record(self, key: str, data: bytes, cost: float, tokens: int) -> None:
        self._call("record", key, data, cost, tokens)

    def ask(self, text: str, payload: Any, timeout: float | None, default: Any) -> Any:
        return self._call("ask", text, payload, timeout, default)

    def charge(self, cost: float, tokens: int) -> None:
        if self.deferred:  # inside a memoized call: sent with its result
            self.deferred[-1][0] += cost
            self.deferred[-1][1] += tokens
        else:
            self._call("charge", cost, tokens)

    def defer(self) -> None:
        if self.deferred is None:
            self.deferred = []
        self.deferred.append([0.0, 0])

    def collect(self) -> tuple[float, int]:
        assert self.deferred
        cost, tokens = self.deferred.pop()
        return cost, tokens


remote_port: Port | None = None
"""Set in a worker process (process pool, Ray) while it runs a step: its channel."""


def blocking_port(loop: object, *, from_async: bool = False) -> Port | None:
    """The port of the step the caller is part of, or None outside any run.
    ``from_async``: the call does not block (``charge``), an async step may make it."""
    if remote_port is not None:
        return remote_port
    sj = current_step.get()
    if sj is None or sj.loop is not loop:
        return None
    if threading.get_ident() != sj.thread:
        return _ThreadPort(sj)
    if sj.is_async and not from_async:
        raise RuntimeError(
            f"step {sj.step_name!r} is async: use `await self.memo(...)` and "
            "`await self.ask(...)`; the _blocking forms would block every loop"
        )
    return _InlinePort(sj)


class _InlinePort:
    """A sync step on the event loop's thread."""

    def __init__(self, sj: StepJournal) -> None:
        self.sj = sj

    def lookup(self, key: str) -> tuple[bool, Any]:
        return self.sj.lookup(key)

    def prepare(self) -> None:
        if not self.sj.settled():  # before the call is paid for: wait, then run the step again
            raise AwaitingSnapshot

    def record(self, key: str, data: bytes, cost: float, tokens: int) -> None:
        self.sj.record_memo_now(key, data, cost, tokens)

    def charge(self, cost: float, tokens: int) -> None:
        self.sj.charge(cost, tokens)

    def defer(self) -> None:
        self.sj.defer()

    def collect(self) -> tuple[float, int]:
        return self.sj.collect()

    def ask(self, text: str, payload: Any, timeout: float | None, default: Any) -> Any:
        sj = self.sj
        k = sj.asks
        sj.asks += 1
        journal = sj.journal
        asked = journal.get(sj.loop_idx, sj.step_idx, QUESTION, f"ask{k}")
        if asked is not None:
            answer = journal.get(sj.loop_idx, sj.step_idx, ANSWER, asked.value().id)
            if answer is not None:
                return outcome(answer, timeout)
        raise AwaitingAnswer(k, text, payload, timeout, default)


class _ThreadPort:
    """A sync step in a worker thread: each call runs on the event loop."""

    def __init__(self, sj: StepJournal) -> None:
        self.sj = sj

    def lookup(self, key: str) -> tuple[bool, Any]:
        return anyio.from_thread.run_sync(self.sj.lookup, key)

    def prepare(self) -> None:
        """Nothing: ``record`` waits for the snapshot on the event loop."""

    def record(self, key: str, data: bytes, cost: float, tokens: int) -> None:
        anyio.from_thread.run(self.sj.record_memo, key, data, cost, tokens)

    def charge(self, cost: float, tokens: int) -> None:
        anyio.from_thread.run_sync(self.sj.charge, cost, tokens)

    def defer(self) -> None:
        anyio.from_thread.run_sync(self.sj.defer)

    def collect(self) -> tuple[float, int]:
        return anyio.from_thread.run_sync(self.sj.collect)

    def ask(self, text: str, payload: Any, timeout: float | None, default: Any) -> Any:
        return anyio.from_thread.run(self.sj.ask, text, payload, timeout, default)


async def serve(sj: StepJournal, request: tuple[Any, ...]) -> tuple[bool, Any]:
    """Carry out a request a step in a worker process or Ray task sent through its
    executor's channel; ``(True, result)``, or ``(False, exception)`` for it to raise."""
    op, *args = request
    try:
        if op == "lookup":
            return True, sj.lookup(*args)
        if op == "record":
            await sj.record_memo(*args)
            return True, None
        if op == "ask":
            return True, await sj.ask(*args)
        if op == "charge":
            sj.charge(*args)
            return True, None
        raise ValueError(f"unknown journal request {op!r}")
    except Exception as exc:
        return False, exc


def _remove_all(removals: list[tuple[list[str], tuple[str, ...]]]) -> None:
    for paths, folders in removals:
        remove_files(paths, folders)
