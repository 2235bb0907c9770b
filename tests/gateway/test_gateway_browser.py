"""The gateway as a user starts it (``hypercorn ... --worker-class``), and in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_helpers import free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"


def start_hypercorn(tmp_path: Path, worker_class: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "RDAGENT_GATEWAY_TRACE_ROOT": str(tmp_path / "runs"),
    }
    command = [sys.executable, "-m", "hypercorn", "examples.gateway.app:app",
               "--worker-class", worker_class, "--bind", f"127.0.0.1:{port}"]  # fmt: skip
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: stopped as a whole below
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url + "/runs", timeout=1)
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"hypercorn did not start: {proc.stderr!r}") from None
            time.sleep(0.1)
        else:
            return proc, url


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture(params=["asyncio", "trio"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    proc, url = start_hypercorn(tmp_path, request.param)
    try:
        yield url
    finally:
        stop(proc)


def test_the_hypercorn_command_serves_runs(server: str) -> None:
    query = {"example": "quant_factor", "loops": "1", "parallel": "1"}
    kinds = []
    with httpx.stream("GET", server + "/runs/stream", params=query, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: "))
            if line.startswith("data: ") and kinds[-1] == "summary":
                assert json.loads(line.removeprefix("data: "))["reason"] == "loop_n"
    assert kinds == ["start"] + ["step"] * 5 + ["summary"]


def launch_chromium(pw: Any) -> Any:
    return pw.chromium.launch(
        executable_path=CHROMIUM,
        args=["--headless", "--no-sandbox", "--disable-gpu",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"],
    )  # fmt: skip


@pytest.mark.browser
def test_the_page_shows_steps_appear_then_the_summary(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}")
    proc, url = start_hypercorn(tmp_path, "trio")
    try:
        with sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.select_option("#example", "data_science")
                page.fill("#loops", "3")
                page.fill("#parallel", "2")
                page.click("#start")
                # steps appear while the run goes on...
                page.wait_for_selector("td.step.done", timeout=30_000)
                assert page.locator("#summary").is_hidden() or page.locator("td.step.done").count()
                headers = page.locator("#head th").all_inner_texts()
                assert headers == ["loop", "direct_exp_gen", "coding", "running", "feedback",
                                   "record", "result"]  # fmt: skip
                # ...then the summary
                page.wait_for_selector("#summary:not([hidden])", timeout=60_000)
                summary = page.inner_text("#summary")
                assert "15 steps, 3 loops completed; stopped by loop_n" in summary
                assert "Best: loop " in summary
                assert page.locator("#rows tr").count() == 3
                assert page.locator("td.step.done").count() == 15
                assert page.inner_text("#status") == "done"
                page.screenshot(path=str(tmp_path / "gateway.png"), full_page=True)
            finally:
                browser.close()
        runs = httpx.get(url + "/runs", timeout=5).json()
        assert runs["active"] == [] and runs["ended"][-1]["ended"] == "finished"
    finally:
        stop(proc)
    assert shutil.which("chromium") or Path(CHROMIUM).exists()


@pytest.mark.browser
@pytest.mark.parametrize("worker_class", ["asyncio", "trio"])
def test_a_question_is_answered_in_the_page(tmp_path: Path, worker_class: str) -> None:
    """Loop 0 alone asks (``review`` 1000); other loops stream while it waits; the answer
    typed in the page lets it go on, and its feedback says what was answered."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}")
    proc, url = start_hypercorn(tmp_path, worker_class)
    others = "#rows tr:not(#loop-0) td.step.done"
    try:
        with sync_api.sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = browser.new_page()
                page.goto(url + "/")
                page.select_option("#example", "quant_factor")
                page.fill("#loops", "1000")
                page.fill("#parallel", "2")
                page.fill("#review", "1000")
                page.click("#start")
                question = page.locator("#question-list li.question")
                question.wait_for(timeout=60_000)
                assert question.count() == 1
                assert question.get_attribute("data-loop") == "0"
                assert "loop 0: keep the factor " in question.inner_text()
                assert '"expression":' in page.inner_text("#question-list pre")
                assert page.inner_text("#loop-0 td[data-step=feedback]") == "asks…"
                # while it is open, other loops go on: more of their steps get done...
                done = page.locator(others).count()
                page.wait_for_function(
                    "([selector, done]) => document.querySelectorAll(selector).length > done",
                    arg=[others, done + 5],
                    timeout=60_000,
                )
                # ...and loop 0 waits
                assert question.count() == 1
                assert page.locator("#loop-0 td[data-step=feedback].done").count() == 0
                question.locator("input.answer").fill("no")
                question.locator("button").click()
                question.wait_for(state="detached", timeout=30_000)
                assert page.locator("#questions").is_hidden()
                feedback = page.locator("#loop-0 td[data-step=feedback].done")
                feedback.wait_for(timeout=60_000)
                said = feedback.get_attribute("title") or ""
                assert said.startswith("reject: ") and said.endswith('(the reviewer said "no")')
                page.locator("#loop-0 td[data-step=record].done").wait_for(timeout=60_000)
                assert "new best" not in page.inner_text("#loop-0 td.result")
                page.click("#stop")
                assert page.inner_text("#status") == "stopped"
                page.screenshot(path=str(tmp_path / "gateway-question.png"), full_page=True)
            finally:
                browser.close()
        # the page left: the server stops the run
        deadline = time.monotonic() + 60
        while (runs := httpx.get(url + "/runs", timeout=5).json())["active"]:
            assert time.monotonic() < deadline, runs
            time.sleep(0.05)
        ended = runs["ended"][-1]
        assert (ended["ended"], ended["review"], ended["questions"]) == ("disconnected", 1000, 1)
    finally:
        stop(proc)
