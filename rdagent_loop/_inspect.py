"""Reading a session for people: which loop class it holds, what every loop and step did.

Used by the ``inspect``, ``timeline`` and ``resume`` commands. It reads a session the way
the engine does: the session package finds the folder and picks the snapshot a load
continues from, :func:`list_snapshots` checks every snapshot without unpickling it, and
``LoopBase.load`` reads the chosen one (whose ``loop_trace`` has the timing of every
finished step of every loop).
"""

from __future__ import annotations

import importlib
import json
import re
import reprlib
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from . import LoopBase, LoopSettings, SnapshotError, SnapshotInfo, list_snapshots
from ._session import newest_valid, qualified_name, session_folder_of, signing_key, snapshot_files

META_FILE = "rdagent-loop.json"
"""Written by ``rdagent-loop run`` beside ``__session__``: the loop class, so ``resume`` and
``inspect`` know what to import without being told."""

StepStatus = Literal["done", "failed", "skipped", "next", "pending"]
LoopStatus = Literal["finished", "unfinished", "lost"]


class SessionError(Exception):
    """The session cannot be read: missing folder, no valid snapshot, unknown class."""


# -- where a session is ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionPaths:
    """``trace_path`` holds ``__session__`` (the snapshots) and the app's other files."""

    trace_path: Path
    session_folder: Path
    snapshot: Path | None = None  # when a single snapshot file was named


def session_paths(path: str | Path) -> SessionPaths:
    """Accept a trace path, a ``__session__`` folder or one snapshot file."""
    shown = Path(path)
    if not shown.exists():
        raise SessionError(f"no session at {shown}: it does not exist")
    # absolute, so that a loaded loop's paths do not depend on where it runs from
    path = shown.absolute()
    folder = session_folder_of(path)
    if path.is_dir() and folder.name != "__session__" and not any(snapshot_files(folder)):
        raise SessionError(f"no session at {shown}: no __session__ folder in it")
    return SessionPaths(folder.parent, folder, path if path.is_file() else None)


def newest_snapshot(
    paths: SessionPaths, snapshots: list[SnapshotInfo]
) -> tuple[SnapshotInfo | None, list[SnapshotInfo]]:
    """The snapshot ``LoopBase.load`` of the session folder continues from, or None.

    The session package's rule picks it (the newest that passes every check, its chunks
    read and hashed), so what ``inspect`` shows and ``resume`` continues from is what a load
    gets. Also returns the listing with the snapshots it skipped marked invalid: the listing
    checks a chunk's size only, the load its hash.
    """
    skipped: dict[Path, str] = {}
    try:
        snapshot = newest_valid(
            paths.session_folder,
            signing_key(LoopSettings().signing_key),
            on_skip=lambda path, exc: skipped.setdefault(path, str(exc)),
        ).snapshot
    except FileNotFoundError:
        snapshot = None
    listing = [
        replace(s, valid=False, problem=skipped[s.path]) if s.valid and s.path in skipped else s
        for s in snapshots
    ]
    chosen = next((s for s in listing if snapshot is not None and s.path == snapshot.path), None)
    return chosen, listing


