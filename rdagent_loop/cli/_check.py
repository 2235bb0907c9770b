"""``rdagent-loop check``: what a resume of a session would do with today's code.

It loads the snapshot a resume continues from (or every snapshot: the ones a withdraw or a
``resume FILE`` may go back to) the way ``resume`` does, through the class's own ``load``,
and changes nothing on disk. The account compares the code that saved each snapshot (its
manifest: step names and ``session_version``) with today's class: the migration ``load``
applies, the steps inserted, removed or renamed, and where each unfinished loop continues.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import LoopBase, SnapshotError, SnapshotInfo, list_snapshots
from .._inspect import (
    SessionError,
    SessionPaths,
    import_loop_class,
    load_loop,
    newest_snapshot,
    read_meta,
)
from .._session._format import qualified_name, read_manifest
from .._session._placement import Placement, saved_code
from ._messages import error_line, plural

MAX_LOOPS_SHOWN = 50


@dataclass(frozen=True, slots=True)
class Saved:
    """What a snapshot's manifest says of the code that wrote it."""

    cls: str
    steps: tuple[str, ...]
    version: int


@dataclass(frozen=True, slots=True)
class Checked:
    """One snapshot loaded with today's code: the loop, or why it would not load."""

    info: SnapshotInfo
    saved: Saved | None
    loop: LoopBase | None = None
    problem: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def placement(self) -> Placement | None:
        """How ``load`` placed the loops (None: it did not load)."""
        if self.loop is None:
            return None
        found = self.loop.__dict__.get("_placement")
        if isinstance(found, Placement):
            return found
        # a ``load`` of the application's that built the loop some other way
        cls, saved = type(self.loop), self.saved
        steps = tuple(cls.steps)
        return Placement(
            qualified_name(cls),
            saved.steps if saved is not None and saved.steps else steps,
            steps,
            saved.version if saved is not None else cls.session_version,
            cls.session_version,
        )


def snapshots_to_check(paths: SessionPaths, every: bool) -> tuple[list[SnapshotInfo], list[str]]:
    """Every snapshot (oldest first), or the one a resume continues from; and notes on
    what a resume would do besides (skip corrupt snapshots, delete later ones).

    Raises :class:`SessionError` when there is none to check.
    """
    snapshots = list_snapshots(paths.session_folder)
    if not snapshots:
        raise SessionError(f"{paths.session_folder} holds no snapshots: nothing to check")
    if every:
        return snapshots, []
    if paths.snapshot is not None:
        chosen = next((s for s in snapshots if s.path == paths.snapshot), None)
        if chosen is None:
            raise SessionError(f"{paths.snapshot} is not a snapshot of {paths.session_folder}")
        later = len(snapshots) - 1 - snapshots.index(chosen)
        note = (
            f"a resume from this file deletes the {plural(later, 'snapshot')} written after "
            "it (resume --checkout PATH forks instead)"
        )
        return [chosen], [note] if later else []
    newest, snapshots = newest_snapshot(paths, snapshots)
    if newest is None:
        raise SessionError(
            f"no valid snapshot in {paths.session_folder}: every one is corrupt, so a resume "
            "would fail"
        )
    notes = [
        f"a resume skips the corrupt snapshot {_relative(s.path, paths.session_folder)}: "
        f"{s.problem}"
        for s in snapshots[snapshots.index(newest) + 1 :]
    ]
    return [newest], notes


def check(paths: SessionPaths, info: SnapshotInfo, loop_class: str | None) -> Checked:
    """Load ``info``'s snapshot as ``resume`` would, without changing the session."""
    saved = _saved(info.path)
    if not info.valid:
        return Checked(info, saved, problem=f"corrupt: {info.problem}")
    try:
        loop, found = load_loop(paths, info.path, loop_class, checkout=False)
    except SessionError as exc:
        return Checked(info, saved, problem=str(exc))
    except Exception as exc:  # migrate's own errors, among others: a resume would stop on them
        return Checked(info, saved, problem=error_line(exc))
    return Checked(info, saved, loop, warnings=tuple(found))


def _saved(path: Path) -> Saved | None:
    try:
        with path.open("rb") as f:
            manifest = read_manifest(f, path, None)
        steps, version = saved_code(manifest, path)
    except (SnapshotError, OSError):
        return None
    return Saved(manifest.cls, steps, version)


def today(
    checked: Iterable[Checked], paths: SessionPaths, loop_class: str | None
) -> tuple[str | None, tuple[str, ...] | None]:
    """The class today's code loads the session with, and its steps, as far as known."""
    for c in checked:
        if c.loop is not None:
            return qualified_name(type(c.loop)), tuple(c.loop.steps)
    named = loop_class or read_meta(paths.trace_path).get("loop_class")
    if not named:
        named = next((c.saved.cls for c in checked if c.saved is not None), None)
    if not named:
        return None, None
    try:
        return str(named), tuple(import_loop_class(str(named)).steps)
    except SessionError:
        return str(named), None


# -- the account ----------------------------------------------------------------------------


