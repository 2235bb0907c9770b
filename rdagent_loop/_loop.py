"""LoopMeta and LoopBase: the steps, the per-loop state RD-Agent code reads, and persistence."""

from __future__ import annotations

import logging
from array import array
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from . import _session
from ._budget import Timer, check_count, parse_duration
from ._current import run_of
from ._errors import LoopResumeError, LoopTerminationError
from ._finished import FinishedLoops, LoopMap, archive_finished
from ._handle import LoopRun
from ._results import LoopTrace
from ._settings import LoopSettings
from ._step_index import StepIndex
from ._steps import collect_steps

log = logging.getLogger("rdagent_loop")

L = TypeVar("L", bound="LoopBase")

# attributes that belong to a live run, never to a snapshot
_RUNTIME_ATTRS = frozenset({"_running", "_snapshot_index", "_snapshot_cache", "_snapshot_unsigned"})

# what a withdraw keeps of the live loop when it takes a restored snapshot's state
_LIVE_ATTRS = ("timer", "settings", "session_folder", "step_n", "_running")

# self-contained attributes that rarely change: pickled again only when they do
_CONSTANT_ATTRS = ("settings", "session_folder", "_finished")


# the engine's own attributes, pickled after the user's (see __getstate__)
_ENGINE_ATTRS = (
    "settings",
    "session_folder",
    "loop_n",
    "step_n",
    "loop_idx",
    "timer",
    "_finished",
    "step_idx",
    "withdraw_base",
    "loop_trace",
    "loop_prev_out",
)


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

    LoopTerminationError = LoopTerminationError
    LoopResumeError = LoopResumeError

    def __init__(self, settings: LoopSettings | None = None) -> None:
        self.settings = settings if settings is not None else LoopSettings()
        # a misspelt step name in a per-step setting is an error here, not silently ignored
        self.settings.check_step_names(type(self).__name__, self.steps)
        self.loop_idx = 0  # the loop being kicked off; advances when its first step completes
        # loop -> next step to run: a defaultdict(int) that pickles fast however many loops
        self.step_idx: defaultdict[int, int] = StepIndex()
        # finished loops' outputs and traces live on disk, loaded on access (see _finished.py)
        self._finished = FinishedLoops(Path(self.settings.trace_path) / "__session__")
        self.loop_prev_out: LoopMap[dict[str, Any]] = LoopMap(dict, "prev_out", self._finished)
        self.loop_trace: LoopMap[list[LoopTrace]] = LoopMap(list, "trace", self._finished)
        self.session_folder = Path(self.settings.trace_path) / "__session__"
        self.timer = Timer()
        self.loop_n: int | None = None  # loops still to admit
        self.step_n: int | None = None  # steps still to complete
        # loop -> the snapshot (relative to session_folder) a withdraw of that loop restores
        self.withdraw_base: dict[int, str | None] = {}
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
        return sum(1 for li in range(next_loop) if self.step_idx.get(li, 0) < len(self.steps))

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
    ) -> LoopRun:
        """Start a run: await it, ``async with`` it, or ``async for`` over it.

        ``step_n`` steps complete, ``loop_n`` loops are admitted, or ``all_duration`` passes
        (``"90s"``, ``"0.5h"``, ``"2h"``, ``"1d"``), whichever comes first. Arguments left
        out keep what a resumed session saved.
        """
        check_count(step_n, "step_n")
        check_count(loop_n, "loop_n")
        duration = None if all_duration is None else parse_duration(all_duration)
        if not self.steps:
            raise TypeError(f"{type(self).__name__} has no steps to run")
        return LoopRun(self, step_n=step_n, loop_n=loop_n, all_duration=duration)

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
        bytes reach the disk a moment later, in order, from the run's snapshot writer (drained
        before ``run()`` returns); outside a run they are written before this returns.
        So a crash may lose the last few snapshots, whose results may have been streamed
        already: those steps run again on resume. Finished loops' outputs are written once,
        beside their steps, and not again.
        """
        if not isinstance(path, Path):
            path = Path(path)
        settings = self.settings
        outputs = self._archive_finished()
        store = _session.store_for(path)
        try:
            job = _session.make_job(
                self,
                path,
                durability=settings.durability,
                key=_session.signing_key(settings.signing_key),
                index=None if store is None else self._chunk_index(store),
                outputs=outputs,
                constants=self._snapshot_constants(),
            )
        except BaseException:
            if outputs:  # archived already: their files must exist whatever happens here
                _session.SnapshotJob(None, "", None, None, settings.durability, None, outputs).run()
            raise
        run = run_of(self)
        if run is None or not run.writer.submit(job):
            job.run()

    @classmethod
    def load(
        cls: type[L],
        path: str | Path,
        checkout: bool | str | Path = False,
        replace_timer: bool = True,
        settings: LoopSettings | None = None,
    ) -> L:
        """Load a snapshot file, or the newest valid snapshot of a session folder.

        Everything is verified before anything is unpickled: the header, the signature (with
        ``settings.signing_key``, else the key of ``LoopSettings()``, i.e. the environment),
        the checksums, and the class (``cls`` or a subclass). A broken newest snapshot is
        skipped with a :class:`SnapshotWarning`. ``checkout=True`` deletes the snapshots
        written after the loaded one; ``checkout=<path>`` continues in
        ``<path>/__session__`` and leaves the old folder as it is. ``replace_timer=True``
        keeps the remaining time of ``all_duration``; ``False`` starts with a fresh timer.
        """
        # absolute: steps that change the working directory must still find the session
        path = Path(path).absolute()
        if not path.exists():
            raise FileNotFoundError(f"no snapshot or session folder at {path}")
        given = settings if settings is not None else LoopSettings()
        key = _session.signing_key(given.signing_key)
        folder: Path | None
        if path.is_file():
            snapshot = _session.read_snapshot(path, key)
            pieces = snapshot.read_pieces()
            folder = path.parent.parent if _session.store_for(path) is not None else None
        else:
            folder = _session.session_folder_of(path)
            files = [file for file, *_ in _session.snapshot_files(folder)]
            snapshot, pieces = _session.newest_valid(files, folder, key)
        loop: L = snapshot.rebuild(cls, pieces)
        file = snapshot.path
        if settings is not None:
            loop.settings = settings
        elif key is not None:  # keep signing what this loop writes from now on
            loop.settings = loop.settings.model_copy(update={"signing_key": given.signing_key})
        if not replace_timer:
            loop.timer = Timer()
        if checkout is True:
            if folder is None:
                raise ValueError(f"checkout=True needs a snapshot inside a session, not {path}")
            deleted = _session.truncate_after(folder, file)
            if deleted:
                log.info("checkout of %s deleted %d later snapshots", file, len(deleted))
        if checkout is True or checkout is False:
            if folder is not None:
                loop._move_to(folder)
                loop._seed_index(snapshot)
            return loop
        new_folder = Path(checkout) / "__session__"
        loop._finished.copy_to(new_folder, loop.settings.durability)
        loop._move_to(new_folder)
        if folder is not None:
            # the fork holds its starting point, so it can be loaded before its first step
            loop.dump(new_folder / file.parent.name / file.name)
        return loop

    def _become(self, restored: LoopBase) -> None:
        """Take the state of ``restored``, this loop as a snapshot saved it (a withdraw);
        what belongs to the live run stays: the timer, settings, session folder, step budget."""
        state = dict(restored.__dict__)
        state.update((k, self.__dict__[k]) for k in _LIVE_ATTRS if k in self.__dict__)
        self.__dict__.clear()
        self.__dict__.update(state)

    def _archive_finished(self) -> list[_session.OutputsBlob]:
        """Hand finished loops' outputs to the archive (each is written once)."""
        archive = self.__dict__.get("_finished")
        maps = [self.__dict__.get("loop_prev_out"), self.__dict__.get("loop_trace")]
        if not isinstance(archive, FinishedLoops) or not all(isinstance(m, LoopMap) for m in maps):
            return []
        n = len(self.steps)
        outputs = archive_finished(archive, maps, lambda li: self.step_idx.get(li, 0) >= n)  # type: ignore[arg-type]
        bases = self.__dict__.get("withdraw_base")
        if isinstance(bases, dict):  # only a loop in flight can be withdrawn
            for blob in outputs:
                bases.pop(blob.loop_idx, None)
        return outputs

    def _snapshot_constants(self) -> dict[str, tuple[Any, Any, bytes]]:
        cache = self.__dict__.get("_snapshot_cache")
        if cache is None:
            cache = {n: (None, None, b"") for n in _CONSTANT_ATTRS}
            self.__dict__["_snapshot_cache"] = cache
        constants: dict[str, tuple[Any, Any, bytes]] = cache
        return constants

    def _chunk_index(self, store: Path) -> _session.ChunkIndex:
        index = self.__dict__.get("_snapshot_index")
        if not isinstance(index, _session.ChunkIndex) or (
            index.store is not store and index.store != store
        ):
            index = self.__dict__["_snapshot_index"] = _session.ChunkIndex(store)
        return index

    def _seed_index(self, snapshot: _session.Snapshot) -> None:
        """Start the chunk index from a snapshot just read: its chunks are known good."""
        if snapshot.store is not None:
            self._chunk_index(snapshot.store).seed(*snapshot.index_seed())

    def _move_to(self, session_folder: Path) -> None:
        self.session_folder = session_folder
        self.settings = self.settings.model_copy(update={"trace_path": session_folder.parent})
        archive = self.__dict__.get("_finished")
        if isinstance(archive, FinishedLoops):
            archive.folder = session_folder

    def __getstate__(self) -> dict[str, Any]:
        # the user's attributes first, the engine's (which change at every step) last: a
        # snapshot's chunks then stay the same where the user's state did not change
        own = self.__dict__
        state = {k: v for k, v in own.items() if k not in _RUNTIME_ATTRS and k not in _ENGINE_ATTRS}
        state.update((k, own[k]) for k in _ENGINE_ATTRS if k in own)
        settings = state.get("settings")
        if isinstance(settings, LoopSettings) and settings.signing_key is not None:
            # never save the key; the same copy each time, so it is pickled only once
            unsigned = own.get("_snapshot_unsigned")
            if unsigned is None or unsigned[0] is not settings:
                unsigned = (settings, settings.model_copy(update={"signing_key": None}))
                own["_snapshot_unsigned"] = unsigned
            state["settings"] = unsigned[1]
        steps = state.get("step_idx")
        if isinstance(steps, StepIndex):
            steps.seal(len(self.steps))  # finished loops: packed, pickled as the same pages
        elif isinstance(steps, defaultdict) and list(steps) == list(range(len(steps))):
            # a plain defaultdict set by the user, loops 0..n-1: one array, in one piece
            state["step_idx"] = array("q", steps.values())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._running = False
        steps = state.get("step_idx")
        if isinstance(steps, array):
            self.step_idx = StepIndex(enumerate(steps))
        elif type(steps) is defaultdict and steps.default_factory is int:
            self.step_idx = StepIndex(steps)
        archive = state.get("_finished")
        if isinstance(archive, FinishedLoops):
            for name in ("loop_prev_out", "loop_trace"):
                mapping = state.get(name)
                if isinstance(mapping, LoopMap):
                    mapping.attach(archive)
