"""Loops of a snapshot placed on today's steps: by name, after the class's ``migrate``.

A step file's manifest records the step names and the ``session_version`` of the class that
wrote it (no ``session_version``: 0). ``step_idx`` holds positions, so code that inserted,
removed or renamed a step since would silently move every saved loop onto another step.
``place`` runs between unpickling the state and building the object:

1. a saved version newer than the class's is refused (``SnapshotError``);
2. an older one is handed to ``cls.migrate(state, saved_version, saved_steps)``;
3. each loop of ``state["step_idx"]`` is placed on today's steps. A value that is a ``str``
   is a step name of today's class (``migrate`` placed the loop there); an ``int`` is a
   position in the *saved* steps (as saved; ``len(saved_steps)``: finished), placed by the
   name found there. A loop at a step today's class no longer has is a ``SnapshotError``
   naming the loop, the step and today's steps. A finished loop stays finished.

Nothing is done when the steps and the version are the saved ones (the common case).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._compat import add_note
from .._errors import SnapshotError
from ._format import Manifest, qualified_name


@dataclass(frozen=True, slots=True)
class Moved:
    """A loop that continues at another position than the one it was saved at."""

    loop_idx: int
    saved_idx: int | None
    """Its position in the saved steps (None: ``migrate`` replaced it with a name)."""
    saved_step: str | None
    """The saved step at that position (None: finished, or not a position)."""
    step_idx: int
    """Its position in today's steps (``len(steps)``: finished)."""
    step: str | None
    """Today's step it continues at (None: finished)."""
    by_migrate: bool
    """``migrate`` placed it (gave it a step name, or another position)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """How ``load`` placed a snapshot's loops on the steps of today's class."""

    cls: str
    saved_steps: tuple[str, ...]
    steps: tuple[str, ...]
    saved_version: int
    version: int
    moved: tuple[Moved, ...] = ()
    """The loops whose position changed (none when the steps did not)."""
    moved_outputs: tuple[tuple[str, str], ...] = ()
    """``(old, new)``: ``migrate`` moved loops' outputs from a removed step's name to an
    inserted one's."""

    @property
    def migrated(self) -> bool:
        """Whether ``migrate`` ran (the saved version is older than the class's)."""
        return self.saved_version < self.version

    @property
    def steps_changed(self) -> bool:
        return self.saved_steps != self.steps

    @property
    def inserted(self) -> tuple[str, ...]:
        return tuple(s for s in self.steps if s not in self.saved_steps)

    @property
    def removed(self) -> tuple[str, ...]:
        return tuple(s for s in self.saved_steps if s not in self.steps)

    @property
    def renamed(self) -> tuple[tuple[str, str], ...]:
        """``(old, new)``: removed steps whose loops (or their outputs) ``migrate`` moved to
        an inserted step."""
        found = dict.fromkeys(self.moved_outputs)
        removed, inserted = set(self.removed), set(self.inserted)
        for m in self.moved:
            old, new = m.saved_step, m.step
            if m.by_migrate and old in removed and new in inserted:
                found[(str(old), str(new))] = None
        return tuple(found)


