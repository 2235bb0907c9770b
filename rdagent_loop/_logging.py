"""The ``rdagent_loop`` logger: every record carries ``loop_idx`` and ``step_name``.

They come from ``extra=`` when given, else from the step running in the current task (a
context variable), else ``None`` — so a format string may always use ``%(loop_idx)s``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_current_step: ContextVar[tuple[int, str] | None] = ContextVar(
    "rdagent_loop_current_step", default=None
)


class StepContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        current = _current_step.get()
        if not hasattr(record, "loop_idx"):
            record.loop_idx = current[0] if current else None
        if not hasattr(record, "step_name"):
            record.step_name = current[1] if current else None
        return True


@contextmanager
def step_context(loop_idx: int, step_name: str) -> Iterator[None]:
    """Tag the records logged by the current task with this loop and step."""
    token = _current_step.set((loop_idx, step_name))
    try:
        yield
    finally:
        _current_step.reset(token)


log = logging.getLogger("rdagent_loop")
log.addFilter(StepContextFilter())
