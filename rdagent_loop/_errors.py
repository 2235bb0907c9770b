"""The exception tree: small, with builtin bases where they fit."""

from __future__ import annotations

import signal as signals
from pathlib import Path


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


class QuestionTimeoutError(LoopError, TimeoutError):
    """A question (``loop.ask``) got no answer within its ``timeout``, and has no ``default``."""

    def __init__(self, question_id: str, timeout: float) -> None:
        super().__init__(f"question {question_id!r} got no answer within {timeout:g}s")
        self.question_id = question_id
        self.timeout = timeout

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.question_id, self.timeout))


class SessionBusyError(LoopError):
    """Another run holds the session's lock: one run per session.

    ``folder`` is the session folder, ``pid`` the process that holds it (``None`` when it
    could not be read).
    """

    def __init__(self, folder: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"session folder {folder} is in use by another run ({holder}); "
            "wait for it to end, or use another trace_path"
        )
        self.folder = Path(folder)
        self.pid = pid

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.folder, self.pid))


class SnapshotError(LoopError):
    """A snapshot could not be written or read back."""


class SnapshotWarning(RuntimeWarning):
    """A broken snapshot was skipped; an older valid one of the session is used instead."""


class WorkerCrashedError(LoopError):
    """A step's worker process died under it (killed, segfault, out of memory), or could not
    run it at all.

    Only that step fails; the pool starts a fresh worker for the next one. ``signal`` is the
    signal number that killed the worker, or ``None`` when it exited with ``exitcode``.
    ``reason`` says why a worker that is alive cannot run the step: it could not import the
    application's main script, or find the loop's class in it (a script without an
    ``if __name__ == "__main__":`` guard, a class defined in ``python -c`` or a notebook).
    """

    def __init__(
        self,
        step_name: str,
        loop_idx: int,
        pid: int,
        signal: int | None,
        exitcode: int | None,
        reason: str | None = None,
    ) -> None:
        if reason is not None:
            message = f"step {step_name!r} of loop {loop_idx} cannot run in worker process {pid}"
            how = reason
        else:
            message = f"step {step_name!r} of loop {loop_idx} lost its worker process {pid}"
            if signal is not None:
                try:
                    how = f"killed by {signals.Signals(signal).name}"
                except ValueError:
                    how = f"killed by signal {signal}"
            else:
                how = f"exited with code {exitcode}"
        super().__init__(f"{message}: {how}")
        self.step_name = step_name
        self.loop_idx = loop_idx
        self.pid = pid
        self.signal = signal
        self.exitcode = exitcode
        self.reason = reason

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.step_name, self.loop_idx, self.pid, self.signal, self.exitcode, self.reason),
        )


class RemoteStepError(LoopError):
    """A step failed in a worker with an exception that could not be sent back as itself.

    Exceptions that pickle come back as themselves; this stands in for the others, with the
    original type's name, message and traceback.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.type_name, self.message, self.remote_traceback))
