"""Questions (``loop.ask``) and the step journal through the command line.

A real run waits for an answer in a child process; the ``questions``, ``answer``,
``inspect`` and ``timeline`` commands, each a process of its own, see and answer it, as a
person in another shell would. The test waits for the question by polling the session
(``pending_questions``), never by sleeping a fixed time.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from cli_helpers import cli_command, cli_env, inspect_json, run_cli

from rdagent_loop import LoopBase, LoopSettings, Question, pending_questions
from rdagent_loop._live import LiveDisplay
from rdagent_loop._timeline import WAIT
from rdagent_loop.cli._driver import _drive
from rdagent_loop.cli._messages import prog, shown

PROG = "python -m rdagent_loop"
FLUSH = {"RDAGENT_LOOP_DURABILITY": "flush"}

ASKING = textwrap.dedent(
    """\
    from rdagent_loop import LoopBase


    class Idea:
        def __init__(self, name):
            self.name = name

        def __repr__(self):
            return f"Idea({self.name!r})"


    class Asking(LoopBase):
        \"\"\"review memoizes two calls, then asks about what propose found.\"\"\"

        async def propose(self, prev_out):
            return await self.memo("idea", lambda: Idea("momentum"))

        async def review(self, prev_out):
            await self.memo("a", lambda: 1)
            await self.memo("b", lambda: 2)
            return await self.ask("approve the idea?", payload=prev_out["propose"])

        def record(self, prev_out):
            return f"got {prev_out['review']!r}"


    class AsksFirst(LoopBase):
        \"\"\"The first step asks: until it is answered, the session has no snapshot.\"\"\"

        async def propose(self, prev_out):
            await self.memo("idea", lambda: 1)
            return await self.ask("go?", payload={"n": 1})

        def record(self, prev_out):
            return f"got {prev_out['propose']!r}"
    """
)


@dataclass
class Waiting:
    """A run in a child process, waiting for the answer to ``question``."""

    proc: subprocess.Popen[str]
    cwd: Path
    trace: Path
    question: Question

    def finish(self, timeout: float = 60) -> tuple[str, str]:
        """Wait for the run to end; its stdout and stderr."""
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return out, err


def wait_for_question(trace: Path, proc: subprocess.Popen[str], timeout: float = 60) -> Question:
    """Poll the session until a question is open (the run may still be starting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before it asked:\n{out}\n{err}")
        questions = open_now(trace)
        if questions:
            return questions[0]
        time.sleep(0.05)
    pytest.fail(f"no question in {trace} after {timeout}s")


@pytest.fixture
def start_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``start_run("Asking")``: run that class of :data:`ASKING` in a child process until
    its first question is open. The module gets a name of its own, so the test's own
    process can read the questions' payloads (an ``Idea``) too."""
    module = f"asking_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(ASKING)
    monkeypatch.syspath_prepend(str(tmp_path))
    started: list[subprocess.Popen[str]] = []

    def start(cls: str = "Asking") -> Waiting:
        proc = subprocess.Popen(
            cli_command("run", f"{module}:{cls}", "--loop-n", "1", "--trace-path", "t"),
            cwd=tmp_path,
            env=cli_env(**FLUSH),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        return Waiting(proc, tmp_path, tmp_path / "t", wait_for_question(tmp_path / "t", proc))

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    sys.modules.pop(module, None)


def cli(waiting: Waiting, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args),
        cwd=waiting.cwd,
        env=cli_env(**FLUSH),
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
    )


def test_questions_lists_what_a_waiting_run_asks(start_run: Any, tmp_path: Path) -> None:
    waiting = start_run()
    q = waiting.question
    assert (q.loop_idx, q.step_idx, q.step_name, q.question) == (
        0,
        1,
        "review",
        "approve the idea?",
    )
    for session in ("t", "t/__session__"):
        done = cli(waiting, "questions", session)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == "1 open question in t:"
        assert lines[1].startswith(f"  {q.id}  loop 0 step 1 review  asked ")
        assert lines[1].endswith(": 'approve the idea?' about Idea('momentum')")
        assert lines[2].startswith(f"answer with: {PROG} answer t {q.id} 'JSON'")
    done = cli(waiting, "questions", "t", "--json")
    assert done.returncode == 0, done.stderr
    [listed] = json.loads(done.stdout)
    assert listed["id"] == q.id and listed["asked_at"] == q.asked_at.isoformat()
    assert (listed["loop_idx"], listed["step_idx"], listed["step_name"]) == (0, 1, "review")
    assert listed["payload"] is None and listed["payload_repr"] == "Idea('momentum')"
    # where the payload's class cannot be imported: a clear line, no traceback
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_cli("questions", str(waiting.trace), cwd=elsewhere)
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"{PROG}: error: cannot read the questions of ")
    assert "--class MODULE:CLASS" in line
    # nothing changed: the run still waits
    assert waiting.proc.poll() is None
    assert [x.id for x in pending_questions(waiting.trace)] == [q.id]


