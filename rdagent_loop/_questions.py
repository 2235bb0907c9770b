"""Questions of a session, seen and answered from any process (the CLI, a web server...).

A running engine takes an answer left here within ``_journal.POLL_INTERVAL`` (half a
second); an answer left while no run is going is taken by the next run that resumes the
session. In the process that runs the loop, ``results.answer`` is the direct way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._results import Question
from ._session import session_folder_of, signing_key
from ._session._entries import leave_answer, open_questions
from ._settings import LoopSettings


def pending_questions(
    session: str | Path, *, settings: LoopSettings | None = None
) -> list[Question]:
    """The open questions of ``session`` (a trace path or its ``__session__`` folder), oldest
    first: asked by a step in progress, not answered yet."""
    folder, key = _session_and_key(session, settings)
    return open_questions(folder, key)


def answer(
    session: str | Path, question_id: str, value: Any, *, settings: LoopSettings | None = None
) -> None:
    """Answer the open question ``question_id`` of ``session`` from any process.

    ``KeyError`` naming the id when no such question is open (unknown, or answered already,
    also by someone else at the same moment); ``TypeError`` when ``value`` does not pickle.
    The answer is on disk (at the settings' ``durability``) when this returns.
    """
    folder, key = _session_and_key(session, settings)
    durability = (settings or LoopSettings()).durability
    leave_answer(folder, question_id, value, key, durability)


def _session_and_key(
    session: str | Path, settings: LoopSettings | None
) -> tuple[Path, bytes | None]:
    folder = session_folder_of(Path(session))
    if not folder.is_dir():
        raise FileNotFoundError(f"no session folder at {session}")
    return folder, signing_key((settings or LoopSettings()).signing_key)
