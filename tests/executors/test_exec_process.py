"""The process executor: a reused pool of killable workers, on asyncio and trio.

Real processes run here, so these tests use the real clock; they wait for files the steps
write when they have started, never for a time, and bounds in seconds only guard against a
hang. Speed is measured in ``benchmarks/bench_executors.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from executor_helpers import (
    HANG,
    LONG,
    await_file,
    await_gone,
    my_children,
    run_until_written,
    settings_for,
    wait_for_file,
    wait_gone,
)

from rdagent_loop import LoopBase, RemoteStepError, WorkerCrashedError, step

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_child_left")]


class CustomError(Exception):
    def __init__(self, what, n):
        super().__init__(what, n)


class LockedError(Exception):
    """An exception that cannot travel: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class Withdraw(Exception):
    pass


class Shipped(LoopBase):
    """``s0`` and ``s3`` inline (first and last), ``s1`` and ``s2`` in the process pool."""

    withdraw_loop_error = (Withdraw,)

    def __init__(self, settings, folder: Path, fail: str = "", seconds: float = 0.0):
        super().__init__(settings)
        self.folder = folder
        self.fail = fail
        self.seconds = seconds

    def s0(self, prev_out):
        return os.getpid()

    def s1(self, prev_out):
        assert "s0" in prev_out
        li = prev_out[self.LOOP_IDX_KEY]
        with (self.folder / "s1.log").open("a") as log:
            log.write(f"{li} {os.getpid()} {time.monotonic()} start\n")
        time.sleep(self.seconds)
        with (self.folder / "s1.log").open("a") as log:
            log.write(f"{li} {os.getpid()} {time.monotonic()} end\n")
        return os.getpid()

    def s2(self, prev_out):
        li = prev_out[self.LOOP_IDX_KEY]
        if self.fail == "custom" and li == 1:
            raise CustomError("loop", 7)
        if self.fail == "locked" and li == 0:
            raise LockedError("cannot travel")
        if self.fail == "output" and li == 0:
            return (i for i in range(3))
        if self.fail == "withdraw" and li == 1 and not (self.folder / "withdrawn").exists():
            (self.folder / "withdrawn").touch()
            raise Withdraw("once")
        return prev_out["s1"]

    def s3(self, prev_out):
        return os.getpid()


def intervals(folder: Path) -> list[tuple[float, float]]:
    starts: dict[str, float] = {}
    spans = []
    for line in (folder / "s1.log").read_text().splitlines():
        li, _pid, t, what = line.split()
        if what == "start":
            starts[li] = float(t)
        else:
            spans.append((starts[li], float(t)))
    return sorted(spans)


async def test_process_steps_run_in_reused_workers(tmp_path):
    loop = Shipped(settings_for(tmp_path, step_semaphore=2), tmp_path)
    async with loop.run(loop_n=5) as results:
        outputs = {(r.loop_idx, r.step_name): r.output async for r in results}
    me = os.getpid()
    assert {outputs[(li, "s0")] for li in range(5)} == {me}
    assert {outputs[(li, "s3")] for li in range(5)} == {me}
    workers = {outputs[(li, name)] for li in range(5) for name in ("s1", "s2")}
    assert me not in workers
    assert len(workers) <= 2  # started once, reused by ten steps
    assert not await await_gone(workers)  # and shut down with the run


async def test_pool_survives_generations(tmp_path):
    loop = Shipped(settings_for(tmp_path, step_semaphore=2), tmp_path, fail="withdraw")
    async with loop.run(loop_n=4) as results:
        outputs = [r async for r in results]
    assert (tmp_path / "withdrawn").exists()
    workers = {r.output for r in outputs if r.step_name in ("s1", "s2")}
    # the pool is not started again for the new generation; the withdraw may have killed
    # (and so replaced) the one worker whose step was in flight beside the failing one
    assert len(workers) <= 3
    assert sorted(li for li, steps in loop.step_idx.items() if steps == 4) == [0, 1, 2, 3]


async def test_process_step_error_comes_back_as_itself(tmp_path):
    loop = Shipped(settings_for(tmp_path, step_semaphore=2), tmp_path, fail="custom")
    with pytest.raises(CustomError) as info:
        await loop.run(loop_n=3)
    assert type(info.value) is CustomError
    assert info.value.args == ("loop", 7)
    assert "in s2" in str(info.value.__cause__)  # the worker's traceback
    assert any("loop 1" in note and "'s2'" in note for note in info.value.__notes__)


async def test_exception_that_cannot_travel_keeps_its_type_name_and_message(tmp_path):
    loop = Shipped(settings_for(tmp_path, subproc_step=True), tmp_path, fail="locked")
    with pytest.raises(RemoteStepError, match="LockedError: cannot travel") as info:
        await loop.run(loop_n=1)
    assert info.value.type_name.endswith("test_exec_process.LockedError")
    assert "raise LockedError" in info.value.remote_traceback