def test_answer_from_the_cli_lets_the_waiting_run_finish(start_run: Any) -> None:
    waiting = start_run()
    qid = waiting.question.id

    # bad JSON: a usage error naming the value; nothing answered
    done = cli(waiting, "answer", "t", qid, "yes")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"{PROG}: error: Invalid value for 'VALUE': 'yes' is not JSON")
    assert "'\"yes\"'" in line
    # an unknown id: one line naming it, exit status 1, no traceback
    done = cli(waiting, "answer", "t", "0.1.0-ffff", '"yes"')
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{PROG}: error: no open question '0.1.0-ffff' in t: unknown, or answered already "
        f"(list the open ones with: {PROG} questions t)"
    ]
    assert waiting.proc.poll() is None
    assert [x.id for x in pending_questions(waiting.trace)] == [qid]

    done = cli(waiting, "answer", "t", qid, '{"ok": true, "n": -1}')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f'answered {qid} (loop 0 step 1 review: \'approve the idea?\') with {{"ok": true, "n": -1}}'
    )
    out, err = waiting.finish()
    # the run showed the question, and how to answer it
    assert (
        f"  loop 0 step review asks: approve the idea? about Idea('momentum') — "
        f"answer with: {PROG} answer t {qid} '<json>'"
    ) in err.splitlines()
    assert "finished: 3 steps, 1 loop completed; stopped by loop_n" in out
    report = inspect_json(waiting.trace, cwd=waiting.cwd)
    assert report["loops"][0]["result"] == "got {'ok': True, 'n': -1}"
    assert report["questions_open"] == 0 and report["memos_journaled"] == 0

    # answered already: an error naming the id; the list is empty
    done = cli(waiting, "answer", "t", qid, "3")
    assert done.returncode == 1
    assert f"no open question {qid!r} in t" in done.stderr and "Traceback" not in done.stderr
    done = cli(waiting, "questions", "t")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no open questions in t: no step waits for an answer"

    # the timeline draws the wait in its own colour, and names it in the legend
    done = cli(waiting, "timeline", "t", "-o", "t.svg")
    assert done.returncode == 0, done.stderr
    svg = (waiting.cwd / "t.svg").read_text()
    assert svg.count('class="wait"') == 1 and f'fill="{WAIT}"' in svg
    assert ">waiting for an answer</tspan>" in svg
    assert "waiting for answers" in svg  # the header's total


def test_inspect_shows_open_questions_and_journaled_memos(start_run: Any) -> None:
    waiting = start_run()
    qid = waiting.question.id
    done = cli(waiting, "inspect", "t")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith(
        " · 1 loop (0 finished, 1 not) · 1 snapshot · 1 open question · 2 memoized calls journaled"
    )
    row = next(line for line in lines if line.split()[:2] == ["0", "unfinished"])
    assert "asks? 2 memo" in row
    at = lines.index(next(line for line in lines if line.startswith("open questions (1):")))
    assert lines[at].endswith(f"answer with: {PROG} answer t ID 'JSON'")
    assert lines[at + 1].startswith(
        f"  loop 0 review: {qid} asks 'approve the idea?' about Idea('momentum'), asked "
    )

    report = inspect_json(waiting.trace, cwd=waiting.cwd)
    assert (report["questions_open"], report["memos_journaled"]) == (1, 2)
    journal = report["loops"][0]["journal"]
    assert (journal["step_idx"], journal["memos"], journal["answers_waiting"]) == (1, 2, 0)
    assert [q["id"] for q in journal["questions"]] == [qid]
    assert journal["questions"][0]["payload"] == "Idea('momentum')"

    # answered, and the run not there to take it (stopped): "left for the run to take"
    waiting.proc.kill()
    waiting.proc.communicate()
    assert cli(waiting, "answer", "t", qid, "1").returncode == 0
    report = inspect_json(waiting.trace, cwd=waiting.cwd)
    assert (report["questions_open"], report["answers_waiting"]) == (0, 1)
    assert report["memos_journaled"] == 2  # the resume replays them