def saved_code(manifest: Manifest, path: Path) -> tuple[tuple[str, ...], int]:
    """The step names and ``session_version`` of the class that wrote a step file."""
    fields = manifest.fields
    try:
        steps = fields.get("steps", [])
        version = fields.get("session_version", 0)
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise TypeError(f"steps is {steps!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise TypeError(f"session_version is {version!r}")
    except TypeError as exc:
        raise SnapshotError(f"{path} has a corrupt manifest: {exc}") from None
    return tuple(steps), version


def place(cls: type[Any], state: Any, manifest: Manifest, path: Path) -> tuple[Any, Placement]:
    """``state`` (as unpickled) migrated and its loops placed on ``cls``'s steps."""
    saved_steps, saved_version = saved_code(manifest, path)
    steps = tuple(getattr(cls, "steps", ()))
    version = int(getattr(cls, "session_version", 0))
    name = qualified_name(cls)
    if not saved_steps:  # a class without steps wrote it: nothing to place by
        saved_steps = steps
    placement = Placement(name, saved_steps, steps, saved_version, version)
    if saved_version > version:
        raise SnapshotError(
            f"{path} was saved with session_version {saved_version} of {manifest.cls}, "
            f"newer than session_version {version} of {name} (today's code): load it with "
            "the code that wrote it, or a newer one"
        )
    if not placement.migrated and not placement.steps_changed:
        return state, placement
    if not isinstance(state, dict):
        raise SnapshotError(
            f"{path}: the state of {manifest.cls} is not a dict ({type(state).__name__}), "
            f"so its loops cannot be placed on the changed steps of {name}"
        )
    before: dict[int, Any] = {}
    positions = state.get("step_idx")
    if isinstance(positions, MutableMapping):
        before = {li: positions[li] for li in positions}
    changed = set(placement.removed) | set(placement.inserted)
    outputs = _output_names(state.get("loop_prev_out"), changed) if placement.migrated else {}
    if placement.migrated:
        try:
            migrated = cls.migrate(state, saved_version, saved_steps)
        except Exception as exc:  # the application's own error, as itself
            add_note(
                exc,
                f"in {name}.migrate, loading {path} (from session_version {saved_version})",
            )
            raise
        if not isinstance(migrated, dict):
            raise TypeError(
                f"{name}.migrate must return the state (a dict), got {type(migrated).__name__}"
            )
        state = migrated
        positions = state.get("step_idx")
    if positions is None:
        return state, placement
    if not isinstance(positions, MutableMapping):
        raise SnapshotError(
            f"{path}: step_idx of {name} is a {type(positions).__name__}, not a mapping of "
            "loop to step: its loops cannot be placed"
        )
    moved = _place_loops(positions, before, placement, path)
    after = _output_names(state.get("loop_prev_out"), changed) if outputs else {}
    moved_outputs: dict[tuple[str, str], None] = {}
    for li, names in outputs.items():
        gone = [s for s in names - after.get(li, frozenset()) if s in placement.removed]
        new = [s for s in after.get(li, frozenset()) - names if s in placement.inserted]
        if len(gone) == 1 and len(new) == 1:
            moved_outputs[(gone[0], new[0])] = None
    return state, Placement(
        name, saved_steps, steps, saved_version, version, moved, tuple(moved_outputs)
    )


def _output_names(outputs: Any, names: set[str]) -> dict[Any, frozenset[str]]:
    """Per loop, which of ``names`` key its outputs (``loop_prev_out``)."""
    if not names or not isinstance(outputs, MutableMapping):
        return {}
    found = {}
    for li in outputs:
        out = outputs[li]
        if isinstance(out, dict):
            found[li] = frozenset(k for k in out if k in names)
    return found


def _place_loops(
    positions: MutableMapping[Any, Any],
    before: dict[int, Any],
    placement: Placement,
    path: Path,
) -> tuple[Moved, ...]:
    saved_steps, steps, name = placement.saved_steps, placement.steps, placement.cls
    where = {step: i for i, step in enumerate(steps)}
    n_saved, n = len(saved_steps), len(steps)
    moved = []
    for li in list(positions):
        at = positions[li]
        by_migrate = li not in before or before[li] != at
        saved_idx = before.get(li, at)
        if not isinstance(saved_idx, int) or isinstance(saved_idx, bool):
            saved_idx = None
        saved_step = None
        if saved_idx is not None and 0 <= saved_idx < n_saved:
            saved_step = saved_steps[saved_idx]
        if isinstance(at, str):
            new = where.get(at)
            if new is None:
                raise SnapshotError(
                    f"{path}: {name}.migrate placed loop {li} at step {at!r}, which is not a "
                    f"step of {name}; its steps are {list(steps)}"
                )
        elif isinstance(at, int) and not isinstance(at, bool) and at >= 0:
            if at >= n_saved:  # finished, and stays so
                new = n
            else:
                found = where.get(saved_steps[at])
                if found is None:
                    raise SnapshotError(_unplaced(li, saved_steps[at], placement, path))
                new = found
        else:
            raise SnapshotError(
                f"{path}: loop {li} of {name} stands at {at!r}: neither a position in the "
                f"saved steps {list(saved_steps)} nor a step name"
            )
        if new != at:
            positions[li] = new
        finished_before = saved_idx is not None and saved_idx >= n_saved
        if by_migrate or (new != saved_idx and not (finished_before and new == n)):
            step = steps[new] if new < n else None
            moved.append(Moved(li, saved_idx, saved_step, new, step, by_migrate))
    return tuple(sorted(moved, key=lambda m: m.loop_idx))


def _unplaced(li: int, step: str, placement: Placement, path: Path) -> str:
    name = placement.cls
    cls_name = name.partition(":")[2]
    if placement.migrated:
        how = (
            f"{cls_name}.migrate (from session_version {placement.saved_version} to "
            f"{placement.version}) did not place it"
        )
    else:
        how = (
            f"place it in {cls_name}.migrate and raise {cls_name}.session_version (now "
            f"{placement.version}), or load it with the code that wrote it"
        )
    return (
        f"{path}: loop {li} stands at step {step!r}, which {name} no longer has; its steps "
        f"are {list(placement.steps)} (saved: {list(placement.saved_steps)}); {how}"
    )
