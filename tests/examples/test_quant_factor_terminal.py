"""``python -m examples.quant_factor --ask``: questions answered at the terminal, or elsewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from examples.quant_factor import FactorLoop
from examples.quant_factor.terminal import Desk, reply, run_at_terminal
from rdagent_loop import LoopSettings, Question, answer

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
ANSWER_HINT = re.compile(r"rdagent-loop answer (\S+) (\S+) true\)$")


def asking_loop(tmp_path: Path) -> FactorLoop:
    settings = LoopSettings(trace_path=tmp_path / "t", progress=False, durability="flush")
    return FactorLoop(settings, stocks=20, days=120, llm_latency=0, mistake_rate=0, ask_person=True)


async def test_the_desk_answers_with_the_lines_typed(tmp_path: Path) -> None:
    """Enter approves; a typo is asked for again and not sent; an edit replaces the factor;
    a question answered from another process moves the desk on; "n" rejects."""
    loop = asking_loop(tmp_path)
    session = loop.session_folder.parent
    keyboard, typed = anyio.create_memory_object_stream[str](10)
    screen_send, screen = anyio.create_memory_object_stream[str](1000)
    shown: list[str] = []

    async def consume() -> None:
        async with screen_send:
            await run_at_terminal(loop.run(loop_n=4), session, screen_send.send_nowait, typed)

    # a reply the desk gets wrong leaves a question open for ever: fail instead of hanging
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg, keyboard, screen:
            tg.start_soon(consume)
            async for line in screen:
                shown.append(line)
                if line.startswith("? loop 0:"):
                    keyboard.send_nowait("")  # Enter
                elif line.startswith("? loop 1:"):
                    keyboard.send_nowait("ts_mean(ret, 400)")  # a window too long
                elif line.endswith("; answer again"):
                    keyboard.send_nowait(" -ts_mean(ret, 3) ")
                elif line.startswith("? loop 2:"):
                    question_id = _question_id_after(screen, shown)
                    # from another process: the engine takes it from the session
                    edit = {"edit": "rank(ret)"}
                    await anyio.to_thread.run_sync(answer, session, question_id, edit)
                elif line.startswith("? loop 3:"):
                    keyboard.send_nowait("n")
    text = "\n".join(shown)
    assert "the edit is not a valid factor" in text
    assert re.search(r"\(question 2\.0\.0-[0-9a-f]+ was answered elsewhere\)", text)
    assert [(r.loop_idx, r.expression, r.rejected) for r in loop.library][1:3] == [
        (1, "-ts_mean(ret, 3)", False), (2, "rank(ret)", False)
    ]  # fmt: skip
    assert loop.library[3].rejected
    assert loop.library[0].name == loop.loop_prev_out[0]["propose"].name  # approved as it was


def _question_id_after(screen: Any, shown: list[str]) -> str:
    """The id in the prompt line the desk prints right after a question (already sent)."""
    while True:
        line = screen.receive_nowait()
        shown.append(line)
        found = ANSWER_HINT.search(line)
        if found:
            return found.group(2)


def test_a_line_typed_is_the_answer_it_stands_for() -> None:
    assert reply("") is True and reply("  ") is True
    assert reply(" y ") == "y" and reply("rank(ret)") == "rank(ret)"


async def test_a_line_with_no_question_waits_for_the_next_one(tmp_path: Path) -> None:
    said: list[str] = []
    answers: list[tuple[str, Any]] = []
    desk = Desk(lambda qid, value: answers.append((qid, value)), said.append, tmp_path)
    typed_send, typed = anyio.create_memory_object_stream[str](10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(desk.take_lines, typed)
        typed_send.send_nowait("n")  # typed ahead
        await anyio.wait_all_tasks_blocked()
        assert answers == []
        desk.asked(_question(7))
        await anyio.wait_all_tasks_blocked()
        assert answers == [("7.0.0-abcd", "n")]
        tg.cancel_scope.cancel()  # the run is over
    typed_send.close()
    assert said[0] == "? try it?"


def _question(loop_idx: int) -> Question:
    from datetime import datetime, timezone

    return Question(
        f"{loop_idx}.0.0-abcd", loop_idx, 0, "propose", "try it?", None, datetime.now(timezone.utc)
    )


# -- the command line, in a child process ------------------------------------------------


def _command(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("RDAGENT_LOOP_TRACE_PATH", None)
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ask_at_the_terminal_and_from_another_shell(tmp_path: Path) -> None:
    shown = []
    with _command(
        "-m", "examples.quant_factor", "--ask", "--loop-n", "3", "--llm-latency", "0",
        "--trace-path", "t", cwd=tmp_path,
    ) as proc:  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        # a question left unanswered would wait for ever: stop it, and the checks below fail
        watchdog = threading.Timer(60, proc.kill)
        watchdog.start()
        try:
            question = ""
            for line in proc.stdout:
                shown.append(line.rstrip("\n"))
                if line.startswith("? "):
                    question = line
                found = ANSWER_HINT.search(line.rstrip("\n"))
                if found is None:
                    continue
                assert found.group(1) == "t"
                if question.startswith("? loop 0:"):
                    proc.stdin.write("y\n")
                    proc.stdin.flush()
                elif question.startswith("? loop 1:"):
                    # another terminal: the real command, while this one waits at its prompt
                    other = subprocess.run(
                        [sys.executable, "-m", "rdagent_loop", "answer", "t", found.group(2),
                         '"ts_sum(ret, 5)"'],
                        cwd=tmp_path, capture_output=True, text=True, timeout=60,
                        env={**os.environ, "PYTHONPATH": str(REPO)},
                    )  # fmt: skip
                    assert other.returncode == 0, other.stderr
                elif question.startswith("? loop 2:"):
                    proc.stdin.write("n\n")
                    proc.stdin.close()
            assert proc.wait(timeout=60) == 0, proc.stderr.read()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
    text = "\n".join(shown)
    assert re.search(r"\(question 1\.0\.0-[0-9a-f]+ was answered elsewhere\)", text)
    assert "finished: 13 steps, 3 loops completed; stopped by loop_n" in text
    loop = FactorLoop.load(tmp_path / "t")
    assert [(r.loop_idx, r.rejected) for r in loop.library] == [(0, False), (1, False), (2, True)]
    assert loop.library[1].expression == "ts_sum(ret, 5)"


def test_a_cost_budget_stops_the_example_and_a_larger_one_resumes_it(tmp_path: Path) -> None:
    """``--cost``: the session's model calls may cost this much, resumes included."""
    command = ("-m", "examples.quant_factor", "--loop-n", "10", "--llm-latency", "0")
    with _command(*command, "--cost", "0.02", "--trace-path", "t", cwd=tmp_path) as proc:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "; stopped by all_cost" in out
    spent = re.search(r"^the model calls of the session cost \$([0-9.]+) of \$0\.02$", out, re.M)
    assert spent is not None and float(spent.group(1)) >= 0.02, out
    resume = re.search(r"^resume with: .* --resume --trace-path t --cost ([0-9.]+)$", out, re.M)
    assert resume is not None and float(resume.group(1)) > float(spent.group(1)), out

    with _command(
        *command, "--resume", "--cost", resume.group(1), "--trace-path", "t", cwd=tmp_path
    ) as proc:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    total = re.search(r"^the model calls of the session cost \$([0-9.]+) of \$", out, re.M)
    assert total is not None and float(total.group(1)) > float(spent.group(1)), out
    assert FactorLoop.load(tmp_path / "t").spending.limit == float(resume.group(1))
