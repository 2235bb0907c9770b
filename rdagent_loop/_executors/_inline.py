"""The ``inline`` executor: the step runs on the event loop's thread.

Async steps are always awaited here. A sync step run inline blocks every other loop while
it runs; that is right for short steps that change shared state (``record``), and it is
RD-Agent's behaviour with one worker.
"""

from __future__ import annotations

import inspect
from typing import Any

from ._base import StepCall


class InlineExecutor:
    async def run(self, call: StepCall) -> Any:
        result = call.func(call.prev_out)
        if inspect.isawaitable(result):
            return await result
        return result

    async def aclose(self) -> None:
        return None