async def test_output_that_cannot_travel_is_a_clear_error(tmp_path):
    loop = Shipped(settings_for(tmp_path, subproc_step=True), tmp_path, fail="output")
    with pytest.raises(TypeError, match="returned a value that cannot be pickled"):
        await loop.run(loop_n=1)


class NoWithdraw(Shipped):
    withdraw_loop_error = ()  # the engine would pickle the loop at the start to restore it


async def test_loop_that_cannot_travel_is_a_clear_error(tmp_path):
    loop = NoWithdraw(settings_for(tmp_path, subproc_step=True, save_snapshots=False), tmp_path)
    loop.lock = threading.Lock()
    with pytest.raises(TypeError, match="lock") as info:
        await loop.run(loop_n=1)
    assert any("step 's1' of loop 0 to a worker process" in n for n in info.value.__notes__)


async def test_pool_size_limits_concurrency(tmp_path):
    loop = Shipped(
        settings_for(tmp_path, step_semaphore=3, process_workers=1), tmp_path, seconds=0.2
    )
    await loop.run(loop_n=3)
    spans = intervals(tmp_path)
    assert len(spans) == 3
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))


class LimitedStep(Shipped):
    @step(executor="process", limit=1)
    def s1(self, prev_out):
        return super().s1(prev_out)


async def test_step_limit_is_respected_in_processes(tmp_path):
    loop = LimitedStep(settings_for(tmp_path, step_semaphore=3), tmp_path, seconds=0.2)
    await loop.run(loop_n=3)
    spans = intervals(tmp_path)
    assert len(spans) == 3
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))


class Spawner(LoopBase):
    """``s1`` starts ``sleep LONG`` children (one in a session of its own) and blocks."""

    def __init__(self, settings, folder: Path):
        super().__init__(settings)
        self.folder = folder

    def s0(self, prev_out):
        return 0

    def s1(self, prev_out):
        kids = [
            subprocess.Popen(["sleep", str(LONG)]),
            subprocess.Popen(["sleep", str(LONG)], start_new_session=True),
        ]
        pids = [os.getpid(), *(k.pid for k in kids)]
        (self.folder / f"pids-{prev_out[self.LOOP_IDX_KEY]}").write_text(" ".join(map(str, pids)))
        time.sleep(LONG)

    def s2(self, prev_out):
        return 2


def started_pids(folder: Path) -> list[int]:
    return [int(p) for f in folder.glob("pids-*") for p in f.read_text().split()]


async def test_deadline_kills_the_step_and_every_process_it_started(tmp_path):
    loop = Spawner(settings_for(tmp_path, step_semaphore=2), tmp_path)
    # the deadline falls once both steps have started their children; the run returning
    # long before the steps would end (LONG) shows the deadline did not wait for them
    with anyio.fail_after(HANG):
        files = [tmp_path / "pids-0", tmp_path / "pids-1"]
        summary = await run_until_written(loop, files, loop_n=2)
    assert summary.reason == "all_duration"
    pids = await anyio.to_thread.run_sync(started_pids, tmp_path)
    assert len(pids) == 6  # two workers, each with two children
    assert not await await_gone(pids)
    assert loop.step_idx[0] == loop.step_idx[1] == 1  # the cancelled steps are not done


class Crasher(Shipped):
    skip_loop_error = (WorkerCrashedError,)
    skip_loop_error_stepname = "s3"

    def s1(self, prev_out):
        if prev_out[self.LOOP_IDX_KEY] == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return os.getpid()


async def test_killed_worker_fails_its_step_and_the_next_runs_on_a_fresh_one(tmp_path):
    loop = Crasher(settings_for(tmp_path, subproc_step=True), tmp_path)
    async with loop.run(loop_n=2) as results:
        by_step = {(r.loop_idx, r.step_name): r async for r in results}
    crash = by_step[(0, "s1")].exception
    assert isinstance(crash, WorkerCrashedError)
    assert crash.signal == signal.SIGKILL
    assert "step 's1' of loop 0" in str(crash)
    assert "SIGKILL" in str(crash)
    assert (0, "s2") not in by_step  # skipped to s3
    fresh = by_step[(1, "s1")].output
    assert fresh != crash.pid
    assert by_step[(1, "s2")].output == fresh


class Unskipped(Crasher):
    skip_loop_error = ()


async def test_killed_worker_is_a_clear_error_when_not_skipped(tmp_path):
    loop = Unskipped(settings_for(tmp_path, subproc_step=True), tmp_path)
    with pytest.raises(WorkerCrashedError, match=r"step 's1' of loop 0 .* killed by SIGKILL"):
        await loop.run(loop_n=2)


