"""The exception tree: small, with builtin bases where they fit."""

from __future__ import annotations


class LoopError(Exception):
    """Base class of the errors the engine itself raises."""


class LoopTerminationError(LoopError):
    """Raised (by a hook or a step) to stop the run cleanly; the run returns a summary."""


class LoopResumeError(LoopError):
    """Raised to stop every in-flight step and start a new generation of workers."""


class StepTimeoutError(LoopError, TimeoutError):
    """A step ran past its own ``timeout`` policy.

    It is an ordinary step error, so ``skip_loop_error`` may name it.
    """

    def __init__(self, step_name: str, timeout: float) -> None:
        super().__init__(f"step {step_name!r} ran past its timeout of {timeout:g}s")
        self.step_name = step_name
        self.timeout = timeout


class SnapshotError(LoopError):
    """A snapshot could not be written or read back."""
