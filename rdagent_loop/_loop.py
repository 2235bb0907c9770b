"""LoopMeta and LoopBase: the steps, the per-loop state RD-Agent code reads, and persistence."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from . import _journal, _session
from ._budget import Spending, Timer, check_amount, check_count, check_tokens, parse_duration
from ._current import run_of
from ._errors import LoopResumeError, LoopTerminationError
from ._handle import LoopRun
from ._loops import LoopMap, no_value
from ._results import LoopTrace
from ._session._entries import pickle_value
from ._session._lock import SessionLock
from ._settings import LoopSettings
from ._steps import collect_steps

log = logging.getLogger("rdagent_loop")

L = TypeVar("L", bound="LoopBase")

# attributes that belong to a live run, never to a snapshot
_RUNTIME_ATTRS = frozenset(
    {
        "_running",
        "_saved",
        "_snapshot_unsigned",
        "_finished_below",
        "_journal_steps",
        "_placement",  # how load placed the loops on the class's steps (``rdagent-loop check``)
    }
)

# what a withdraw keeps of the live loop when it takes a restored snapshot's state
_LIVE_ATTRS = ("timer", "settings", "session_folder", "step_n", "spending", "_running")


class LoopMeta(type):
    """Collects ``steps`` as RD-Agent's LoopMeta does, and checks the class when it is defined."""

    _base_api: ClassVar[frozenset[str]] = frozenset({"load", "dump"})

    def __new__(
        mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any
    ) -> LoopMeta:
        if namespace.pop("_rdagent_loop_base_", False):
            # LoopBase itself: its public names are the engine's API, never steps
            LoopMeta._base_api = LoopMeta._base_api | {
                n for n in namespace if not n.startswith("_")
            }
            namespace["steps"] = []
        else:
            namespace["steps"] = collect_steps(bases, namespace, LoopMeta._base_api)
        cls = super().__new__(mcs, name, bases, namespace, **kwargs)
        target = getattr(cls, "skip_loop_error_stepname", None)
        steps: list[str] = namespace["steps"]
        if target is not None and steps and target not in steps:
            raise ValueError(
                f"{name}.skip_loop_error_stepname is {target!r}, which is not a step of "
                f"{name}; its steps are {steps}"
            )
        version = getattr(cls, "session_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise TypeError(f"{name}.session_version must be an int, got {version!r}")
        if version < 0:
            raise ValueError(f"{name}.session_version must be 0 or more, got {version!r}")
        return cls


class LoopBase(metaclass=LoopMeta):
    """Base class of an R&D loop: subclasses define the steps as public methods.

    Each step gets ``prev_out``, the outputs of the earlier steps of its own loop. See
    the README for the full contract; state read by RD-Agent code keeps its name and meaning.
    """

    _rdagent_loop_base_ = True

    steps: ClassVar[list[str]]
    skip_loop_error: ClassVar[tuple[type[BaseException], ...]] = ()
    skip_loop_error_stepname: ClassVar[str | None] = None
    withdraw_loop_error: ClassVar[tuple[type[BaseException], ...]] = ()

    EXCEPTION_KEY: ClassVar[str] = "_EXCEPTION"
    LOOP_IDX_KEY: ClassVar[str] = "_LOOP_IDX"

    session_version: ClassVar[int] = 0
    """The version of this class's saved state: raise it when the state changes in a way
    ``migrate`` must convert (snapshots record it, with the step names)."""

    LoopTerminationError = LoopTerminationError
    LoopResumeError = LoopResumeError

    def __init__(self, settings: LoopSettings | None = None) -> None:
        self.settings = settings if settings is not None else LoopSettings()
        # a misspelt step name in a per-step setting is an error here, not silently ignored
        self.settings.check_step_names(type(self).__name__, self.steps)
        self.loop_idx = 0  # the loop being kicked off; advances when its first step completes
        # per loop: the next step to run, the outputs so far, the trace (defaultdicts that
        # note what changed, so that a snapshot saves only that: see _loops.py)
        self.step_idx: LoopMap[int] = LoopMap(int)
        self.loop_prev_out: LoopMap[dict[str, Any]] = LoopMap(dict)
        self.loop_trace: LoopMap[list[LoopTrace]] = LoopMap(list)
        self.session_folder = Path(self.settings.trace_path) / "__session__"
        self.timer = Timer()
        self.loop_n: int | None = None  # loops still to admit
        self.step_n: int | None = None  # steps still to complete
        # loop -> the snapshot (relative to session_folder) a withdraw of that loop restores
        self.withdraw_base: LoopMap[str | None] = LoopMap(no_value)
        self.spending = Spending()  # what the runs spent (loop.charge) and the all_cost budget
        self._running = False  # a run() is consuming this loop: one at a time

    # -- the steps ------------------------------------------------------------------------

    @property
    def skip_target(self) -> int:
        """Index of the step a skip error jumps to."""
        name = self.skip_loop_error_stepname
        if name is None:
            name = "feedback" if "feedback" in self.steps else self.steps[-1]
        return self.steps.index(name)

    def get_unfinished_loop_cnt(self, next_loop: int) -> int:
        """How many loops below ``next_loop`` are started but not finished (RD-Agent's API)."""
        n = len(self.steps)
        steps = self.step_idx
        if not isinstance(steps, LoopMap):  # replaced by the application: count them all
            return sum(1 for li in range(next_loop) if steps.get(li, 0) < n)
        # loops below the mark are all finished: RD-Agent's kickoff asks at every loop, and
        # counting from 0 each time made a 10,000-loop run quadratic
        mark = self.__dict__.get("_finished_below", 0)
        lowest = steps.take_lowest_write()
        if lowest is not None and lowest < mark:
            mark = lowest
        while steps.peek(mark, 0) >= n:
            mark += 1
        self.__dict__["_finished_below"] = mark
        return sum(1 for li in range(mark, next_loop) if steps.peek(li, 0) < n)

    async def wait_for_capacity(self) -> None:
        """Wait until fewer than ``max_parallel`` loops below ``loop_idx`` are unfinished.

        The event-driven replacement of polling ``get_unfinished_loop_cnt`` with ``sleep(1)``.
        """
        run = run_of(self)
        limit = self.settings.max_parallel
        while self.get_unfinished_loop_cnt(self.loop_idx) >= limit:
            if run is None:
                raise RuntimeError("wait_for_capacity() waits for loops of a running run()")
            await run.wait_loop_finished()

    # -- the step journal and questions (see _journal.py) ---------------------------------

    async def memo(self, key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` (sync or async), called once per (loop, step, key): its
        result is journaled, at the run's durability, before it is returned, and a re-run of
        the step before it completes (crash, cancellation, deadline, timeout, retry) gets it
        back without calling ``fn``. For the model calls a re-run must not pay for twice."""
        _journal.check_key(key)
        sj = _journal.current_step.get()
        if sj is None or sj.loop is not self:  # not in a step of a run: nothing to journal
            return await _call(fn, args, kwargs)
        found, result = sj.lookup(key)
        if found:
            return result
        sj.defer()  # the call's charges go into its entry, counted once it is journaled
        try:
            result = await _call(fn, args, kwargs)
            data = pickle_value(result, f"the result of memo key {key!r}")
        except BaseException:
            sj.charge(*sj.collect())  # spent all the same: counted, not journaled
            raise
        await sj.record_memo(key, data, *sj.collect())
        return result

    def memo_blocking(self, key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``memo`` for sync steps, on any executor (a worker process journals through the
        engine)."""
        _journal.check_key(key)
        port = _journal.blocking_port(self)
        if port is None:
            return fn(*args, **kwargs)
        found, result = port.lookup(key)
        if found:
            return result
        port.prepare()
        port.defer()  # the call's charges go into its entry, counted once it is journaled
        try:
            result = fn(*args, **kwargs)
            data = pickle_value(result, f"the result of memo key {key!r}")
        except BaseException:
            port.charge(*port.collect())  # spent all the same: counted, not journaled
            raise
        port.record(key, data, *port.collect())
        return result

    def charge(self, cost: float = 0.0, *, tokens: int = 0) -> None:
        """Report what the running step spent: money (in your unit) and model tokens. They
        add up in ``StepResult.cost``/``.tokens``, ``RunSummary`` and ``self.spending`` (the
        session's total, saved with it), and ``run(all_cost=...)`` stops the run once the
        total reaches it. From any step, on any executor. Charges made inside a memoized
        call are journaled with its result and not charged again when it is replayed.
        Outside a run there is nothing to charge: it does nothing."""
        amount = check_amount(cost, "cost")
        count = check_tokens(tokens)
        port = _journal.blocking_port(self, from_async=True)
        if port is not None and (amount or count):
            port.charge(amount, count)

    async def ask(
        self,
        question: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        default: Any = _journal.NO_DEFAULT,
    ) -> Any:
        """Ask a person, and wait for the answer: this loop only pauses (its step-limit slot
        goes to a sibling meanwhile). The question reaches the consumer as a ``Question``
        item; answer it with ``results.answer(id, value)``, ``rdagent_loop.answer(session,
        id, value)`` or ``rdagent-loop answer``. After ``timeout`` seconds: ``default``, or
        ``QuestionTimeoutError`` without one. Journaled: a re-run of the step is not asked
        again what was answered, and an open question is open again after a resume."""
        limit = _journal.check_timeout(timeout)
        sj = _journal.current_step.get()
        if sj is None or sj.loop is not self:
            raise RuntimeError("ask() is for the steps of a running run(): nobody else can answer")
        return await sj.ask(question, payload, limit, default)

    def ask_blocking(
        self,
        question: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
        default: Any = _journal.NO_DEFAULT,
    ) -> Any:
        """``ask`` for sync steps, on any executor; it pauses this loop only. In a step run
        inline (on the event loop's thread) a question without an answer yet ends the step's
        attempt quietly, and the step runs again from its start once it is answered: what it
        memoized replays, so put costly work before ``ask_blocking`` in ``memo_blocking``."""
        limit = _journal.check_timeout(timeout)
        port = _journal.blocking_port(self)
        if port is None:
            raise RuntimeError(
                "ask_blocking() is for the steps of a running run(): nobody else can answer"
            )
        return port.ask(question, payload, limit, default)

    def _check_exit_conditions_on_step(
        self, loop_id: int | None = None, step_id: int | None = None
    ) -> None:
        """Called after every completed step; raise ``LoopTerminationError`` to stop the run.

        Budgets (``step_n``, ``loop_n``, ``all_duration``) are enforced by the engine, so the
        default does nothing.
        """

    # -- running --------------------------------------------------------------------------

    def run(
        self,
        step_n: int | None = None,
        loop_n: int | None = None,
        all_duration: str | float | Any | None = None,
        all_cost: float | None = None,
    ) -> LoopRun:
        """Start a run: await it, ``async with`` it, or ``async for`` over it.

        ``step_n`` steps complete, ``loop_n`` loops are admitted, ``all_duration`` passes
        (``"90s"``, ``"0.5h"``, ``"2h"``, ``"1d"``), or what the steps charged
        (``self.charge``) reaches ``all_cost``, whichever comes first. Arguments left out
        keep what a resumed session saved (the amount spent always travels with it).
        """
        check_count(step_n, "step_n")
        check_count(loop_n, "loop_n")
        duration = None if all_duration is None else parse_duration(all_duration)
        cost = None if all_cost is None else check_amount(all_cost, "all_cost", infinite=True)
        if not self.steps:
            raise TypeError(f"{type(self).__name__} has no steps to run")
        return LoopRun(self, step_n=step_n, loop_n=loop_n, all_duration=duration, all_cost=cost)

    # -- persistence ----------------------------------------------------------------------
    #
    # A snapshot holds every loop as of its last completed step, and ``self`` as it is at
    # that instant: what an in-flight step has already changed in ``self`` is in it too. A
    # step that may run beside others should change ``self`` only at its end, or be one that
    # runs alone (``record``, ``feedback``).

    def dump(self, path: str | Path) -> None:
        """Save this loop to ``path`` atomically. Subclasses may override it and call super().

        The state is captured (pickled into memory) before this returns, so an override may
        drop a big attribute, call ``super().dump(path)`` and put it back. During a run the
        bytes reach the disk a moment later, in order, from the run's snapshot writer, and
        the step's result is delivered only then; outside a run they are written before this
        returns. Only what changed since the last snapshot is written (see docs/sessions.md).
        """
        settings = self.settings
        job = _session.make_job(
            self,
            path,
            durability=settings.durability,
            key=_session.signing_key(settings.signing_key),
        )
        run = run_of(self)
        if run is None or not run.writer.submit(job):
            try:
                job.run()
            except BaseException:
                job.failed()
                raise

    @classmethod
    def load(
        cls: type[L],
        path: str | Path,
        checkout: bool | str | Path = False,
        replace_timer: bool = True,
        settings: LoopSettings | None = None,
    ) -> L:
        """Load a step file, or the newest valid step file of a session folder.

        Everything is verified before anything is unpickled: the manifest, the signature
        (with ``settings.signing_key``, else the key of ``LoopSettings()``, i.e. the
        environment), the checksums of the file and of all it points at, and the class
        (``cls`` or a subclass). A broken newest snapshot is skipped with a
        :class:`SnapshotWarning`. ``checkout=True`` deletes the snapshots written after the
        loaded one; ``checkout=<path>`` continues in ``<path>/__session__`` and leaves the
        old folder as it is. ``replace_timer=True`` keeps the remaining time of
        ``all_duration``; ``False`` starts with a fresh timer.

        Code that changed since the snapshot was saved: a snapshot of an older
        ``session_version`` goes through :meth:`migrate`, and each loop is placed by the
        *name* of the step it stands at, so inserting or removing other steps moves no loop.
        A loop at a step this class no longer has (unless ``migrate`` placed it), or a
        snapshot of a newer ``session_version``, is a :class:`SnapshotError`.
        """
        # absolute: steps that change the working directory must still find the session
        path = Path(path).absolute()
        if not path.exists():
            raise FileNotFoundError(f"no snapshot or session folder at {path}")
        given = settings if settings is not None else LoopSettings()
        key = _session.signing_key(given.signing_key)
        folder: Path | None
        if path.is_file():
            verified = _session.read_snapshot(path, key).verify()
            folder = path.parent.parent if _session.session_for(path) is not None else None
        else:
            folder = _session.session_folder_of(path)
            verified = _session.newest_valid(folder, key)
        loop: L = verified.build(cls)
        file = verified.snapshot.path
        if settings is not None:
            loop.settings = settings
        elif key is not None:  # keep signing what this loop writes from now on
            loop.settings = loop.settings.model_copy(update={"signing_key": given.signing_key})
        if not replace_timer:
            loop.timer = Timer()
        if checkout is True:
            if folder is None:
                raise ValueError(f"checkout=True needs a snapshot inside a session, not {path}")
            lock = SessionLock(folder)  # never under a running run's feet
            lock.acquire()
            try:
                deleted = _session.truncate_after(folder, file)
            finally:
                lock.release()
            if deleted:
                log.info("checkout of %s deleted %d later snapshots", file, len(deleted))
        if checkout is True or checkout is False:
            if folder is not None:
                loop._move_to(folder)
            return loop
        new_folder = Path(checkout) / "__session__"
        loop._move_to(new_folder)
        if folder is not None:
            # the fork holds its starting point (all of it: its store starts empty), so it
            # can be loaded before its first step
            loop.dump(new_folder / file.parent.name / file.name)
        return loop

    @classmethod
    def migrate(
        cls, state: dict[str, Any], saved_version: int, saved_steps: tuple[str, ...]
    ) -> dict[str, Any]:
        """Convert the state of a snapshot saved with an older ``session_version``.

        ``load`` calls it (never for a snapshot of the class's own version) with the loop's
        ``__dict__`` as saved, the ``session_version`` and the step names of the class that
        saved it; it returns the state to build the loop from (this one, changed in place,
        or another). The default returns it unchanged.

        Placing loops: ``state["step_idx"]`` maps each loop to where it stands. As saved,
        the values are positions in ``saved_steps`` (``len(saved_steps)``: finished).
        Setting a loop's value to the *name* of one of this class's steps places it there;
        values left as positions are placed by the name at that position in
        ``saved_steps``, which must still be a step of this class. To finish a loop, set
        it to ``len(saved_steps)``. Outputs are keyed by step name: a renamed step's are in
        ``state["loop_prev_out"][loop][old_name]`` until ``migrate`` moves them.
        """
        return state

    def _become(self, restored: LoopBase) -> None:
        """Take the state of ``restored``, this loop as a snapshot saved it (a withdraw);
        what belongs to the live run stays: the timer, settings, session folder, step budget."""
        state = dict(restored.__dict__)
        state.update((k, self.__dict__[k]) for k in _LIVE_ATTRS if k in self.__dict__)
        self.__dict__.clear()
        self.__dict__.update(state)

    def _move_to(self, session_folder: Path) -> None:
        self.session_folder = session_folder
        self.settings = self.settings.model_copy(update={"trace_path": session_folder.parent})

    def __getstate__(self) -> dict[str, Any]:
        own = self.__dict__
        state = {k: v for k, v in own.items() if k not in _RUNTIME_ATTRS}
        settings = state.get("settings")
        if isinstance(settings, LoopSettings) and settings.signing_key is not None:
            # never save the key; the same copy each time, so it pickles to the same bytes
            unsigned = own.get("_snapshot_unsigned")
            if unsigned is None or unsigned[0] is not settings:
                unsigned = (settings, settings.model_copy(update={"signing_key": None}))
                own["_snapshot_unsigned"] = unsigned
            state["settings"] = unsigned[1]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._running = False


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = fn(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result
