"""The factor loop at a terminal: step results as lines, and questions put to the person there.

With ``ask_person`` on, every proposed factor waits for a person (:meth:`FactorLoop.propose`).
The :class:`Desk` shows the questions one at a time, oldest first, and answers the one shown
with the next line typed: Enter or ``y`` approves, ``n`` rejects, anything else is an edited
expression (checked before it is sent: a typo is asked for again, not sent). The same
question can be answered from another shell with ``rdagent-loop answer SESSION ID JSON``;
whichever answer comes first counts, and the desk moves on.

Standard input is read by a daemon thread (:func:`stdin_lines`): a read of a terminal cannot
be cancelled, and a daemon thread left waiting for a line does not keep the program alive
when the run is over. The event loop never waits for the keyboard, so the other loops go on.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TextIO

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import ObjectReceiveStream

from rdagent_loop import LoopRun, Question, RunStatistics, RunSummary, StepResult

from .loop import read_review

Echo = Callable[[str], None]


def reply(line: str) -> Any:
    """The answer a line typed at the prompt stands for: Enter approves; otherwise the text
    (``y``, ``n``, or an edited expression, as :func:`read_review` reads them)."""
    text = line.strip()
    return text or True


class Desk:
    """Where questions meet the person at the terminal: one shown at a time, oldest first.

    ``answer`` is the run's ``results.answer``; ``echo`` prints one line.
    """

    def __init__(self, answer: Callable[[str, Any], None], echo: Echo, session: Path) -> None:
        self._answer = answer
        self._echo = echo
        self._session = session
        self._waiting: list[Question] = []
        self._changed = anyio.Event()

    @property
    def shown(self) -> Question | None:
        """The question the next line typed answers."""
        return self._waiting[0] if self._waiting else None

    def asked(self, question: Question) -> None:
        # a step asks one question at a time: one it asked before was answered
        self._settle(question.loop_idx, question.step_idx)
        self._waiting.append(question)
        self._changed.set()
        self._changed = anyio.Event()
        if len(self._waiting) == 1:
            self._show()

    def step_done(self, result: StepResult) -> None:
        """A step completed: what it asked has been answered, here or elsewhere."""
        self._settle(result.loop_idx, result.step_idx)

    def typed(self, line: str) -> None:
        """Answer the question shown with ``line``."""
        question = self.shown
        if question is None:
            self._echo("  (no question is waiting for an answer: line ignored)")
            return
        value = reply(line)
        try:
            read_review(value)
        except ValueError as exc:
            self._echo(f"  {exc}; answer again")
            self._prompt(question)
            return
        try:
            self._answer(question.id, value)
        except KeyError:
            self._echo(f"  (question {question.id} was answered elsewhere)")
        self._waiting.remove(question)
        if self._waiting:
            self._show()

    async def take_lines(self, lines: ObjectReceiveStream[str]) -> None:
        """Answer with the lines typed, until the input ends. A line is taken only while a
        question is shown: one typed ahead (or piped in) waits for the next question."""
        line = None
        async with lines:
            while True:
                while not self._waiting:
                    await self._changed.wait()
                if line is None:
                    try:
                        line = await lines.receive()
                    except anyio.EndOfStream:
                        break
                if self._waiting:  # not answered elsewhere meanwhile
                    self.typed(line)
                    line = None
        if self._waiting:
            self._echo(
                "  (the input has ended: answer from another shell with "
                f"rdagent-loop answer {self._session} ID JSON)"
            )

    def _settle(self, loop_idx: int, step_idx: int) -> None:
        shown = self.shown
        self._waiting = [
            q for q in self._waiting if (q.loop_idx, q.step_idx) != (loop_idx, step_idx)
        ]
        if shown is not None and shown is not self.shown:
            self._echo(f"  (question {shown.id} was answered elsewhere)")
            if self._waiting:
                self._show()

    def _show(self) -> None:
        question = self._waiting[0]
        self._echo(f"? {question.question}")
        payload = question.payload
        if isinstance(payload, dict) and {"name", "expression", "hypothesis"} <= set(payload):
            self._echo(f"  {payload['name']}: {payload['expression']}")
            self._echo(f"  why: {payload['hypothesis']}")
        self._prompt(question)

    def _prompt(self, question: Question) -> None:
        self._echo(
            "  [Enter] approve · [n] reject · or type an edited expression "
            f"(from another shell: rdagent-loop answer {self._session} {question.id} true)"
        )


@contextlib.asynccontextmanager
async def stdin_lines(stream: TextIO | None = None) -> AsyncIterator[ObjectReceiveStream[str]]:
    """The lines typed on standard input (or ``stream``), read by a daemon thread."""
    source = sys.stdin if stream is None else stream
    send, receive = anyio.create_memory_object_stream[str](math.inf)
    token = anyio.lowlevel.current_token()

    def read() -> None:
        try:
            while line := source.readline():
                anyio.from_thread.run_sync(send.send_nowait, line.rstrip("\r\n"), token=token)
            anyio.from_thread.run_sync(send.close, token=token)
        except Exception:  # the run is over (the event loop is gone), or the input broke
            return

    threading.Thread(target=read, name="quant_factor stdin", daemon=True).start()
    with receive:
        yield receive


async def run_at_terminal(
    run: LoopRun, session: Path, echo: Echo, lines: ObjectReceiveStream[str] | None = None
) -> RunSummary | None:
    """Consume ``run``: print every step, show its questions and answer them with ``lines``
    (none: they are answered from another shell). The run's summary."""
    async with run as results:
        desk = Desk(results.answer, echo, session)
        async with anyio.create_task_group() as tg:
            if lines is not None:
                tg.start_soon(desk.take_lines, lines)
            async for item in results:
                if isinstance(item, Question):
                    desk.asked(item)
                else:
                    echo(str(item))
                    desk.step_done(item)
            tg.cancel_scope.cancel("the run ended")
    return results.summary


def replay_line(statistics: RunStatistics) -> str:
    """What a resumed run did not pay for again."""
    replayed, made = statistics.memo_replayed, statistics.memo_recorded
    calls = "model call" if replayed == 1 else "model calls"
    return (
        f"the resume replayed {replayed} {calls} from the journal instead of paying for "
        f"{'it' if replayed == 1 else 'them'} again ({made} new)"
    )
