"""The step journal on disk: what a step in progress has already paid for or been told.

    <session>/.journal/<loop>/<step>.<n>   one entry: a memoized result, a question asked,
                                           or its answer (n counts from 0 in each step)
    <session>/.answers/<question id>       an answer given from another process, until the
                                           running engine journals it

An entry lives only while its step is in progress: the engine removes a step's entries once
the step's snapshot is on disk, and a run that starts removes those whose step a snapshot
shows complete. An entry file is ``MAGIC``, a 32-byte digest of the body (its SHA-256, or
its HMAC-SHA256 when the session is signed), then the body: a pickle of the :class:`Entry`.
It is checked before it is unpickled; a broken one is ignored with a warning (its call is
made again). Names carry no ``_``, so RD-Agent's ``*/*_*`` globs never list them.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import SnapshotWarning
from ._atomic import write_atomic
from ._capture import TMP_NAME

if TYPE_CHECKING:
    from .._results import Question
    from ._atomic import Durability

JOURNAL_NAME, ANSWERS_NAME = ".journal", ".answers"
MAGIC = b"RDJRNL01"
PROTOCOL = pickle.HIGHEST_PROTOCOL
MEMO, QUESTION, ANSWER = "memo", "question", "answer"
QUESTION_ID = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+-[0-9a-f]{4,}")


@dataclass(frozen=True, slots=True)
class Entry:
    """One journaled fact of a step in progress.

    ``kind`` is ``"memo"`` (``key``: the memo key), ``"question"`` (``key``: ``ask<k>``, the
    step's k-th question) or ``"answer"`` (``key``: the question's id). ``data`` is the
    pickled value; ``meta`` holds what goes with it (``timed_out`` for an answer).
    """

    kind: str
    key: str
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)

    def value(self) -> Any:
        return pickle.loads(self.data)


def pickle_value(value: Any, what: str) -> bytes:
    """``value`` pickled, or a ``TypeError`` that says what it was (nothing is journaled)."""
    try:
        return pickle.dumps(value, protocol=PROTOCOL)
    except Exception as exc:
        raise TypeError(f"{what} cannot be pickled, so it cannot be journaled: {exc!r}") from exc


def _digest(body: bytes | memoryview, key: bytes | None) -> bytes:
    if key is None:
        return hashlib.sha256(body).digest()
    return hmac.new(key, body, hashlib.sha256).digest()


def encode(entry: Entry, key: bytes | None) -> bytes:
    body = pickle.dumps(entry, protocol=PROTOCOL)
    return MAGIC + _digest(body, key) + body


def decode(data: bytes, key: bytes | None, path: str | Path) -> Entry | None:
    """The entry in ``data``, or None (with a warning) when it fails its check."""
    head = len(MAGIC) + 32
    body = memoryview(data)[head:]
    if data[: len(MAGIC)] != MAGIC or not hmac.compare_digest(
        data[len(MAGIC) : head], _digest(body, key)
    ):
        warnings.warn(
            f"journal entry {path} fails its check (damaged, or signed with another key); "
            "it is ignored and its call is made again",
            SnapshotWarning,
            stacklevel=2,
        )
        return None
    entry = pickle.loads(body)
    return entry if isinstance(entry, Entry) else None


def loop_folder(session: Path, loop_idx: int) -> str:
    return os.path.join(session, JOURNAL_NAME, str(loop_idx))


def entry_path(session: Path, loop_idx: int, step_idx: int, n: int) -> str:
    return os.path.join(session, JOURNAL_NAME, str(loop_idx), f"{step_idx}.{n}")


def write_entry(
    session: Path, loop_idx: int, step_idx: int, n: int, data: bytes, durability: Durability
) -> str:
    """Write one encoded entry atomically (blocking); return its path."""
    path = entry_path(session, loop_idx, step_idx, n)
    write_atomic(path, [data], durability, make_dir=True, tmp_dir=os.path.join(session, TMP_NAME))
    return path


@dataclass(slots=True)
class StepEntries:
    """The journal of one step in progress, as found on disk."""

    entries: list[Entry] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    next_n: int = 0


def read_journal(session: Path, key: bytes | None) -> dict[tuple[int, int], StepEntries]:
    """Every journaled step of a session: ``(loop, step) -> its entries`` in order (blocking)."""
    found: dict[tuple[int, int], StepEntries] = {}
    for loop_idx, step_idx, n, path in _entry_files(session):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:  # a running engine removed it: its step completed
            continue
        step = found.setdefault((loop_idx, step_idx), StepEntries())
        step.next_n = max(step.next_n, n + 1)
        step.paths.append(path)
        entry = decode(data, key, path)
        if entry is not None:
            step.entries.append(entry)
    return found


def _entry_files(session: Path) -> Iterator[tuple[int, int, int, str]]:
    """``(loop, step, n, path)`` of each entry file, in order of ``n`` within a step."""
    root = os.path.join(session, JOURNAL_NAME)
    try:
        loops = [e for e in os.scandir(root) if e.name.isdigit() and e.is_dir()]
    except FileNotFoundError:
        return
    for loop_entry in loops:
        files = []
        try:
            names = list(os.scandir(loop_entry.path))
        except FileNotFoundError:  # a running engine removed it: its loop finished
            continue
        for e in names:
            step, dot, count = e.name.partition(".")
            if dot and step.isdigit() and count.isdigit():
                files.append((int(step), int(count), e.path))
        for step_idx, n, path in sorted(files):
            yield int(loop_entry.name), step_idx, n, path


def remove_files(paths: list[str], folders: tuple[str, ...] = ()) -> None:
    """Remove entry files, then the folders given if they are empty now (blocking)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty (a later step's entries) or gone
            os.rmdir(folder)


# -- answers from other processes --------------------------------------------------------


def answer_path(session: Path, question_id: str) -> str:
    return os.path.join(session, ANSWERS_NAME, question_id)


def read_answers(session: Path, key: bytes | None) -> dict[str, tuple[Entry, str]]:
    """The answers other processes left: ``question id -> (answer entry, its file)``."""
    folder = os.path.join(session, ANSWERS_NAME)
    try:
        files = [e for e in os.scandir(folder) if QUESTION_ID.fullmatch(e.name)]
    except FileNotFoundError:
        return {}
    answers = {}
    for e in files:
        try:
            with open(e.path, "rb") as f:
                entry = decode(f.read(), key, e.path)
        except FileNotFoundError:  # taken meanwhile
            continue
        if entry is not None and entry.kind == ANSWER:
            answers[e.name] = (entry, e.path)
    return answers


def open_questions(session: Path, key: bytes | None) -> list[Question]:
    """The questions of a session that wait for an answer, oldest first (blocking).

    A question is open while its step is in progress (no step file shows it complete), no
    answer is journaled for it, and no answer waits in ``.answers``.
    """
    questions = [entry.value() for entry in _open_entries(session, key)]
    questions.sort(key=lambda q: (q.asked_at, q.id))
    return questions


def _open_entries(session: Path, key: bytes | None) -> list[Entry]:
    """The journal entries of the open questions (not unpickled: ``meta["id"]`` names them,
    so answering one needs no import of the classes in any payload)."""
    answered = set(read_answers(session, key))
    found = []
    for (loop_idx, step_idx), step in read_journal(session, key).items():
        if _step_completed(session, loop_idx, step_idx):
            continue  # a run was killed before it removed the journal of a completed step
        done = {e.key for e in step.entries if e.kind == ANSWER}
        for entry in step.entries:
            qid = entry.meta.get("id") if entry.kind == QUESTION else None
            if qid is not None and qid not in done and qid not in answered:
                found.append(entry)
    return found


def _step_completed(session: Path, loop_idx: int, step_idx: int) -> bool:
    try:
        names = os.listdir(os.path.join(session, str(loop_idx)))
    except FileNotFoundError:
        return False
    return any(int(n.split("_")[0]) >= step_idx for n in names if n.split("_")[0].isdigit())


def leave_answer(
    session: Path, question_id: str, value: Any, key: bytes | None, durability: Durability
) -> None:
    """Leave ``value`` as the answer to the open question ``question_id`` (blocking).

    ``KeyError`` naming the id when no such question is open, or it has been answered
    (also by someone else at the same moment: the answer file is created exclusively).
    """
    if not isinstance(question_id, str):
        raise TypeError(f"question_id must be a str, got {question_id!r}")
    if not any(e.meta["id"] == question_id for e in _open_entries(session, key)):
        raise KeyError(
            f"no open question {question_id!r} in session {session}: unknown, or answered "
            "already (rdagent-loop questions lists the open ones)"
        )
    data = pickle_value(value, f"the answer to question {question_id!r} ({value!r})")
    encoded = encode(Entry(ANSWER, question_id, data), key)
    folder = os.path.join(session, ANSWERS_NAME)
    tmp = os.path.join(folder, f".new-{os.getpid()}-{question_id}")
    os.makedirs(folder, exist_ok=True)
    write_atomic(tmp, [encoded], durability)
    try:
        os.link(tmp, answer_path(session, question_id))  # exclusive: one answer wins
    except FileExistsError:
        raise KeyError(f"question {question_id!r} was answered already") from None
    finally:
        os.unlink(tmp)
    if durability == "fsync":
        from ._atomic import fsync_dir

        fsync_dir(folder)
