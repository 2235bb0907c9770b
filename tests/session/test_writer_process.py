"""The snapshot writer process: order, answers, failures, and a life tied to its parent's."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from session_loops import Chain

from rdagent_loop import LoopSettings, SnapshotError, list_snapshots
from rdagent_loop._session import Durability, SnapshotWriter, make_job
from rdagent_loop._session._atomic import FileOp
from rdagent_loop._session._reader import read_snapshot
from rdagent_loop._session._writer_process import PIPE_SIZE, WriterProcess, available

pytestmark = pytest.mark.skipif(not available(), reason="the writer process needs Linux")


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


@pytest.fixture
def process() -> Any:
    writer = WriterProcess()
    yield writer
    if not writer.closed:
        writer.close()


def test_files_are_written_in_the_order_sent_and_answered_in_that_order(
    tmp_path: Path, process: WriterProcess
) -> None:
    done: list[int] = []
    big = os.urandom(3 * PIPE_SIZE)  # more than the pipe holds: sent in several goes
    ops = [
        FileOp(str(tmp_path / "a" / f"{n}_s"), b"%d" % n, "flush", make_dir=True) for n in range(50)
    ]
    ops.insert(10, FileOp(str(tmp_path / "big"), big, "fsync"))
    for n, op in enumerate(ops):
        op.done = lambda n=n: done.append(n)  # type: ignore[misc]
    rest = process.send_now(process.encode(ops))
    assert rest  # the pipe took part of it; the rest waits for room
    process.send_all(rest)
    process.send_all(process.encode([FileOp(str(tmp_path / "a"), None, "fsync")]))
    process.wait_answered()
    assert process.error is None
    assert done == list(range(51))
    assert (tmp_path / "big").read_bytes() == big
    assert [(tmp_path / "a" / f"{n}_s").read_bytes() for n in range(50)] == [
        b"%d" % n for n in range(50)
    ]
    assert process.bytes_written == len(big) + sum(len(b"%d" % n) for n in range(50))
    assert process.busy_ns > 0
    process.close()
    assert process.proc.returncode == 0
    assert not list(tmp_path.rglob(".tmp-*"))


def test_a_long_send_takes_the_answers_as_it_goes(tmp_path: Path, process: WriterProcess) -> None:
    # 60,000 answers are more than the answer pipe holds: a sender that only waited for
    # room to send would wait for ever on a process waiting for room to answer (the first
    # write fails, so the others are answered at once, without touching the disk)
    (tmp_path / "file").write_text("not a folder")
    ops = [FileOp(str(tmp_path / "file" / "x"), b"", "flush")]
    ops += [FileOp(str(tmp_path / f"{n}"), b"", "flush") for n in range(60_000)]
    done = threading.Event()

    def send() -> None:
        process.send_all(process.encode(ops))
        done.set()

    threading.Thread(target=send, daemon=True).start()
    assert done.wait(60), "the writer process and its parent wait for each other"
    process.wait_answered()
    assert isinstance(process.error, NotADirectoryError)
    assert process.unanswered == 0
    assert not (tmp_path / "0").exists()


def test_a_failure_is_reported_with_its_errno_and_path_and_nothing_after_it_is_done(
    tmp_path: Path, process: WriterProcess
) -> None:
    (tmp_path / "blocker").write_text("a file, not a folder")
    done: list[str] = []
    ops = [
        FileOp(str(tmp_path / "first"), b"1", "flush", done=lambda: done.append("first")),
        FileOp(str(tmp_path / "blocker" / "x"), b"2", "flush", done=lambda: done.append("x")),
        FileOp(str(tmp_path / "after"), b"3", "flush", done=lambda: done.append("after")),
    ]
    process.send_all(process.encode(ops))
    process.wait_answered()
    error = process.error
    assert isinstance(error, NotADirectoryError)
    assert error.errno == errno.ENOTDIR
    assert str(tmp_path / "blocker") in str(error.filename)
    if sys.version_info >= (3, 11):
        assert error.__notes__ == [
            f"while writing {tmp_path / 'blocker' / 'x'} (in the snapshot writer process)"
        ]
    assert done == ["first"]
    assert not (tmp_path / "after").exists()


def test_ctrl_c_at_the_terminal_is_left_to_the_parent(process: WriterProcess) -> None:
    # a terminal sends SIGINT to its foreground process group; the run then stops and
    # waits for its writer, which must not have died of the same Ctrl-C
    assert os.getsid(process.pid) == process.pid
    assert os.getpgid(process.pid) != os.getpgrp()


def test_the_writer_process_dies_with_its_parent_even_by_sigkill(tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import sys, time
                from rdagent_loop._session._writer_process import WriterProcess
                print(WriterProcess().pid, flush=True)
                time.sleep(60)
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


# -- inside a run ---------------------------------------------------------------------------


def writer_processes() -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process().children()
        if any(arg.endswith("_disk_worker.py") for arg in child.cmdline())
    ]


def kill_writer_process() -> None:
    deadline = time.monotonic() + 10
    while not (found := writer_processes()):  # the writer thread starts it: soon, not now
        assert time.monotonic() < deadline, "no snapshot writer process"
        time.sleep(0.01)
    for child in found:
        child.kill()
        assert gone(child.pid)  # not waited for: that is the run's to do


class KillsItsWriter(Chain):
    """``s1`` of loop 0 kills the run's snapshot writer process."""

    async def s1(self, prev_out: dict[str, Any]) -> str:
        if prev_out[self.LOOP_IDX_KEY] == 0:
            await anyio.to_thread.run_sync(kill_writer_process)  # off the event loop
        return await super().s1(prev_out)


