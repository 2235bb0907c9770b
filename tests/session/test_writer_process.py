"""The snapshot writer and its process: order, answers, failures, a full pipe, and a life tied
to its parent's."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import psutil
import pytest
from session_loops import Chain

from rdagent_loop import LoopSettings, SnapshotError, StepResult, list_snapshots
from rdagent_loop._current import run_of
from rdagent_loop._session import Durability, SnapshotJob, SnapshotWriter, make_job
from rdagent_loop._session._atomic import FileOp
from rdagent_loop._session._reader import read_snapshot
from rdagent_loop._session._writer import SEND_SLICE, process_available

pytestmark = pytest.mark.skipif(not process_available(), reason="no writer process here")

PIPE = 64 * 1024  # what a pipe holds on Linux (by default)


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` has exited (a zombie counts) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def found(folder: Path, pattern: str) -> list[Path]:
    return list(folder.glob(pattern))


def writer_processes() -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process().children()
        if any(arg.endswith("_disk_worker.py") for arg in child.cmdline())
    ]


class State:
    """A stand-in for a loop object: what ``make_job`` needs."""

    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_saved"}


def job(path: Path, durability: Durability = "flush", **attributes: Any) -> SnapshotJob:
    return make_job(State(**attributes), path, durability=durability, key=None)


def small_job(path: Path, size: int = 1000, durability: Durability = "flush") -> SnapshotJob:
    return job(path, durability, data=os.urandom(size))


def noting(done: list[Any], value: Any) -> Callable[[], None]:
    return lambda: done.append(value)


def loaded(path: Path) -> Any:
    return read_snapshot(path, None).verify().build(State)


# -- order and answers -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["process", "thread"])
async def test_files_are_written_in_the_order_submitted_and_reported_in_that_order(
    tmp_path: Path, mode: str
) -> None:
    big = os.urandom(3 * SEND_SLICE)  # more than the pipe holds, and sent in slices
    done: list[int] = []
    paths = [tmp_path / "a" / f"{n}_s" for n in range(50)]
    async with SnapshotWriter(mode=mode) as writer:  # type: ignore[arg-type]
        for n, path in enumerate(paths):
            assert writer.submit(job(path, big=big) if n == 10 else job(path, n=n))
            writer.then(noting(done, n))
        await writer.drain()
        assert done == list(range(50))
        process = writer._process
    assert (process is not None) == (mode == "process")
    if process is not None:
        assert process.returncode == 0  # told that nothing more comes; not killed
    written = [p.stat().st_mtime_ns for p in paths]
    assert written == sorted(written)
    assert loaded(paths[10]).big == big
    assert [loaded(p).n for n, p in enumerate(paths) if n != 10] == [
        n for n in range(50) if n != 10
    ]
    statistics = writer.statistics()
    assert statistics.jobs_done == 50
    assert statistics.bytes_written == sum(p.stat().st_size for p in paths)
    assert not found(tmp_path, "**/.tmp-*")


@pytest.mark.anyio
async def test_answers_are_taken_while_a_long_send_goes_on(tmp_path: Path) -> None:
    # one job of 40,000 files: their answers are more than the answer pipe holds, so a writer
    # that took answers only once it had sent everything would wait for ever on a process
    # waiting for room to answer (the first file fails, so the others are answered at once,
    # without touching the disk)
    (tmp_path / "blocker").write_text("a file, not a folder")
    (tmp_path / "files").mkdir()
    ops = [FileOp(str(tmp_path / "blocker" / "x"), b"", "flush")]
    ops += [FileOp(str(tmp_path / "files" / f"{n}"), b"", "flush") for n in range(40_000)]
    many = job(tmp_path / "0_s", n=0)
    many.operations = lambda done=None: [*ops, *SnapshotJob.operations(many, done)]  # type: ignore[method-assign]
    with anyio.fail_after(100):  # a deadlock's guard only: it takes a fraction of a second
        async with SnapshotWriter(mode="process") as writer:
            assert writer.submit(many)
            with pytest.raises(NotADirectoryError):
                await writer.drain()
    assert not writer._answers  # every file was answered
    assert not found(tmp_path / "files", "*") and not found(tmp_path, "0_s")


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["process", "thread"])
async def test_a_failure_is_reported_with_its_errno_and_path_and_nothing_after_it_is_done(
    tmp_path: Path, mode: str
) -> None:
    (tmp_path / "blocker").write_text("a file, not a folder")
    done: list[str] = []
    async with SnapshotWriter(mode=mode) as writer:  # type: ignore[arg-type]
        for name in ("first", "blocker/x", "after"):
            assert writer.submit(job(tmp_path / name))
            writer.then(noting(done, name))
        with pytest.raises(NotADirectoryError) as caught:
            await writer.drain()
        assert writer.submit(job(tmp_path / "later"))  # dropped: the run is failing
    error = caught.value
    assert error.errno == errno.ENOTDIR
    assert str(tmp_path / "blocker") in str(error.filename)
    if sys.version_info >= (3, 11):
        where = tmp_path / "blocker" / "x"
        expected = (
            f"while writing {where} (in the snapshot writer process)"
            if mode == "process"
            else f"while writing the snapshot {where}"
        )
        assert error.__notes__ == [expected]
    assert done == ["first"]
    assert not (tmp_path / "after").exists() and not (tmp_path / "later").exists()


@pytest.mark.anyio
async def test_jobs_built_in_a_worker_thread_keep_their_place_in_the_order(
    tmp_path: Path,
) -> None:
    session = tmp_path / "__session__"
    state = State(many=[os.urandom(100) for _ in range(3_000)])  # chunks: built in a thread
    done: list[int] = []
    async with SnapshotWriter(mode="process") as writer:
        first = make_job(state, session / "0" / "0_s", durability="flush", key=None)
        assert first.chunked
        assert writer.submit(first)
        writer.then(noting(done, 0))
        for n in range(1, 30):  # built on the event loop's thread, while the first is built
            small = job(session / str(n) / "0_s", n=n)
            assert not small.chunked
            assert writer.submit(small)
            writer.then(noting(done, n))
    assert done == list(range(30))
    assert writer.statistics().jobs_done == 30
    written = [(session / str(n) / "0_s").stat().st_mtime_ns for n in range(30)]
    assert written == sorted(written)
    assert loaded(session / "0" / "0_s").many == state.many
    assert [loaded(session / str(n) / "0_s").n for n in range(1, 30)] == list(range(1, 30))


# -- the process's life -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_ctrl_c_at_the_terminal_is_left_to_the_parent() -> None:
    # a terminal sends SIGINT to its foreground process group; the run then stops and
    # waits for its writer, which must not have died of the same Ctrl-C
    async with SnapshotWriter(mode="process") as writer:
        pid = writer.statistics().process_id
        assert pid is not None
        assert os.getsid(pid) == pid
        assert os.getpgid(pid) != os.getpgrp()


def test_the_writer_process_dies_with_its_parent_even_by_sigkill() -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import anyio
                from rdagent_loop._session import SnapshotWriter

                async def main():
                    async with SnapshotWriter(mode="process") as writer:
                        print(writer.statistics().process_id, flush=True)
                        await anyio.sleep(60)

                anyio.run(main)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    with parent:
        assert parent.stdout is not None
        writer = int(parent.stdout.readline())
        assert psutil.Process(writer).ppid() == parent.pid
        parent.kill()
    assert gone(writer)


class KillsItsWriter(Chain):
    """Once the consumer has received loop 0's results and loop 1's first, ``s1`` of loop 1
    stops the run's writer process (nothing is written from then on), and ``s3`` of loop 1
    kills it."""

    received: ClassVar[list[StepResult]] = []  # outside the loop's state

    def _writer(self) -> int:
        run = run_of(self)
        assert run is not None
        pid = run.writer.statistics().process_id
        assert pid is not None
        return pid

    async def s1(self, prev_out: dict[str, Any]) -> str:
        if prev_out[self.LOOP_IDX_KEY] == 1:
            while len(self.received) < 5:
                await anyio.sleep(0.001)
            os.kill(self._writer(), signal.SIGSTOP)
        return await super().s1(prev_out)

    async def s3(self, prev_out: dict[str, Any]) -> str:
        if prev_out[self.LOOP_IDX_KEY] == 1:
            pid = self._writer()
            os.kill(pid, signal.SIGKILL)
            assert await anyio.to_thread.run_sync(gone, pid)  # not waited for: the run's to do
        return await super().s3(prev_out)


@pytest.mark.anyio
async def test_a_writer_process_killed_under_a_run_fails_it_and_what_was_delivered_is_on_disk(
    settings: LoopSettings,
) -> None:
    KillsItsWriter.received = received = []
    loop = KillsItsWriter(settings.model_copy(update={"snapshot_writer": "process"}))
    with pytest.raises(SnapshotError, match=r"writer process \(pid \d+\) was killed by signal 9"):
        async with loop.run(loop_n=3) as results:
            async for result in results:
                received.append(result)
    # the results of loop 1's steps 1 and 2 were never delivered: their files were not written
    steps = [(0, "s0"), (0, "s1"), (0, "s2"), (0, "s3"), (1, "s0")]
    assert [(r.loop_idx, r.step_name) for r in received] == steps
    for result in received:
        path = loop.session_folder / str(result.loop_idx) / f"{result.step_idx}_{result.step_name}"
        assert Chain.load(path).step_idx[result.loop_idx] == result.step_idx + 1
    assert not (loop.session_folder / "1" / "1_s1").exists()
    assert all(info.valid for info in list_snapshots(loop.session_folder))
    assert not writer_processes()


@pytest.mark.anyio
async def test_a_writer_process_killed_with_files_in_flight_fails_them_all_and_reports_none(
    tmp_path: Path,
) -> None:
    done: list[int] = []
    async with SnapshotWriter(mode="process") as writer:
        pid = writer.statistics().process_id
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # it takes nothing from the pipe from now on
        try:
            for n in range(5):
                assert writer.submit(small_job(tmp_path / f"{n}_s"))
                writer.then(noting(done, n))
            await anyio.sleep(0.01)  # they are sent (into the pipe)
        finally:
            os.kill(pid, signal.SIGKILL)
        with (
            anyio.fail_after(100),
            pytest.raises(  # the guard: its answers never come
                SnapshotError, match=r"was killed by signal 9; \d+ snapshot files"
            ),
        ):
            await writer.drain()
        assert writer.submit(small_job(tmp_path / "later"))  # dropped, never written
    assert done == []
    assert not found(tmp_path, "*_s")
    assert writer.statistics().jobs_done == 0


# -- a full pipe --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_while_the_pipe_is_full_submit_never_waits_and_the_event_loop_runs(
    tmp_path: Path,
) -> None:
    big = [os.urandom(60_000) for _ in range(40)]  # 2.4 MB, in segments too small to chunk
    done: list[int] = []
    async with SnapshotWriter(mode="process", max_pending=1_000_000) as writer:
        pid = writer.statistics().process_id
        assert pid is not None
        # the process stops reading, so the pipe cannot take the big job, however fast the
        # machine is: the writer's task waits for room, and nothing else does
        os.kill(pid, signal.SIGSTOP)
        watchdog = threading.Timer(60, os.kill, (pid, signal.SIGCONT))  # never a hung test
        watchdog.start()
        try:
            assert writer.submit(job(tmp_path / "0_big", **{f"a{n}": b for n, b in enumerate(big)}))
            writer.then(noting(done, 0))
            for n in range(1, 20):
                assert writer.submit(job(tmp_path / f"{n}_small", n=n))
                writer.then(noting(done, n))
            found_room: list[int] = []

            async def wait_room() -> None:
                await writer.wait_room()
                found_room.append(writer.statistics().bytes_pending)

            ticks = 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_room)
                for _ in range(5):
                    await anyio.sleep(0.01)  # the event loop runs while the send waits
                    ticks += 1
                assert ticks == 5 and found_room == [] and done == []
                statistics = writer.statistics()
                assert statistics.jobs_done == 0 and statistics.jobs_pending == 20
                assert statistics.bytes_pending > 2_400_000
                os.kill(pid, signal.SIGCONT)
            assert found_room[0] <= 1_000_000
            await writer.drain()
        finally:
            watchdog.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert done == list(range(20))
    statistics = writer.statistics()
    assert statistics.jobs_done == 20
    assert statistics.jobs_pending == statistics.bytes_pending == 0
    assert loaded(tmp_path / "0_big").a39 == big[39]
    assert [loaded(tmp_path / f"{n}_small").n for n in range(1, 20)] == list(range(1, 20))
    assert gone(pid, timeout=0.1)


# -- choosing the writer --------------------------------------------------------------------


class NotesItsWriter(Chain):
    """Notes, in ``s0``, the pid of the run's writer process (None: the thread writes)."""

    pids: ClassVar[list[int | None]] = []  # outside the loop's state

    async def s0(self, prev_out: dict[str, Any]) -> str:
        run = run_of(self)
        assert run is not None
        self.pids.append(run.writer.statistics().process_id)
        return await super().s0(prev_out)


