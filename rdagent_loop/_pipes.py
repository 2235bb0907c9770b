"""Pipes to our own child processes (the process pool's workers, the snapshot writer)."""

from __future__ import annotations

PIPE_SIZE = 1 << 20


def grow_pipe(fd: int) -> None:
    """Give the pipe ``PIPE_SIZE`` bytes: fewer wake-ups for large payloads, and a writer
    that rarely finds it full (Linux only; the default 64 KiB works too)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (ImportError, AttributeError, OSError):
        pass
