"""One run per session (DESIGN.md §3 "Sessions", §5): a second run on a busy session, from this
process or another, gets ``SessionBusyError`` at its start and changes nothing; the kernel
frees the lock when its holder dies; a trace path that cannot hold a session is a
``ValueError`` naming it, before any step runs.

Nothing here depends on how fast the machine is: a run holds the lock while its step waits on
an ``anyio.Event`` (in this process) or for a file (in a child process), and the test waits
for what it needs to see (a file, a snapshot listed, a process gone), each bounded by
``HANG`` against a hang only.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psutil
import pytest
from anyio.abc import Process

from rdagent_loop import LoopBase, LoopError, LoopSettings, SessionBusyError, list_snapshots
from rdagent_loop._session._lock import SessionLock

HANG = 60.0  # seconds: a bound that only a hang reaches, never a slow machine
HERE = Path(__file__).resolve().parent


class Gate:
    """What a test and a gated step of this process share: not saved with the loop."""

    def __init__(self) -> None:
        self.started = anyio.Event()
        self.go = anyio.Event()


GATES: dict[str, Gate] = {}


class Gated(LoopBase):
    """s0 -> s1, each noting its run in ``executed``. Loop 0's s1 holds the run: it waits
    for ``GATES[gate]`` (in this process) or, in a child, writes ``<folder>/started`` and
    waits for ``<folder>/go``."""

    def __init__(
        self, settings: LoopSettings, gate: str | None = None, folder: Path | None = None
    ) -> None:
        super().__init__(settings)
        self.gate = gate
        self.folder = folder
        self.executed: list[tuple[int, str]] = []

    async def s0(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        self.executed.append((li, "s0"))
        return f"s0@{li}"

    async def s1(self, prev_out: dict[str, Any]) -> str:
        li = prev_out[self.LOOP_IDX_KEY]
        if li == 0 and self.gate is not None:
            GATES[self.gate].started.set()
            await GATES[self.gate].go.wait()
        if li == 0 and self.folder is not None:
            await anyio.to_thread.run_sync((self.folder / "started").write_text, str(os.getpid()))
            with anyio.fail_after(HANG):
                while not await anyio.to_thread.run_sync((self.folder / "go").exists):
                    await anyio.sleep(0.02)
        self.executed.append((li, "s1"))
        return f"s1@{li}"


class Fails(Gated):
    """Loop 0's s1 fails: a run that ends with an error."""

    async def s1(self, prev_out: dict[str, Any]) -> str:
        raise RuntimeError("s1 fails")


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


async def await_snapshots(trace: Path, count: int) -> None:
    """Wait until ``count`` snapshots of the session are on disk (the writer works behind)."""
    with anyio.fail_after(HANG):
        while len(await anyio.to_thread.run_sync(list_snapshots, trace)) < count:
            await anyio.sleep(0.02)


def busy_message(folder: Path, pid: int) -> str:
    return (
        f"session folder {folder} is in use by another run (pid {pid}); "
        "wait for it to end, or use another trace_path"
    )