@pytest.mark.anyio
async def test_a_writer_process_killed_under_a_run_fails_it_with_a_clear_error(
    settings: LoopSettings,
) -> None:
    loop = KillsItsWriter(settings)
    with pytest.raises(SnapshotError, match=r"writer process \(pid \d+\) was killed by signal 9"):
        await loop.run(loop_n=2)
    assert all(info.valid for info in list_snapshots(loop.session_folder))
    assert not writer_processes()


class State:
    """A stand-in for a loop object: what ``make_job`` needs."""

    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)


@pytest.mark.anyio
async def test_what_the_pipe_cannot_take_goes_on_through_the_thread_and_keeps_its_place(
    tmp_path: Path,
) -> None:
    def job(name: str, **attributes: Any) -> Any:
        return make_job(
            State(**attributes),
            tmp_path / name,
            durability="flush",
            key=None,
            index=None,
            outputs=[],
        )

    big = [os.urandom(60_000) for _ in range(40)]  # 2.4 MB, in segments too small to chunk
    async with SnapshotWriter(mode="process") as writer:
        before = writer._submitted  # what the thread was given to start the process
        pid = writer.statistics().process_id
        assert pid is not None
        # the process stops reading, so the pipe cannot take the big job, however fast
        # the machine is: its rest must wait in the thread
        os.kill(pid, signal.SIGSTOP)
        try:
            assert writer.submit(job("0_big", **{f"a{n}": b for n, b in enumerate(big)}))
            for n in range(1, 20):
                assert writer.submit(job(f"{n}_small", n=n))
            # the rest of the big one went to the thread, and every job after it: sent from
            # here, a small job would have cut into the big one's frame in the pipe
            assert writer._submitted - before == 20
        finally:
            os.kill(pid, signal.SIGCONT)
    statistics = writer.statistics()
    assert statistics.process_id is not None
    assert statistics.jobs_done == 20
    assert statistics.jobs_pending == statistics.bytes_pending == 0
    assert read_snapshot(tmp_path / "0_big", None).state_size > 2_400_000
    for n in range(1, 20):
        assert read_snapshot(tmp_path / f"{n}_small", None).state_size > 0
    assert gone(statistics.process_id, timeout=0.1)


# -- choosing the writer --------------------------------------------------------------------


