"""The one place that knows which event loop runs us.

The bare ``async for`` form has no ``async with`` to own the engine's task group, so the
engine runs as a detached task of the event loop (an asyncio task or a trio system task)
whose lifetime is tied to the iterator. AnyIO has no public API for that, hence this module.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Awaitable, Callable
from typing import Any


def current_backend() -> str:
    """``"trio"`` or ``"asyncio"``, whichever runs the calling task."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return "trio"
    return "asyncio"


def spawn_detached(fn: Callable[[], Awaitable[Any]]) -> None:
    """Run ``fn()`` beside the caller, outside every cancel scope of the caller.

    ``fn`` must not raise: it is the caller's job to hand results and errors back.
    """
    context = contextvars.copy_context()
    if current_backend() == "trio":
        import trio

        trio.lowlevel.spawn_system_task(fn, context=context, name="rdagent_loop.run")
    else:
        import asyncio

        async def main() -> None:
            await fn()

        # context.run so the task copies the caller's context on Python 3.10 too
        task = context.run(asyncio.get_running_loop().create_task, main())
        _keep_alive.add(task)
        task.add_done_callback(_keep_alive.discard)


_keep_alive: set[Any] = set()