@pytest.mark.anyio
async def test_auto_falls_back_to_the_thread_where_there_is_no_writer_process(
    settings: LoopSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    NotesItsWriter.pids = []
    loop = NotesItsWriter(settings.model_copy(update={"snapshot_writer": "auto"}))
    await loop.run(loop_n=1)
    assert NotesItsWriter.pids[-1] is not None  # here, the process
    with monkeypatch.context() as patch:  # it cannot start: the thread
        patch.setattr(sys, "executable", str(settings.trace_path / "python-missing"))
        await loop.run(loop_n=1)
    assert NotesItsWriter.pids[-1] is None
    for name, value in [("frozen", True), ("executable", "/usr/bin/uwsgi")]:
        with monkeypatch.context() as patch:  # no writer process here: the thread, untried
            patch.setattr(sys, name, value, raising=False)
            assert not process_available()
            await loop.run(loop_n=1)
        assert NotesItsWriter.pids[-1] is None
    resumed = Chain.load(loop.session_folder)
    assert [resumed.step_idx[li] for li in range(4)] == [4, 4, 4, 4]
    assert all(info.valid for info in list_snapshots(loop.session_folder))


@pytest.mark.anyio
async def test_asking_for_the_process_where_it_cannot_start_is_an_error(
    settings: LoopSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = settings.trace_path / "no-such-python"
    monkeypatch.setattr(sys, "executable", str(missing))
    loop = Chain(settings.model_copy(update={"snapshot_writer": "process"}))
    with pytest.raises(FileNotFoundError, match="no-such-python"):
        await loop.run(loop_n=1)


def test_an_unknown_writer_is_refused_naming_the_field_and_the_value() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"snapshot_writer[\s\S]*'processes'"):
        LoopSettings(snapshot_writer="processes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'processes'"):
        SnapshotWriter(mode="processes")  # type: ignore[arg-type]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["process", "thread"])
async def test_after_a_failed_write_what_dropped_snapshots_stored_is_written_again(
    tmp_path: Path, mode: str
) -> None:
    session = tmp_path / "__session__"
    (session / "0").mkdir(parents=True)
    (session / "1").write_text("a file where loop 1's folder would go")
    # a blob, and an attribute cut into chunks: both kept in the store
    state = State(big=os.urandom(300_000), many=[os.urandom(100) for _ in range(3_000)])

    def job(path: Path) -> SnapshotJob:
        return make_job(state, path, durability="flush", key=None)

    async with SnapshotWriter(mode=mode) as writer:  # type: ignore[arg-type]
        assert writer.submit(job(session / "1" / "0_s0"))  # fails
        state.more = os.urandom(300_000)  # a new blob
        state.many.append(os.urandom(100))  # new chunks
        assert writer.submit(job(session / "0" / "0_s0"))  # dropped, and what it stored
        with pytest.raises(NotADirectoryError):
            await writer.drain()
        assert writer.submit(job(session / "0" / "2_s2"))  # dropped: the run is failing
        late = job(session / "0" / "1_s1")  # a new capture: it knows the store may lack things
        late.run()
    assert not (session / "0" / "0_s0").exists()
    assert not (session / "0" / "2_s2").exists()
    restored = loaded(session / "0" / "1_s1")  # everything it points at is there, whole
    assert (restored.big, restored.more, restored.many) == (state.big, state.more, state.many)


# -- waiting, without blocking the event loop -----------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["process", "thread"])
async def test_with_nothing_to_wait_for_wait_room_and_drain_return_without_a_checkpoint(
    tmp_path: Path, mode: str
) -> None:
    async with SnapshotWriter(mode=mode) as writer:  # type: ignore[arg-type]
        assert writer.submit(small_job(tmp_path / "0_s"))
        await writer.drain()
        assert (tmp_path / "0_s").exists()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await writer.wait_room()  # called at every step: it must cost next to nothing
            await writer.drain()
        assert not scope.cancelled_caught


@pytest.mark.anyio
async def test_submit_never_waits_and_wait_room_waits_with_the_event_loop_running(
    tmp_path: Path,
) -> None:
    gate = threading.Event()

    def stuck_fsync(fd: int) -> None:  # a disk that takes no write until the gate opens
        gate.wait(30)
        os.fsync(fd)

    try:
        async with SnapshotWriter(mode="thread", max_pending=50_000, fsync=stuck_fsync) as writer:
            for n in range(10):  # 200 KB behind a stuck disk: not one of them waits
                assert writer.submit(small_job(tmp_path / f"{n}_s", 20_000, "fsync"))
            assert writer.statistics().jobs_done == 0
            assert writer.statistics().bytes_pending > 50_000
            found_room: list[int] = []

            async def wait_room() -> None:
                await writer.wait_room()
                found_room.append(writer.statistics().bytes_pending)

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_room)
                for _ in range(5):
                    await anyio.sleep(0.01)  # the event loop runs while wait_room waits
                assert found_room == []
                gate.set()
            assert found_room[0] <= 50_000
            await writer.drain()
            assert writer.statistics().jobs_done == 10
            assert all((tmp_path / f"{n}_s").exists() for n in range(10))
    finally:
        gate.set()


@pytest.mark.anyio
async def test_drain_waits_until_the_writer_process_has_written_everything(
    tmp_path: Path,
) -> None:
    async with SnapshotWriter(mode="process") as writer:
        assert writer.submit(small_job(tmp_path / "0_big", 3 * SEND_SLICE))  # sent in slices
        for n in range(1, 20):
            assert writer.submit(small_job(tmp_path / f"{n}_s"))
        await writer.drain()
        statistics = writer.statistics()
        assert statistics.jobs_done == 20
        assert statistics.jobs_pending == statistics.bytes_pending == 0
        for n in range(1, 20):
            assert read_snapshot(tmp_path / f"{n}_s", None).state_size > 0
        assert read_snapshot(tmp_path / "0_big", None).state_size > 3 * SEND_SLICE
