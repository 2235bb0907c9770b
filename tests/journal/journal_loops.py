"""Loop classes of the step-journal tests (importable: snapshots and worker processes
unpickle them). Real calls are counted in a file outside the session, so a call made in a
worker process counts too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from rdagent_loop import LoopBase, step


class PolicyError(Exception):
    """A withdraw error."""


class Calls:
    """A file with one line per real (not replayed) call of a memoized function."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def make(self, key: str, value: Any = None) -> Any:
        with open(self.path, "a") as f:
            f.write(f"{key}\n")
        return f"value of {key}" if value is None else value

    def made(self) -> list[str]:
        return self.path.read_text().split() if self.path.exists() else []


class MemoThenWait(LoopBase):
    """``think`` memoizes two calls, then waits until ``release`` exists (or forever)."""

    def __init__(self, calls: Path, release: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = Calls(calls)
        self.release = release

    async def think(self, prev_out: dict[str, Any]) -> list[Any]:
        a = await self.memo("a", self.calls.make, "a")
        b = await self.memo("b", self.calls.make, "b")
        while not self.release.exists():
            await anyio.sleep(1)
        return [a, b]

    def record(self, prev_out: dict[str, Any]) -> Any:
        return prev_out["think"]


class RetryAfterMemo(LoopBase):
    """``think`` memoizes, then fails its first attempt (timeout or error); retried once."""

    fail_with = "timeout"

    def __init__(self, calls: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = Calls(calls)
        self.attempts = 0

    @step(timeout=5, retries=1, backoff=0.1)
    async def think(self, prev_out: dict[str, Any]) -> Any:
        value = await self.memo("model", self.calls.make, "model")
        self.attempts += 1
        if self.attempts == 1:
            if self.fail_with == "timeout":
                await anyio.sleep(60)
            raise ConnectionError("the model's server went away")
        return value


class SyncRetryAfterMemo(LoopBase):
    """A sync step on a chosen executor: memoizes, fails once (marker file), is retried."""

    def __init__(self, calls: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = Calls(calls)

    @step(retries=1, backoff=0.01)
    def think(self, prev_out: dict[str, Any]) -> Any:
        value = self.memo_blocking("model", self.calls.make, "model")
        marker = self.calls.path.with_suffix(".failed")
        if not marker.exists():
            marker.write_text("once")
            raise ConnectionError("the model's server went away")
        return value

    def record(self, prev_out: dict[str, Any]) -> Any:
        return prev_out["think"]


class EveryLoopMemo(LoopBase):
    """The same key in every loop and in two steps: each is its own call."""

    def __init__(self, calls: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = Calls(calls)

    async def propose(self, prev_out: dict[str, Any]) -> Any:
        return await self.memo("model", self.calls.make, "model")

    async def feedback(self, prev_out: dict[str, Any]) -> Any:
        return await self.memo("model", self.calls.make, "model")


class WithdrawAfterMemo(LoopBase):
    """``coding`` memoizes, then raises a withdraw error the first time."""

    withdraw_loop_error = (PolicyError,)

    def __init__(self, calls: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = Calls(calls)

    async def propose(self, prev_out: dict[str, Any]) -> Any:
        return "idea"

    async def coding(self, prev_out: dict[str, Any]) -> Any:
        value = await self.memo("model", self.calls.make, "model")
        if len(self.calls.made()) == 1:
            raise PolicyError("a policy was broken: roll back")
        return value


class Approval(LoopBase):
    """``propose`` memoizes a hypothesis and asks for approval; ``review`` (limit 1) asks
    too when ``review_asks``; ``record`` keeps what was decided."""

    review_asks = True

    def __init__(self, calls: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = Calls(calls)

    async def propose(self, prev_out: dict[str, Any]) -> Any:
        li = prev_out[self.LOOP_IDX_KEY]
        hypothesis = await self.memo("hypothesis", self.calls.make, f"h{li}")
        return await self.ask("approve the hypothesis?", payload=hypothesis)

    @step(limit=1)
    async def review(self, prev_out: dict[str, Any]) -> Any:
        if not self.review_asks or prev_out[self.LOOP_IDX_KEY] != 0:
            return "no review"
        return await self.ask("review", payload=prev_out["propose"])

    def record(self, prev_out: dict[str, Any]) -> Any:
        return (prev_out["propose"], prev_out["review"])


class SyncAsk(LoopBase):
    """A sync step that memoizes, then asks (``ask_blocking``), on a chosen executor."""

    def __init__(self, calls: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = Calls(calls)

    async def propose(self, prev_out: dict[str, Any]) -> Any:
        return prev_out[self.LOOP_IDX_KEY]

    def review(self, prev_out: dict[str, Any]) -> Any:
        li = prev_out["propose"]
        draft = self.memo_blocking("draft", self.calls.make, f"draft{li}")
        return self.ask_blocking("review the draft", payload=draft, timeout=3600, default="ok")

    def record(self, prev_out: dict[str, Any]) -> Any:
        return prev_out["review"]
