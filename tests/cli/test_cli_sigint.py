"""Ctrl-C (SIGINT) stops ``rdagent-loop run`` cleanly and leaves a session that resumes."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from cli_helpers import assert_consistent, cli_command, cli_env, inspect_json, run_cli

from rdagent_loop import list_snapshots

DS = "examples.data_science.loop:DataScienceLoop"


def leftovers(marker: str) -> list[psutil.Process]:
    """Processes whose command line mentions ``marker`` (a training script of the run)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_ctrl_c_leaves_a_resumable_session(tmp_path: Path, backend: str) -> None:
    session = tmp_path / "t"
    proc = subprocess.Popen(
        cli_command("run", DS, "--loop-n", "40", "--parallel", "2", "--backend", backend,
                    "--trace-path", "t"),
        cwd=tmp_path,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while len(list_snapshots(session / "__session__")) < 8:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run wrote too few snapshots"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    lines = out.splitlines()
    assert lines[-3].startswith("interrupted by Ctrl-C (SIGINT) after ")
    assert "stopped cleanly; the session in t keeps every completed step" in lines[-3]
    # what the model calls cost, though the run ended without its summary
    assert re.fullmatch(
        r"spent: \S+ \([0-9,]+ tokens\) in this run; the session's total .*", lines[-2]
    )
    assert lines[-1] == "resume with: python -m rdagent_loop resume t"
    assert "Traceback" not in err
    # the training scripts it ran in their own sessions are gone too
    assert leftovers(str(session / "data")) == []

    saved = list_snapshots(session / "__session__")
    assert saved and all(s.valid for s in saved)
    report = inspect_json(session, cwd=tmp_path)
    assert_consistent(report)

    done = run_cli("resume", "t", "--step-n", "4", "--backend", backend, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "resumed examples.data_science.loop:DataScienceLoop from snapshot "
        f"{saved[-1].loop_idx}/{saved[-1].step_idx}_{saved[-1].step_name}"
    )
    assert "finished: 4 steps" in done.stdout
    after = inspect_json(session, cwd=tmp_path)
    assert_consistent(after)
    errors = [s["error"] for loop in after["loops"] for s in loop["steps"] if s["error"]]
    assert not [e for e in errors if "No such file" in e]  # paths survive the resume
    steps_done = sum(
        s["status"] in ("done", "failed") for loop in after["loops"] for s in loop["steps"]
    )
    steps_before = sum(
        s["status"] in ("done", "failed") for loop in report["loops"] for s in loop["steps"]
    )
    assert steps_done == steps_before + 4
