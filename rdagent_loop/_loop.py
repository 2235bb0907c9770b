"""LoopMeta and LoopBase: the steps, the per-loop state RD-Agent code reads, and persistence."""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from . import _session
from ._budget import Timer, check_count, parse_duration
from ._errors import LoopResumeError, LoopTerminationError
from ._results import LoopTrace
from ._settings import LoopSettings
from ._steps import collect_steps

if TYPE_CHECKING:
    from ._run import LoopRun, RunState

log = logging.getLogger("rdagent_loop")

L = TypeVar("L", bound="LoopBase")

# attributes that belong to a live run, never to a snapshot
_RUNTIME_ATTRS = frozenset({"_run_state"})


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
    ``DESIGN.md`` for the full contract; state read by RD-Agent code keeps its name and meaning.
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
        self.loop_idx = 0  # the loop being kicked off; advances when its first step completes
        self.step_idx: defaultdict[int, int] = defaultdict(int)  # loop -> next step to run
        self.loop_prev_out: defaultdict[int, dict[str, Any]] = defaultdict(dict)
        self.loop_trace: defaultdict[int, list[LoopTrace]] = defaultdict(list)
        self.session_folder = Path(self.settings.trace_path) / "__session__"
        self.timer = Timer()
        self.loop_n: int | None = None  # loops still to admit
        self.step_n: int | None = None  # steps still to complete
        # loop -> the snapshot (relative to session_folder) a withdraw of that loop restores
        self.withdraw_base: dict[int, str | None] = {}
        self._run_state: RunState | None = None

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
        state = self._run_state
        limit = self.settings.max_parallel
        while self.get_unfinished_loop_cnt(self.loop_idx) >= limit:
            if state is None:
                raise RuntimeError("wait_for_capacity() waits for loops of a running run()")
            await state.wait_loop_finished()

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
        from ._run import LoopRun

        check_count(step_n, "step_n")
        check_count(loop_n, "loop_n")
        duration = None if all_duration is None else parse_duration(all_duration)
        if not self.steps:
            raise TypeError(f"{type(self).__name__} has no steps to run")
        return LoopRun(self, step_n=step_n, loop_n=loop_n, all_duration=duration)

    # -- persistence ----------------------------------------------------------------------

    def dump(self, path: str | Path) -> None:
        """Save this loop to ``path`` atomically. Subclasses may override and call super().

        The state is captured (pickled) before this returns.
        """
        data = _session.encode(self)
        _session.write_atomic(Path(path), data, self.settings.durability)

    @classmethod
    def load(
        cls: type[L],
        path: str | Path,
        checkout: bool | str | Path = False,
        replace_timer: bool = True,
        settings: LoopSettings | None = None,
    ) -> L:
        """Load a snapshot file, or the newest valid snapshot of a session folder.

        ``checkout=True`` deletes the snapshots written after the loaded one;
        ``checkout=<path>`` continues in ``<path>/__session__`` and leaves the old folder as it
        is. ``replace_timer=True`` keeps the remaining time of ``all_duration``; ``False``
        starts with a fresh timer.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no snapshot or session folder at {path}")
        folder = _session.session_folder_of(path)
        file = path if path.is_file() else _session.newest_valid(folder)
        loop = _session.load_file(file, cls)
        if not isinstance(loop, cls):
            raise TypeError(f"{file} holds a {type(loop).__name__}, not a {cls.__name__}")
        if settings is not None:
            loop.settings = settings
        if not replace_timer:
            loop.timer = Timer()
        if checkout is True:
            deleted = _session.truncate_after(folder, file)
            if deleted:
                log.info("checkout of %s deleted %d later snapshots", file, len(deleted))
            loop._move_to(folder)
        elif checkout:
            new_folder = Path(checkout) / "__session__"
            loop._move_to(new_folder)
            # the fork holds its starting point, so it can be loaded before its first step
            loop.dump(new_folder / file.relative_to(folder))
        else:
            loop._move_to(folder)
        return loop

    def _move_to(self, session_folder: Path) -> None:
        self.session_folder = session_folder
        self.settings = self.settings.model_copy(update={"trace_path": session_folder.parent})

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in _RUNTIME_ATTRS}
        settings = state.get("settings")
        if isinstance(settings, LoopSettings) and settings.signing_key is not None:
            state["settings"] = settings.model_copy(update={"signing_key": None})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._run_state = None
