"""Reading a session for people: which loop class it holds, what every loop and step did.

Used by the ``inspect``, ``timeline`` and ``resume`` commands. It reads a session the way
the engine does: the session package finds the folder and picks the snapshot a load
continues from, :func:`list_snapshots` checks every snapshot without unpickling it, and
``LoopBase.load`` reads the chosen one (whose ``loop_trace`` has the timing of every
finished step of every loop). The steps in progress are read from the step journal
(``.journal``; only the names in ``.answers``): what they memoized, what they ask.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import reprlib
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from . import LoopBase, LoopSettings, SnapshotError, SnapshotInfo, list_snapshots
from ._budget import Spending
from ._results import Question
from ._session import newest_valid, qualified_name, session_folder_of, signing_key, snapshot_files
from ._session._entries import (
    ANSWER,
    ANSWERS_NAME,
    MEMO,
    QUESTION,
    QUESTION_ID,
    Entry,
    read_journal,
)

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
_NEVER = datetime(1, 1, 1, tzinfo=timezone.utc)


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
    waits: tuple[tuple[datetime, datetime], ...] = ()  # waiting for answers (``loop.ask``)
    cost: float = 0.0  # what the step charged (``loop.charge``)
    tokens: int = 0

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    @property
    def waited(self) -> float:
        """Seconds of the step spent waiting for answers to its questions."""
        return sum((end - start).total_seconds() for start, end in self.waits)


@dataclass(frozen=True, slots=True)
class QuestionRow:
    """An open question of a step in progress (``loop.ask``), as the journal holds it."""

    id: str
    loop_idx: int
    step_idx: int
    step_name: str
    question: str
    payload: str  # a short repr
    asked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["asked_at"] = self.asked_at.isoformat() if self.asked_at else None
        return d


@dataclass(frozen=True, slots=True)
class JournalRow:
    """The journal of a loop's step in progress: memoized calls made, questions open."""

    step_idx: int
    memos: int = 0
    questions: tuple[QuestionRow, ...] = ()
    answers_waiting: int = 0
    """Questions answered from another process, the answer not taken by a run yet."""


@dataclass(frozen=True, slots=True)
class LoopRow:
    loop_idx: int
    status: LoopStatus
    next_step: str | None
    steps: tuple[StepRow, ...]
    journal: JournalRow | None = None  # its step in progress, if that journaled anything

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

    @property
    def cost(self) -> float:
        """What its completed steps charged (``loop.charge``)."""
        return sum(s.cost for s in self.steps)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.steps)


@dataclass(frozen=True, slots=True)
class SpendingRow:
    """The session's ``loop.spending`` as the snapshot saved it: every charge of every run
    (failed, cancelled and withdrawn steps included), and the ``all_cost`` budget."""

    cost: float
    tokens: int
    limit: float | None  # None (or infinity): no budget

    @property
    def left(self) -> float | None:
        """What the budget still allows, or None without a (finite) budget."""
        if self.limit is None or math.isinf(self.limit):
            return None
        return max(0.0, self.limit - self.cost)

    def to_json(self) -> dict[str, Any]:
        left = self.left
        return {
            "cost": self.cost,
            "tokens": self.tokens,
            "limit": None if left is None else self.limit,  # JSON has no infinity
            "left": left,
        }