# -- in this process ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_second_run_in_the_same_process_is_refused_and_writes_nothing(
    settings: LoopSettings,
) -> None:
    trace, session = settings.trace_path, settings.trace_path / "__session__"
    GATES["same"] = gate = Gate()
    first, second = Gated(settings, gate="same"), Gated(settings)
    summaries = []

    async def run_first() -> None:
        summaries.append(await first.run(loop_n=1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_first)
        with anyio.fail_after(HANG):
            await gate.started.wait()  # the first run holds the lock: its s1 is running
        await await_snapshots(trace, 1)  # its 0_s0 is on disk: nothing more comes until s1 ends
        before = tree_digest(session)

        with pytest.raises(SessionBusyError) as caught:
            await second.run(loop_n=1)
        error = caught.value
        assert isinstance(error, LoopError)
        assert (error.folder, error.pid) == (session, os.getpid())
        assert str(error) == busy_message(session, os.getpid())
        assert second.executed == []  # no step ran
        assert tree_digest(session) == before  # and nothing was written

        # no lock is needed to read a session while a run writes it
        assert [(s.loop_idx, s.step_name, s.valid) for s in list_snapshots(trace)] == [
            (0, "s0", True)
        ]
        loaded = Gated.load(trace)
        assert (loaded.step_idx[0], loaded.executed) == (1, [(0, "s0")])
        gate.go.set()

    assert summaries[0].steps == 2
    assert first.executed == [(0, "s0"), (0, "s1")]


@pytest.mark.anyio
async def test_a_session_is_free_again_once_its_run_has_ended(settings: LoopSettings) -> None:
    first = Gated(settings)
    await first.run(loop_n=1)
    resumed = Gated.load(settings.trace_path)
    summary = await resumed.run(loop_n=1)  # not refused: the first run let go of the lock
    assert (summary.loops, summary.steps) == (1, 2)
    assert resumed.executed == [(0, "s0"), (0, "s1"), (1, "s0"), (1, "s1")]
    elsewhere = settings.model_copy(update={"trace_path": settings.trace_path / "f"})
    with pytest.raises(RuntimeError, match="s1 fails"):
        await Fails(elsewhere).run(loop_n=1)
    assert (await Gated(elsewhere).run(loop_n=1)).steps == 2  # a run that failed let go too


def test_a_lock_is_refused_to_a_second_holder_in_the_same_process(tmp_path: Path) -> None:
    session = tmp_path / "trace" / "__session__"
    first, second = SessionLock(session), SessionLock(session)
    first.acquire()
    assert first.fd is not None
    assert (session / ".lock" / "pid").read_text() == str(os.getpid())
    with pytest.raises(SessionBusyError, match=f"pid {os.getpid()}"):
        second.acquire()
    assert second.fd is None
    first.release()
    first.release()  # idempotent
    second.acquire()
    second.release()


# -- from another process --------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import anyio
    from test_session_lock import Gated

    from rdagent_loop import LoopSettings

    backend, folder = sys.argv[1], Path(sys.argv[2])
    settings = LoopSettings(trace_path=folder / "trace", progress=False, durability="flush")
    anyio.run(Gated(settings, folder=folder).run, None, 1, backend=backend)
    """
)


def child_env() -> dict[str, str]:
    path = [str(HERE), str(HERE.parent), *sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


async def await_started(child: Process, folder: Path, log: Path) -> None:
    """Wait until the child's s1 has written ``started``: its run holds the session."""
    with anyio.fail_after(HANG):
        while not await anyio.to_thread.run_sync((folder / "started").exists):
            if child.returncode is not None:
                text = await anyio.to_thread.run_sync(log.read_text)
                raise AssertionError(f"the child ended early:\n{text}")
            await anyio.sleep(0.02)


def all_gone(pids: list[int]) -> bool:
    """None of ``pids`` runs (a zombie waiting to be reaped has closed its files)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.mark.anyio
async def test_a_run_in_another_process_holds_the_session_until_the_kernel_frees_it(
    tmp_path: Path, settings: LoopSettings, anyio_backend_name: str
) -> None:
    trace, session = settings.trace_path, settings.trace_path / "__session__"
    log = tmp_path / "child.log"
    with log.open("wb") as out:
        child = await anyio.open_process(
            [sys.executable, "-c", CHILD, anyio_backend_name, str(tmp_path)],
            env=child_env(),
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    try:
        await await_started(child, tmp_path, log)
        await await_snapshots(trace, 1)
        before = tree_digest(session)
        second = Gated(settings)
        with pytest.raises(SessionBusyError) as caught:
            await second.run(loop_n=1)
        assert (caught.value.folder, caught.value.pid) == (session, child.pid)
        assert str(caught.value) == busy_message(session, child.pid)
        assert second.executed == []
        assert tree_digest(session) == before
        assert [s.step_name for s in list_snapshots(trace)] == ["s0"]  # read while it runs
        assert Gated.load(trace).step_idx[0] == 1

        descendants = [p.pid for p in psutil.Process(child.pid).children(recursive=True)]
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    finally:
        if child.returncode is None:
            child.kill()
        with anyio.CancelScope(shield=True):
            await child.wait()
    assert child.returncode == -signal.SIGKILL
    # its helpers (the snapshot writer process) die with it; only then is all of it gone
    with anyio.fail_after(HANG):
        while not await anyio.to_thread.run_sync(all_gone, descendants):
            await anyio.sleep(0.02)

    # no stale lock: the kernel freed it with its holder; the session resumes
    await anyio.to_thread.run_sync((tmp_path / "go").write_text, "")
    resumed = Gated.load(trace)
    summary = await resumed.run()
    assert summary.steps == 1
    assert resumed.executed == [(0, "s0"), (0, "s1")]


# -- a trace path that cannot hold a session ---------------------------------------------------


def _a_file(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "file").write_text("mine")
    return tmp_path / "file", tmp_path / "file"


def _under_a_file(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "file").write_text("mine")
    return tmp_path / "file" / "trace", tmp_path / "file"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("where", "reason"),
    [
        pytest.param(_a_file, "it is a file", id="a-file"),
        pytest.param(_under_a_file, "{culprit} is a file", id="under-a-file"),
    ],
)
async def test_a_trace_path_that_cannot_hold_a_session_is_refused_before_any_step(
    tmp_path: Path, settings: LoopSettings, where: Any, reason: str
) -> None:
    trace, culprit = where(tmp_path)
    before = tree_digest(tmp_path)
    loop = Gated(settings.model_copy(update={"trace_path": trace}))
    with pytest.raises(ValueError, match="cannot hold a session") as caught:
        await loop.run(loop_n=1)
    message = str(caught.value)
    assert message.startswith(f"trace_path {trace} cannot hold a session: "), message
    assert reason.format(culprit=culprit) in message
    assert isinstance(caught.value.__cause__, OSError)
    assert loop.executed == []  # no step ran
    assert tree_digest(tmp_path) == before


# -- the error itself, and the command line ----------------------------------------------------


def test_session_busy_error_is_a_loop_error_and_crosses_processes() -> None:
    import rdagent_loop

    assert "SessionBusyError" in rdagent_loop.__all__
    error = SessionBusyError(Path("/x/__session__"), 1234)
    assert isinstance(error, LoopError)
    assert str(error) == busy_message(Path("/x/__session__"), 1234)
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), copy.folder, copy.pid, str(copy)) == (
        SessionBusyError,
        error.folder,
        1234,
        str(error),
    )
    unknown = pickle.loads(pickle.dumps(SessionBusyError(Path("/x"), None)))
    assert unknown.pid is None and "(pid unknown)" in str(unknown)


def test_the_command_line_says_the_session_is_busy_in_one_line(tmp_path: Path) -> None:
    session = tmp_path / "trace" / "__session__"
    lock = SessionLock(session)
    lock.acquire()  # this process holds the session
    try:
        done = subprocess.run(
            [
                *(sys.executable, "-m", "rdagent_loop", "run", "test_session_lock:Gated"),
                *("--loop-n", "1", "--trace-path", "trace", "--no-progress"),
            ],
            cwd=tmp_path,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=HANG,
            stdin=subprocess.DEVNULL,
        )
    finally:
        lock.release()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    line = f"error: SessionBusyError: {busy_message(session, os.getpid())}"
    assert line in done.stderr.splitlines()[-1], done.stderr
    assert not list_snapshots(session)
    assert sorted(p.name for p in session.rglob("*")) == [".lock", "pid"]  # still the holder's