def account(c: Checked, folder: Path, today_steps: tuple[str, ...] | None) -> list[str]:
    """The full account of one snapshot: versions, steps, loops."""
    name = _relative(c.info.path, folder)
    placement = c.placement
    if c.loop is None or placement is None:  # both or neither
        lines = [f"snapshot {name} would not load with today's code"]
        if c.saved is not None:
            lines.append(
                f"  saved by {c.saved.cls}: session_version {c.saved.version}, steps "
                + _names(c.saved.steps)
            )
        if today_steps is not None:
            lines.append(f"  today's steps: {_names(today_steps)}")
        return lines
    lines = [f"snapshot {name} loads with today's {placement.cls}"]
    lines.append("  " + _versions(placement))
    lines += ["  " + line for line in _steps(placement)]
    lines += ["  " + line for line in _loops(c.loop, placement)]
    return lines


def _versions(p: Placement) -> str:
    if p.migrated:
        return (
            f"migration: session_version {p.saved_version} to {p.version} "
            f"({p.cls.partition(':')[2]}.migrate runs)"
        )
    return f"session_version {p.version}, as saved: no migration"


def _steps(p: Placement) -> list[str]:
    if not p.steps_changed:
        return [f"steps as saved: {_names(p.steps)}"]
    lines = [f"steps saved: {_names(p.saved_steps)}", f"steps today: {_names(p.steps)}"]
    return [*lines, f"changed: {changes(p.saved_steps, p.steps, p.renamed)}"]


def changes(
    saved: tuple[str, ...], steps: tuple[str, ...], renamed: Iterable[tuple[str, str]]
) -> str:
    """``inserted 'lint'; removed 'check'; renamed 'code' to 'coding' (by migrate)``."""
    renamed = list(dict.fromkeys(renamed))
    old = {a for a, _ in renamed}
    new = {b for _, b in renamed}
    parts = []
    inserted = [s for s in steps if s not in saved and s not in new]
    removed = [s for s in saved if s not in steps and s not in old]
    if inserted:
        parts.append("inserted " + ", ".join(map(repr, inserted)))
    if removed:
        parts.append("removed " + ", ".join(map(repr, removed)))
    if renamed:
        parts.append(
            "renamed " + ", ".join(f"{a!r} to {b!r}" for a, b in renamed) + " (by migrate)"
        )
    if not parts:
        parts.append("reordered")
    return "; ".join(parts)


def _loops(loop: LoopBase, p: Placement) -> list[str]:
    n = len(loop.steps)
    positions = loop.step_idx
    started = sorted(li for li in positions if isinstance(li, int))
    unfinished = [li for li in started if positions.get(li, 0) < n]
    moved = {m.loop_idx: m for m in p.moved}
    head = (
        f"{plural(len(started) - len(unfinished), 'loop')} finished, {len(unfinished)} unfinished"
    )
    lines = [head + (": a resume continues them" if unfinished else "")]
    for li in unfinished[:MAX_LOOPS_SHOWN]:
        at = positions.get(li, 0)
        line = f"  loop {li} continues at {loop.steps[at]!r} (step {at})"
        m = moved.get(li)
        if m is not None:
            was = (
                f"saved at {m.saved_step!r} (step {m.saved_idx})"
                if m.saved_step is not None
                else "saved elsewhere"
            )
            line += f"; {was}" + (", placed by migrate" if m.by_migrate else "")
        lines.append(line)
    if len(unfinished) > MAX_LOOPS_SHOWN:
        lines.append(f"  … and {len(unfinished) - MAX_LOOPS_SHOWN} more")
    for m in p.moved:
        if m.step is None and m.by_migrate:
            lines.append(f"  loop {m.loop_idx} finished by migrate (saved at {m.saved_step!r})")
    return lines


def short(c: Checked, folder: Path) -> str:
    """One line for ``--all``: ok and where its unfinished loops continue, or the problem."""
    name = _relative(c.info.path, folder)
    if c.loop is None:
        problem = str(c.problem).removeprefix(f"{c.info.path}: ")
        return f"FAIL  {name}: {problem}"
    n = len(c.loop.steps)
    positions = c.loop.step_idx
    unfinished = [li for li in sorted(positions) if positions.get(li, 0) < n]
    if not unfinished:
        return f"ok    {name}: every loop finished"
    shown_loops = ", ".join(
        f"loop {li} at {c.loop.steps[positions.get(li, 0)]!r}" for li in unfinished[:4]
    )
    more = ", …" if len(unfinished) > 4 else ""
    return f"ok    {name}: {shown_loops}{more}"


def groups(checked: list[Checked]) -> list[str]:
    """For ``--all``: the code that saved the snapshots, once per (steps, version) it had."""
    found: dict[tuple[tuple[str, ...], int] | None, list[Checked]] = {}
    for c in checked:
        key = None if c.saved is None else (c.saved.steps, c.saved.version)
        found.setdefault(key, []).append(c)
    lines = []
    for key, members in found.items():
        count = plural(len(members), "snapshot")
        if key is None:
            lines.append(f"{count} with an unreadable manifest")
            continue
        steps, version = key
        line = f"{count} saved with session_version {version}, steps {_names(steps)}"
        placements = [c.placement for c in members if c.placement is not None]
        if placements:
            p = placements[0]
            what = [_versions(p)]
            if p.steps_changed:
                renamed = [r for q in placements for r in q.renamed]
                what.append(changes(p.saved_steps, p.steps, renamed))
            line += ": " + "; ".join(what)
        lines.append(line)
    return lines


def _names(steps: tuple[str, ...]) -> str:
    return ", ".join(steps) if steps else "(none)"


def _relative(path: Path, folder: Path) -> str:
    return str(path.relative_to(folder)) if path.is_relative_to(folder) else str(path)