def spending_of(loop: LoopBase | None) -> SpendingRow | None:
    """``loop.spending``, or None for a loop saved before cost budgets (rdagent_loop 0.1)."""
    spending = None if loop is None else loop.__dict__.get("spending")
    if not isinstance(spending, Spending):
        return None
    return SpendingRow(spending.cost, spending.tokens, spending.limit)


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
    spending: SpendingRow | None = None  # the session's, when the snapshot has it

    @property
    def cost(self) -> float:
        """What the completed steps of every loop charged."""
        return sum(row.cost for row in self.loops)

    @property
    def tokens(self) -> int:
        return sum(row.tokens for row in self.loops)

    @property
    def corrupt(self) -> list[SnapshotInfo]:
        return [s for s in self.snapshots if not s.valid]

    @property
    def questions(self) -> list[QuestionRow]:
        """The open questions of every loop, oldest first."""
        found = [q for row in self.loops if row.journal for q in row.journal.questions]
        return sorted(found, key=lambda q: (q.asked_at or _NEVER, q.id))

    @property
    def memos_journaled(self) -> int:
        """Memoized calls journaled by the steps in progress (a re-run gets them free)."""
        return sum(row.journal.memos for row in self.loops if row.journal)

    @property
    def answers_waiting(self) -> int:
        return sum(row.journal.answers_waiting for row in self.loops if row.journal)

    def to_json(self) -> dict[str, Any]:
        def step(s: StepRow) -> dict[str, Any]:
            d = asdict(s)
            d["started_at"] = s.started_at.isoformat() if s.started_at else None
            d["ended_at"] = s.ended_at.isoformat() if s.ended_at else None
            d["duration"] = s.duration
            d["waits"] = [[a.isoformat(), b.isoformat()] for a, b in s.waits]
            d["waited"] = s.waited
            return d

        def journal(j: JournalRow | None) -> dict[str, Any] | None:
            if j is None:
                return None
            return {
                "step_idx": j.step_idx,
                "memos": j.memos,
                "questions": [q.to_json() for q in j.questions],
                "answers_waiting": j.answers_waiting,
            }

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
            "questions_open": len(self.questions),
            "memos_journaled": self.memos_journaled,
            "answers_waiting": self.answers_waiting,
            "cost": self.cost,
            "tokens": self.tokens,
            "spending": None if self.spending is None else self.spending.to_json(),
            "loops": [
                {
                    "loop_idx": row.loop_idx,
                    "status": row.status,
                    "next_step": row.next_step,
                    "duration": row.busy,
                    "cost": row.cost,
                    "tokens": row.tokens,
                    "result": row.result,
                    "steps": [step(s) for s in row.steps],
                    "journal": journal(row.journal),
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
    loop: LoopBase | None,
    paths: SessionPaths,
    snapshots: list[SnapshotInfo],
    journal: dict[int, JournalRow] | None = None,
    *,
    class_steps: tuple[str, ...] = (),
    **extra: Any,
) -> SessionReport:
    """Loops x steps from the loaded loop, with every snapshot's validity attached, and
    the journal of every step in progress (:func:`read_journals`).

    ``class_steps``: the steps of the loop's class, when no state could be loaded.
    """
    journal = journal or {}
    by_cell: dict[tuple[int, int], SnapshotInfo] = {}
    for info in snapshots:
        by_cell[(info.loop_idx, info.step_idx)] = info  # newest wins: they are sorted by time
    steps: tuple[str, ...] = tuple(loop.steps) if loop is not None else class_steps
    if not steps:
        names: dict[int, str] = {}
        for info in snapshots:
            names.setdefault(info.step_idx, info.step_name)
        for row in journal.values():
            for q in row.questions:
                names.setdefault(q.step_idx, q.step_name)
        last = max([*names, *(row.step_idx for row in journal.values())], default=-1)
        steps = tuple(names.get(i, f"step {i}") for i in range(last + 1))
    n = len(steps)
    known: set[int] = set()
    rows: list[LoopRow] = []
    if loop is not None:
        known = set(range(loop.loop_idx)) | set(loop.loop_trace) | set(loop.step_idx)
    saved = {i.loop_idx for i in snapshots}
    where = {name: i for i, name in enumerate(steps)}  # by name: the steps may have changed
    for li in sorted(known | saved | set(journal)):
        traces = {
            where.get(t.step_name, t.step_idx): t
            for t in (loop.loop_trace.get(li, []) if loop else [])
        }
        in_state = loop is not None and li in known
        at = loop.step_idx.get(li, 0) if loop is not None and in_state else 0
        outputs = loop.loop_prev_out.get(li, {}) if loop is not None and in_state else {}
        # a loop whose first step is in progress (it may wait for an answer): in no
        # snapshot yet, only in the journal
        starting = not in_state and li not in saved
        if starting:
            at = journal[li].step_idx
        cells = []
        for si, name in enumerate(steps):
            trace = traces.get(si)
            snap = by_cell.get((li, si))
            status: StepStatus
            if trace is not None:
                status = "failed" if trace.exception else "done"
            elif in_state and si < at:
                status = "skipped"
            elif (in_state or starting) and si == at and at < n:
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
                    trace.waits if trace else (),
                    getattr(trace, "cost", 0.0) if trace else 0.0,
                    getattr(trace, "tokens", 0) if trace else 0,
                )
            )
        loop_status: LoopStatus = (
            "unfinished"
            if starting
            else "lost"
            if not in_state
            else ("finished" if at >= n else "unfinished")
        )
        rows.append(
            LoopRow(
                li,
                loop_status,
                steps[at] if (in_state or starting) and at < n else None,
                tuple(cells),
                journal.get(li),
            )
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
        spending=spending_of(loop),
        **extra,
    )


# -- the steps in progress: the journal ----------------------------------------------------


