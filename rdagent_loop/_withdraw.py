"""Withdraw: roll every loop back to the newest snapshot written before a loop started.

A step error in ``withdraw_loop_error`` ends its generation; the run then restores the
snapshot that was newest when the failing loop's first step started (the state of every
loop at that moment) and starts a new generation from it. Without such a snapshot (none
saved yet, or it cannot be read) it restores the state the run started with.
"""

from __future__ import annotations

import functools
import inspect
import pickle
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import SnapshotError
from ._logging import log

if TYPE_CHECKING:
    from ._loop import LoopBase
    from ._session import SnapshotWriter


class Restorer:
    """What a withdraw restores from: the run's snapshots, or the state it started with."""

    def __init__(self, loop: LoopBase, writer: SnapshotWriter | None) -> None:
        self._writer = writer
        # the fallback, taken once, before the first step; only loops that can withdraw pay
        self._start = (
            pickle.dumps(loop, protocol=pickle.HIGHEST_PROTOCOL)
            if loop.withdraw_loop_error
            else None
        )

    async def restore(self, loop: LoopBase, loop_idx: int, error: BaseException) -> str | None:
        """Put ``loop`` back where it was before loop ``loop_idx`` started; return the
        snapshot restored (relative to the session folder), or None for the run's start."""
        base: str | None = loop.withdraw_base.get(loop_idx)
        restored: LoopBase | None = None
        if base is not None and self._writer is not None:
            path = loop.session_folder / base
            await self._writer.drain()  # the snapshot to restore must be on disk
            try:
                restored = await anyio.to_thread.run_sync(
                    functools.partial(type(loop).load, path, **_load_options(loop))
                )
            except (OSError, SnapshotError) as problem:
                log.warning("cannot restore %s (%s); restoring the run's start", path, problem)
        if restored is None:
            assert self._start is not None
            restored = pickle.loads(self._start)
            base = None
        loop._become(restored)
        if base is not None:
            # the restored state becomes the newest snapshot, so a crash now resumes from it
            loop.dump(loop.session_folder / base)
        log.warning(
            "withdrew loop %d after %r: restored %s; starting a new generation",
            loop_idx,
            error,
            base or "the state at the start of the run",
        )
        return base


def _load_options(loop: LoopBase) -> dict[str, Any]:
    """``load``'s arguments for a restore: in place, same timer, this run's settings when the
    class's ``load`` (which a subclass may override) takes them."""
    options: dict[str, Any] = {"checkout": False, "replace_timer": False}
    params = inspect.signature(type(loop).load).parameters
    if "settings" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        options["settings"] = loop.settings
    return options