class Blocker(Spawner):
    """Loop 1 fails in an async step while loop 0 is blocked in a process step."""

    async def s0(self, prev_out):
        if prev_out[self.LOOP_IDX_KEY] == 1:
            await await_file(self.folder / "pids-0")
            raise CustomError("elsewhere", 1)
        return 0


async def test_error_elsewhere_kills_in_flight_process_steps(tmp_path):
    loop = Blocker(settings_for(tmp_path, step_semaphore=2), tmp_path)
    # the run failing long before the blocked step would end (LONG): it did not wait for it
    with anyio.fail_after(HANG), pytest.raises(CustomError):
        await loop.run(loop_n=2)
    assert not await await_gone(await anyio.to_thread.run_sync(started_pids, tmp_path))


async def test_consumer_leaving_kills_in_flight_process_steps(tmp_path):
    loop = Spawner(settings_for(tmp_path, step_semaphore=2), tmp_path)
    async with loop.run(loop_n=2) as results:
        async for _ in results:
            await await_file(tmp_path / "pids-0")
            break
    assert not await await_gone(await anyio.to_thread.run_sync(started_pids, tmp_path))


# a process that leaves its parent: it forks, the first process exits, and the second, now
# an orphan that is nobody's descendant, writes its pid (once it has been re-parented) and
# becomes a long ``sleep``; it stays in the process group it was started in
DETACHED = textwrap.dedent(
    """
    import os, sys, time
    parent = os.getpid()
    if os.fork():
        os._exit(0)
    while os.getppid() == parent:
        time.sleep(0.01)
    path = sys.argv[1]
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    os.execvp("sleep", ["sleep", sys.argv[2]])
    """
)


class Detacher(LoopBase):
    """``s1`` starts a process that double-forks away from the worker, then blocks."""

    def __init__(self, settings, folder: Path):
        super().__init__(settings)
        self.folder = folder

    def s0(self, prev_out):
        return 0

    def s1(self, prev_out):
        li = prev_out[self.LOOP_IDX_KEY]
        orphan = self.folder / f"orphan-{li}"
        subprocess.run([sys.executable, "-c", DETACHED, str(orphan), str(LONG)], check=True)
        pid = int(wait_for_file(orphan))
        assert pid not in {p.pid for p in my_children()}  # not the worker's descendant
        (self.folder / f"pids-{li}").write_text(f"{os.getpid()} {pid}")
        time.sleep(LONG)

    def s2(self, prev_out):
        return 2


@pytest.mark.parametrize("how", ["deadline", "consumer-leaves"])
async def test_cancelled_step_kills_processes_that_left_the_worker(tmp_path, how):
    """A process a step started and that double-forked away from the worker is no longer its
    descendant, but still in its process group: killing the group kills it too."""
    loop = Detacher(settings_for(tmp_path, subproc_step=True), tmp_path)
    written = tmp_path / "pids-0"
    try:
        with anyio.fail_after(HANG):
            if how == "deadline":
                summary = await run_until_written(loop, [written], loop_n=1)
                assert summary.reason == "all_duration"
            else:
                async with loop.run(loop_n=1) as results:
                    async for _ in results:
                        await await_file(written)
                        break
        worker, orphan = map(int, (await await_file(written)).split())
        assert not await await_gone([worker, orphan])
        assert loop.step_idx[0] == 1  # the cancelled step is not done
    finally:
        await anyio.to_thread.run_sync(kill_written, tmp_path / "orphan-0")  # after a failure


def kill_written(pid_file: Path) -> None:
    """SIGKILL the process whose pid ``pid_file`` holds, if it still runs."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


INTERRUPTED_APP = textwrap.dedent(
    """
    import signal
    import sys
    from pathlib import Path

    import anyio
    from test_exec_process import Spawner
    from executor_helpers import settings_for

    if __name__ == "__main__":
        # a shell that started us in the background may have set SIGINT to "ignore"
        signal.signal(signal.SIGINT, signal.default_int_handler)
        backend, folder = sys.argv[1], Path(sys.argv[2])
        loop = Spawner(settings_for(folder, step_semaphore=2, save_snapshots=False), folder)
        try:
            anyio.run(lambda: loop.run(loop_n=2), backend=backend)
        except KeyboardInterrupt:
            sys.exit(130)
    """
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_keyboard_interrupt_kills_in_flight_process_steps(tmp_path, backend):
    script = tmp_path / "app.py"
    script.write_text(INTERRUPTED_APP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    app = subprocess.Popen([sys.executable, str(script), backend, str(tmp_path)], env=env)
    try:
        wait_for_file(tmp_path / "pids-0")
        wait_for_file(tmp_path / "pids-1")
        app.send_signal(signal.SIGINT)
        assert app.wait(timeout=HANG) == 130
    finally:
        app.kill()
        app.wait()
    assert not wait_gone(started_pids(tmp_path))
    assert not my_children()