def read_journals(
    session_folder: Path, snapshots: list[SnapshotInfo]
) -> tuple[dict[int, JournalRow], list[str]]:
    """The journal of each loop's step in progress (``loop -> row``), and warnings.

    Only ``.journal`` is read, and the names in ``.answers``. A step some snapshot shows
    complete is left out: a run killed before it removed that step's journal left it (the
    next run removes it). Questions whose payload cannot be unpickled here (its class not
    importable) are listed with what is known.
    """
    key = signing_key(LoopSettings().signing_key)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = read_journal(session_folder, key)
    try:
        answered = {
            name
            for name in os.listdir(session_folder / ANSWERS_NAME)
            if QUESTION_ID.fullmatch(name)
        }
    except OSError:
        answered = set()
    done: dict[int, int] = {}  # loop -> its last step a snapshot shows complete
    for info in snapshots:
        done[info.loop_idx] = max(done.get(info.loop_idx, -1), info.step_idx)
    rows: dict[int, JournalRow] = {}
    for (li, si), step in sorted(found.items()):
        if si <= done.get(li, -1):
            continue
        questions: list[QuestionRow] = []
        waiting = 0
        answers = {e.key for e in step.entries if e.kind == ANSWER}
        for entry in step.entries:
            if entry.kind != QUESTION:
                continue
            question = _question_row(entry, li, si)
            if question.id in answers:
                continue
            if question.id in answered:
                waiting += 1
            else:
                questions.append(question)
        memos = sum(1 for e in step.entries if e.kind == MEMO)
        if li in rows:  # two steps of one loop in progress: not by the engine's rules
            old = rows[li]
            memos += old.memos
            questions[:0] = old.questions
            waiting += old.answers_waiting
        rows[li] = JournalRow(si, memos, tuple(questions), waiting)
    return rows, [str(w.message) for w in caught]


def _question_row(entry: Entry, loop_idx: int, step_idx: int) -> QuestionRow:
    try:
        q = entry.value()
    except Exception as exc:
        # what is left is its place: the question and its id went with the payload
        return QuestionRow(
            entry.meta.get("id", f"{loop_idx}.{step_idx}.{entry.key}-?"),
            loop_idx,
            step_idx,
            "",
            f"(cannot be read here: {type(exc).__name__}: {exc})",
            "",
            None,
        )
    if not isinstance(q, Question):
        return QuestionRow(
            entry.meta.get("id", f"{loop_idx}.{step_idx}.{entry.key}-?"),
            loop_idx,
            step_idx,
            "",
            "?",
            "",
            None,
        )
    return QuestionRow(
        q.id,
        q.loop_idx,
        q.step_idx,
        q.step_name,
        q.question,
        "" if q.payload is None else summarize(_short.repr(q.payload), 60),
        q.asked_at,
    )


def class_steps(loop_class: str | None) -> tuple[str, ...]:
    """The steps of ``loop_class`` (``MODULE:CLASS``), or () when it cannot be imported."""
    if not loop_class:
        return ()
    try:
        return tuple(import_loop_class(loop_class).steps)
    except SessionError:
        return ()


def read_session(
    path: str | Path, loop_class: str | None = None
) -> tuple[SessionReport, LoopBase | None]:
    """Everything ``inspect`` and ``timeline`` show; the loop is None if none could be loaded.

    A session whose first steps are in progress (asking, say) has no snapshot yet: its
    report comes from the journal alone.
    """
    paths = session_paths(path)
    snapshots = list_snapshots(paths.session_folder)
    if not snapshots:
        name = loop_class or read_meta(paths.trace_path).get("loop_class")
        steps = class_steps(name)  # imported first: the questions' payloads may need it
        journal, journal_warnings = read_journals(paths.session_folder, snapshots)
        if not journal:
            raise SessionError(
                f"no session at {paths.trace_path}: {paths.session_folder} holds no snapshots"
            )
        report = build_report(
            None,
            paths,
            snapshots,
            journal,
            class_steps=steps,
            loop_class=name,
            loaded_from=None,
            warnings=tuple(journal_warnings),
        )
        return report, None
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
    # after the load: the questions' payloads may need the loop's module
    journal, journal_warnings = read_journals(paths.session_folder, snapshots)
    report = build_report(
        loop,
        paths,
        snapshots,
        journal,
        loop_class=name,
        loaded_from=None if chosen is None else str(chosen.relative_to(paths.session_folder)),
        warnings=(*found, *journal_warnings),
        problem=problem,
    )
    return report, loop
