"""A run killed right after a withdraw resumes from the restored state, not the withdrawn one.

A withdraw rolls every loop back to the newest snapshot written before the failing loop
started, and saves that restored state again as the newest snapshot: until the next step
completes, it is the only snapshot that tells the truth. Here a child process runs two
loops; loop 1 fails with a withdraw error in ``s2``, and the first step after the withdraw
(loop 1's ``s0`` again) waits until the restored state is on disk, says so in a file, and
blocks. The test then SIGKILLs the child, loads the session and resumes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from rdagent_loop import LoopBase, LoopSettings, list_snapshots

HANG = 60.0  # seconds: a bound that only a hang reaches, never a slow machine


class PolicyError(Exception):
    """The withdraw error."""


class WithdrawsOnce(LoopBase):
    """s0 -> s3, noting each completed step in ``self.notes``; loop 1's s2 withdraws once."""

    withdraw_loop_error = (PolicyError,)

    def __init__(self, settings: LoopSettings, folder: Path) -> None:
        super().__init__(settings)
        self.folder = folder
        self.notes: list[str] = []

    def _done(self, name: str, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        self.notes.append(f"{li}:{name}")
        return f"{name}@{li}"

    async def s0(self, prev_out: dict[str, Any]) -> str:
        withdrawn = (self.folder / "withdrawn").exists()
        if prev_out[self.LOOP_IDX_KEY] == 1 and withdrawn and not (self.folder / "ready").exists():
            await self._report_and_block()
        return self._done("s0", prev_out)

    async def _report_and_block(self) -> None:
        """The first step after the withdraw: wait (bounded) until a snapshot written after
        the withdraw is on disk (the snapshot writer works in the background), write down the
        newest snapshot and whether it is one, and wait to be killed."""
        withdrawn_at = int((self.folder / "withdrawn").read_text())
        found = "nothing was saved after the withdraw"
        with anyio.move_on_after(HANG / 3):
            while True:
                infos = await anyio.to_thread.run_sync(list_snapshots, self.session_folder)
                last = [info for info in infos if info.valid][-1]
                if last.written_at_ns > withdrawn_at:
                    found = "saved after the withdraw"
                    break
                await anyio.sleep(0.01)
        ready = self.folder / "ready"
        newest = f"{last.loop_idx}/{last.step_idx}_{last.step_name}: {found}"
        await anyio.to_thread.run_sync(ready.with_suffix(".tmp").write_text, newest)
        await anyio.to_thread.run_sync(ready.with_suffix(".tmp").rename, ready)
        await anyio.sleep_forever()

    async def s1(self, prev_out: dict[str, Any]) -> str:
        return self._done("s1", prev_out)

    async def s2(self, prev_out: dict[str, Any]) -> str:
        if prev_out[self.LOOP_IDX_KEY] == 1 and not (self.folder / "withdrawn").exists():
            (self.folder / "withdrawn").write_text(str(time.time_ns()))
            raise PolicyError("withdraw loop 1")
        return self._done("s2", prev_out)

    async def s3(self, prev_out: dict[str, Any]) -> str:
        return self._done("s3", prev_out)


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import anyio
    from test_session_withdraw_crash import WithdrawsOnce

    from rdagent_loop import LoopSettings

    backend, folder = sys.argv[1], Path(sys.argv[2])
    settings = LoopSettings(
        trace_path=folder / "trace", progress=False, durability="flush", step_semaphore=1
    )
    loop = WithdrawsOnce(settings, folder)
    anyio.run(lambda: loop.run(loop_n=2), backend=backend)
    """
)


def wait_ready(child: subprocess.Popen[bytes], folder: Path, log: Path) -> str:
    """Wait until the child's first step after the withdraw has written ``ready``."""
    deadline = time.monotonic() + HANG
    while not (folder / "ready").exists():
        assert child.poll() is None, f"the child ended early:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no step ran after the withdraw:\n{log.read_text()}"
        time.sleep(0.02)
    return (folder / "ready").read_text()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_run_killed_right_after_a_withdraw_resumes_from_the_restored_state(
    tmp_path: Path, backend: str
) -> None:
    here = Path(__file__).parent
    path = [str(here), str(here.parent), *sys.path]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    log = tmp_path / "child.log"
    with log.open("wb") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, backend, str(tmp_path)],
            env=env,
            cwd=tmp_path,
            stderr=out,
        )
    try:
        newest = wait_ready(child, tmp_path, log)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

    # the newest snapshot holds the restored state: loop 1 as before it started, not with
    # the two steps it had done when it withdrew
    loaded = WithdrawsOnce.load(tmp_path / "trace")
    assert (loaded.loop_idx, loaded.step_idx.get(1, 0)) == (1, 0), f"newest snapshot: {newest}"
    assert loaded.notes == ["0:s0", "0:s1", "0:s2", "0:s3"]
    assert "s1" not in loaded.loop_prev_out.get(1, {})
    assert newest.endswith(": saved after the withdraw"), newest

    # and resuming it runs loop 1 from its start, once, to the end
    summary = anyio.run(loaded.run, backend=backend)
    assert summary.loops == 1
    assert loaded.notes == [f"{li}:s{si}" for li in range(2) for si in range(4)]
    assert dict(loaded.step_idx) == {0: 4, 1: 4}