@pytest.mark.anyio
async def test_auto_falls_back_to_the_thread_where_there_is_no_writer_process(
    settings: LoopSettings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "executable", str(settings.trace_path / "python-missing"))
    caplog.set_level(logging.INFO, "rdagent_loop")
    loop = Chain(settings)
    await loop.run(loop_n=1)
    assert Chain.load(loop.session_folder).step_idx[0] == 4
    assert "no snapshot writer process" in caplog.text
    caplog.clear()
    for name, value in [("platform", "darwin"), ("frozen", True), ("executable", "/usr/bin/uwsgi")]:
        with monkeypatch.context() as patch:  # no writer process here: the thread, untried
            patch.setattr(sys, name, value, raising=False)
            assert not available()
            await loop.run(loop_n=1)
    assert "no snapshot writer process" not in caplog.text
    assert Chain.load(loop.session_folder).step_idx[3] == 4


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
async def test_after_a_failed_write_chunks_of_dropped_snapshots_are_written_again(
    tmp_path: Path, mode: str
) -> None:
    from rdagent_loop._session import ChunkIndex

    session = tmp_path / "__session__"
    (session / "0").mkdir(parents=True)
    (session / "1").write_text("a file where loop 1's folder would go")
    index = ChunkIndex(session / ".chunks")
    state = State(big=os.urandom(300_000))  # cut into chunks, kept in the store

    def job(path: Path) -> Any:
        return make_job(state, path, durability="flush", key=None, index=index, outputs=[])

    async with SnapshotWriter(mode=mode) as writer:  # type: ignore[arg-type]
        assert writer.submit(job(session / "1" / "0_s0"))  # fails
        assert writer.submit(job(session / "0" / "0_s0"))  # dropped, its chunks with it
        with pytest.raises(NotADirectoryError):
            await writer.drain()
        late = job(session / "0" / "1_s1")
        assert not writer.submit(late)  # the caller writes it itself
        late.run()
    snapshot = read_snapshot(session / "0" / "1_s1", None)
    snapshot.check_chunks(deep=True)  # every chunk it names is there, whole
    assert not (session / "0" / "0_s0").exists()


@pytest.mark.anyio
async def test_jobs_built_here_while_the_thread_builds_one_are_answered_in_order(
    tmp_path: Path,
) -> None:
    import hashlib

    from rdagent_loop._session import ChunkIndex, OutputsBlob

    session = tmp_path / "__session__"
    index = ChunkIndex(session / ".chunks")
    written: list[int] = []

    def job(n: int, **attributes: Any) -> Any:
        data = b"outputs of loop %d" % n
        blob = OutputsBlob(
            session, n, hashlib.sha256(data).hexdigest(), data, lambda: written.append(n)
        )
        path = session / str(n) / "3_record"
        state = State(**attributes)
        return make_job(state, path, durability="flush", key=None, index=index, outputs=[blob])

    async with SnapshotWriter(mode="process") as writer:
        assert writer.submit(job(0, big=os.urandom(300_000)))  # chunked: the thread builds it
        for n in range(1, 30):
            assert writer.submit(job(n, value=n))  # built here, sent behind it
    assert written == list(range(30))  # each file's done, in the order the files were sent
    assert writer.statistics().jobs_done == 30
    for n in range(30):
        read_snapshot(session / str(n) / "3_record", None).check_chunks(deep=True)


# -- waiting, without blocking the event loop -----------------------------------------------


def small_job(path: Path, size: int = 1000, durability: Durability = "flush") -> Any:
    state = State(data=os.urandom(size))
    return make_job(state, path, durability=durability, key=None, index=None, outputs=[])


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
        assert writer.submit(small_job(tmp_path / "0_big", 3 * PIPE_SIZE))  # partly on the thread
        for n in range(1, 20):
            assert writer.submit(small_job(tmp_path / f"{n}_s"))
        await writer.drain()
        statistics = writer.statistics()
        assert statistics.jobs_done == 20
        assert statistics.jobs_pending == statistics.bytes_pending == 0
        for n in range(1, 20):
            assert read_snapshot(tmp_path / f"{n}_s", None).state_size > 0
        assert read_snapshot(tmp_path / "0_big", None).state_size > 3 * PIPE_SIZE