def read_meta(trace_path: Path) -> dict[str, Any]:
    try:
        data = json.loads((trace_path / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_meta(trace_path: Path, **fields: Any) -> None:
    trace_path.mkdir(parents=True, exist_ok=True)
    meta = read_meta(trace_path) | fields
    tmp = trace_path / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    tmp.replace(trace_path / META_FILE)


# -- which class ----------------------------------------------------------------------------


def import_loop_class(target: str) -> type[LoopBase]:
    """``"package.module:ClassName"`` → the class; a :class:`SessionError` says what is wrong."""
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise SessionError(
            f"expected MODULE:CLASS (like examples.data_science:DataScienceLoop), got {target!r}"
        )
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        # like `python -m`: modules of the current folder are importable
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SessionError(f"cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise SessionError(f"module {module_name!r} has no class {qualname!r}")
    if not (isinstance(obj, type) and issubclass(obj, LoopBase)):
        raise SessionError(f"{target} is not a LoopBase subclass (it is {obj!r})")
    return obj


_QUALNAME = re.compile(r"\b([A-Za-z_][\w.]*:[A-Za-z_][\w.]*)\b")


def load_loop(
    paths: SessionPaths, file: Path, loop_class: str | None = None, **kwargs: Any
) -> tuple[LoopBase, list[str]]:
    """Load ``file`` of the session; return the loop and the warnings ``load`` gave.

    The class comes from ``loop_class``, else from the session's meta file, else from the
    snapshot itself (named in the error ``load`` gives when the class is not imported yet).
    """
    name = loop_class or read_meta(paths.trace_path).get("loop_class")
    cls: type[LoopBase] = import_loop_class(name) if name else LoopBase
    tried: set[str] = set()
    while True:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                loop = cls.load(file, **kwargs)
            except SnapshotError as exc:
                named = [
                    n
                    for n in _QUALNAME.findall(str(exc))
                    if n != qualified_name(cls)
                    and n not in tried
                    and not n.startswith("rdagent_loop.")
                ]
                if loop_class is None and named:
                    tried.add(named[0])
                    cls = import_loop_class(named[0])
                    continue
                raise SessionError(str(exc)) from exc
            except FileNotFoundError as exc:
                raise SessionError(str(exc)) from exc
        return loop, [str(w.message) for w in caught]


# -- the report -----------------------------------------------------------------------------

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80


def summarize(value: Any, width: int = 80) -> str:
    """A one-line summary of a step's output: its ``str`` if it has one, else a short repr."""
    if value is None:
        return ""
    has_str = any("__str__" in vars(k) for k in type(value).__mro__[:-1]) and not isinstance(
        value, (dict, list, tuple, set)
    )
    text = str(value) if has_str else _short.repr(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass(frozen=True, slots=True)
class StepRow:
    step_idx: int
    step_name: str
    status: StepStatus
    started_at: datetime | None = None
    ended_at: datetime | None = None
    output: str = ""
    error: str | None = None
    snapshot: str | None = None  # path relative to the session folder
    snapshot_problem: str | None = None  # set when that snapshot is corrupt

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class LoopRow:
    loop_idx: int
    status: LoopStatus
    next_step: str | None
    steps: tuple[StepRow, ...]

    @property
    def busy(self) -> float:
        return sum(s.duration or 0.0 for s in self.steps)

    @property
    def result(self) -> str:
        done = [s for s in self.steps if s.status == "done" and s.output]
        return done[-1].output if done else ""

    @property
    def errors(self) -> list[StepRow]:
        return [s for s in self.steps if s.error]


@dataclass(frozen=True, slots=True)
class SessionReport:
    trace_path: Path
    session_folder: Path
    loop_class: str | None
    steps: tuple[str, ...]
    loops: tuple[LoopRow, ...]
    snapshots: tuple[SnapshotInfo, ...]
    loaded_from: str | None
    warnings: tuple[str, ...] = ()
    time_left: timedelta | None = None
    loop_n: int | None = None
    step_n: int | None = None
    problem: str | None = None  # why no state could be loaded

    @property
    def corrupt(self) -> list[SnapshotInfo]:
        return [s for s in self.snapshots if not s.valid]

    def to_json(self) -> dict[str, Any]:
        def step(s: StepRow) -> dict[str, Any]:
            d = asdict(s)
            d["started_at"] = s.started_at.isoformat() if s.started_at else None
            d["ended_at"] = s.ended_at.isoformat() if s.ended_at else None
            d["duration"] = s.duration
            return d

        return {
            "trace_path": str(self.trace_path),
            "session_folder": str(self.session_folder),
            "loop_class": self.loop_class,
            "steps": list(self.steps),
            "loaded_from": self.loaded_from,
            "problem": self.problem,
            "warnings": list(self.warnings),
            "time_left": None if self.time_left is None else self.time_left.total_seconds(),
            "loop_n": self.loop_n,
            "step_n": self.step_n,
            "loops": [
                {
                    "loop_idx": row.loop_idx,
                    "status": row.status,
                    "next_step": row.next_step,
                    "duration": row.busy,
                    "result": row.result,
                    "steps": [step(s) for s in row.steps],
                }
                for row in self.loops
            ],
            "snapshots": [
                {
                    "path": str(s.path.relative_to(self.session_folder))
                    if s.path.is_relative_to(self.session_folder)
                    else str(s.path),
                    "loop_idx": s.loop_idx,
                    "step_idx": s.step_idx,
                    "step_name": s.step_name,
                    "written_at": datetime.fromtimestamp(s.written_at_ns / 1e9)
                    .astimezone()
                    .isoformat(),
                    "size": s.size,
                    "valid": s.valid,
                    "problem": s.problem,
                }
                for s in self.snapshots
            ],
        }


def build_report(
    loop: LoopBase | None, paths: SessionPaths, snapshots: list[SnapshotInfo], **extra: Any
) -> SessionReport:
    """Loops x steps from the loaded loop, with every snapshot's validity attached."""
    by_cell: dict[tuple[int, int], SnapshotInfo] = {}
    for info in snapshots:
        by_cell[(info.loop_idx, info.step_idx)] = info  # newest wins: they are sorted by time
    steps: tuple[str, ...] = tuple(loop.steps) if loop is not None else ()
    if not steps:
        names: dict[int, str] = {}
        for info in snapshots:
            names.setdefault(info.step_idx, info.step_name)
        steps = tuple(names.get(i, f"step {i}") for i in range(max(names, default=-1) + 1))
    n = len(steps)
    known: set[int] = set()
    rows: list[LoopRow] = []
    if loop is not None:
        known = set(range(loop.loop_idx)) | set(loop.loop_trace) | set(loop.step_idx)
    for li in sorted(known | {i.loop_idx for i in snapshots}):
        traces = {t.step_idx: t for t in (loop.loop_trace.get(li, []) if loop else [])}
        in_state = loop is not None and li in known
        at = loop.step_idx.get(li, 0) if loop is not None and in_state else 0
        outputs = loop.loop_prev_out.get(li, {}) if loop is not None and in_state else {}
        cells = []
        for si, name in enumerate(steps):
            trace = traces.get(si)
            snap = by_cell.get((li, si))
            status: StepStatus
            if trace is not None:
                status = "failed" if trace.exception else "done"
            elif in_state and si < at:
                status = "skipped"
            elif in_state and si == at and at < n:
                status = "next"
            else:
                status = "pending"
            cells.append(
                StepRow(
                    si,
                    name,
                    status,
                    trace.start if trace else None,
                    trace.end if trace else None,
                    summarize(outputs.get(name)) if trace and not trace.exception else "",
                    trace.exception if trace else None,
                    str(snap.path.relative_to(paths.session_folder))
                    if snap is not None and snap.path.is_relative_to(paths.session_folder)
                    else None,
                    None if snap is None or snap.valid else (snap.problem or "invalid"),
                )
            )
        loop_status: LoopStatus = (
            "lost" if not in_state else ("finished" if at >= n else "unfinished")
        )
        rows.append(
            LoopRow(li, loop_status, steps[at] if in_state and at < n else None, tuple(cells))
        )
    return SessionReport(
        trace_path=paths.trace_path,
        session_folder=paths.session_folder,
        steps=steps,
        loops=tuple(rows),
        snapshots=tuple(snapshots),
        time_left=loop.timer.remain_time() if loop is not None else None,
        loop_n=loop.loop_n if loop is not None else None,
        step_n=loop.step_n if loop is not None else None,
        **extra,
    )


def read_session(
    path: str | Path, loop_class: str | None = None
) -> tuple[SessionReport, LoopBase | None]:
    """Everything ``inspect`` and ``timeline`` show; the loop is None if none could be loaded."""
    paths = session_paths(path)
    snapshots = list_snapshots(paths.session_folder)
    if not snapshots:
        raise SessionError(
            f"no session at {paths.trace_path}: {paths.session_folder} holds no snapshots"
        )
    chosen = paths.snapshot
    if chosen is None:
        newest, snapshots = newest_snapshot(paths, snapshots)
        chosen = newest.path if newest is not None else None
    loop: LoopBase | None = None
    problem: str | None = None
    found: list[str] = []
    name = loop_class or read_meta(paths.trace_path).get("loop_class")
    if chosen is None:
        problem = "no valid snapshot: every snapshot of this session is corrupt"
    else:
        try:
            loop, found = load_loop(paths, chosen, loop_class, checkout=False)
        except SessionError as exc:
            problem = str(exc)
        except Exception as exc:  # the snapshots are still worth listing
            problem = f"{chosen.relative_to(paths.session_folder)}: {type(exc).__name__}: {exc}"
        else:
            name = qualified_name(type(loop))
    report = build_report(
        loop,
        paths,
        snapshots,
        loop_class=name,
        loaded_from=None if chosen is None else str(chosen.relative_to(paths.session_folder)),
        warnings=tuple(found),
        problem=problem,
    )
    return report, loop