def test_inspect_a_session_whose_first_step_asks(start_run: Any) -> None:
    """No step completed, so no snapshot: the journal alone says what goes on."""
    waiting = start_run("AsksFirst")
    done = cli(waiting, "inspect", "t")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert " · 0 snapshots · 1 open question · 1 memoized call journaled" in lines[0]
    header = next(line for line in lines if line.lstrip().startswith("loop"))
    assert "propose" in header and "record" in header  # the class's steps
    row = next(line for line in lines if line.split()[:2] == ["0", "unfinished"])
    assert "asks? 1 memo" in row
    assert f"  loop 0 propose: {waiting.question.id} asks 'go?' about {{'n': 1}}" in done.stdout
    done = cli(waiting, "timeline", "t", "-o", "t.svg")
    assert done.returncode == 0, done.stderr
    assert "no finished step yet" in (waiting.cwd / "t.svg").read_text()


class Asks(LoopBase):
    """Asks in its second step; the payload a plain dict (the answering CLI reads it)."""

    async def propose(self, prev_out: dict[str, Any]) -> str:
        return "momentum"

    async def review(self, prev_out: dict[str, Any]) -> Any:
        return await self.ask("approve the idea?", payload={"idea": prev_out["propose"]})

    async def record(self, prev_out: dict[str, Any]) -> str:
        return f"got {prev_out['review']!r}"


def open_now(trace: Path) -> list[Question]:
    try:
        return pending_questions(trace)
    except FileNotFoundError:  # no session folder yet
        return []


@pytest.mark.anyio
async def test_the_run_display_shows_a_question_and_the_loops_that_wait(
    tmp_path: Path,
) -> None:
    """The command's driver and display, fed by a real run whose question another process
    answers with the ``answer`` command."""
    loop = Asks(LoopSettings(trace_path=tmp_path / "t", progress=False, durability="flush"))
    out = io.StringIO()
    answer_with = f"{prog()} answer {shown(tmp_path / 't')}"
    display = LiveDisplay(loop, out, interactive=True, loop_n=1, answer_with=answer_with)
    seen: list[tuple[str, str]] = []

    async def answer_from_another_shell() -> None:
        with anyio.fail_after(60):
            while not (questions := await anyio.to_thread.run_sync(open_now, tmp_path / "t")):
                await anyio.sleep(0.02)
            while display.waiting() == 0:
                await anyio.sleep(0.01)
        seen.append((questions[0].id, display.header()))
        done = await anyio.run_process(
            cli_command("answer", "t", questions[0].id, '"yes"'),
            cwd=tmp_path,
            env=cli_env(**FLUSH),
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()

    async with anyio.create_task_group() as tg:
        tg.start_soon(answer_from_another_shell)
        ended = await _drive(loop, display, {"loop_n": 1})
        if ended.error is not None:  # the question will not be answered: do not wait for it
            tg.cancel_scope.cancel()
    display.close()
    assert ended.error is None and ended.summary is not None, ended.error
    assert ended.summary.steps == 3
    [(qid, header)] = seen
    assert ", 1 waiting for an answer · " in header
    assert " waiting for an answer" not in display.header()  # answered: none waits now
    text = re.sub(r"\x1b\[\d*[FJ]", "", out.getvalue())  # the live block's redraws
    line = (
        f"  loop 0 step review asks: approve the idea? about {{'idea': 'momentum'}} — "
        f"answer with: {answer_with} {qid} '<json>'"
    )
    assert line in text.splitlines(), text
    assert "loop 0 done: got 'yes'" in text
