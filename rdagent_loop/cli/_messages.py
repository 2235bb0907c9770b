"""What the user reads: one-line errors, and paths and commands they can paste back."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


class CliError(click.ClickException):
    """A failure the user can act on: printed as one line, exit status 1."""

    exit_code = 1


def prog() -> str:
    """How the user called us, so the hints we print can be pasted back."""
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return (
        "python -m rdagent_loop"
        if argv0.endswith(".py") or argv0 in ("-m", "-c")
        else "rdagent-loop"
    )


def shown(path: Path) -> str:
    """A path as short as it can be and safe to paste into a shell."""
    path = path.absolute()
    try:
        text = str(path.relative_to(Path.cwd()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def error_line(exc: BaseException) -> str:
    """An exception as one line: its type, message and notes."""
    notes = "; ".join(getattr(exc, "__notes__", ()))
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(f"{text} ({notes})".split()) if notes else " ".join(text.split())


def plural(count: int, noun: str) -> str:
    """``1 loop``, ``2 loops``, ``0 loops``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
