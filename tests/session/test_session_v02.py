"""Sessions, version 0.2 (DESIGN.md §3 "Sessions (version 0.2)" and §5), seen from outside.

* Layout: a loop folder ``__session__/<loop_idx>`` holds nothing but step files
  ``<step_idx>_<step_name>``, at every moment (inotify sees every name ever created there);
  everything else lives in hidden folders ``__session__/.<name>``.
* RD-Agent's own session tools, reproduced below from its source, list, sort and
  ``pickle.load`` every step file; a plain ``pickle.load`` gives what ``Cls.load`` gives,
  for small and large states, in this process and in a fresh one.
* A step file is a pickle followed by check data; ``Cls.load`` refuses a file whose pickle
  or check data changed, and never unpickles a raw pickle.
* Durable before delivered: when the consumer receives a result, its step file loads.
* "Nothing was saved yet" versus broken snapshots; a new run removes a killed run's
  leftovers (temporary files, chunks written after the newest step file).
* SIGKILL at random moments with a large state, fresh and resumed
  (``RDAGENT_LOOP_CRASH_LARGE_KILLS`` kills, default 6; ``RDAGENT_LOOP_CRASH_SEED``).
* Faults: a read-only session, a full disk.

Nothing here depends on how fast the machine is: tests wait for files and events, and the
few bounds on waiting (``HANG``) only catch a hang.

Run as a script (``python test_session_v02.py report LOG_FOLDER tools|plain``), this file
prints what RD-Agent's tools make of a session, from a fresh process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import pickle
import pickletools
import random
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import psutil
import pytest
from session_loops import LargeCrashLoop, Mixed, payload

from rdagent_loop import LoopBase, LoopSettings, SnapshotError, SnapshotWarning, StepResult

pytestmark = pytest.mark.anyio

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
HANG = 120.0  # seconds: a bound that only a hang reaches, never a slow machine


def settings_for(settings: LoopSettings, **changes: Any) -> LoopSettings:
    return settings.model_copy(update=changes)


# -- RD-Agent's own session tools, reproduced ---------------------------------------------
#
# Copied from microsoft/RD-Agent (commit 471eb30d), rdagent/log/utils/folder.py
# (get_first_session_file_after_duration, first_li_si_after_one_time) and
# rdagent/log/mle_summary.py (_get_loop_and_fn_after_hours), with only these changes:
# pandas' Timedelta is datetime.timedelta, DataScienceRDLoop is the loop's class, and the
# print is gone. Note that pathlib's glob("*/*_*") also enters hidden folders: a file whose
# name holds "_" directly inside __session__/.<name> would break the sort key
# int(f.parent.name) of these tools.


def rdagent_session_files(log_folder: Path) -> list[Path]:
    """The listing both tools make (folder.py and mle_summary.py, the same expression)."""
    files = sorted(
        (log_folder / "__session__").glob("*/*_*"),
        key=lambda f: (int(f.parent.name), int(f.name.split("_")[0])),
    )
    return files


def rdagent_get_first_session_file_after_duration(log_folder: Path, duration: timedelta) -> Path:
    """rdagent/log/utils/folder.py: get_first_session_file_after_duration."""
    log_folder = Path(log_folder)
    duration_dt = duration
    # iterate the dump steps in increasing order
    files = sorted(
        (log_folder / "__session__").glob("*/*_*"),
        key=lambda f: (int(f.parent.name), int(f.name.split("_")[0])),
    )
    fp = None
    for fp in files:
        with fp.open("rb") as f:
            session_obj: LoopBase = pickle.load(f)
        timer = session_obj.timer
        all_duration = timer.all_duration
        remain_time_duration = timer.remain_time()
        if all_duration is None or remain_time_duration is None:
            msg = "Timer is not configured"
            raise ValueError(msg)
        time_spent = all_duration - remain_time_duration
        if time_spent >= duration_dt:
            break
    if fp is None:
        msg = f"No session file found after duration {duration}"
        raise ValueError(msg)
    return fp


def rdagent_first_li_si_after_one_time(
    log_path: Path, loop_cls: type[LoopBase], hours: int = 12
) -> tuple[int, int, str] | None:
    """rdagent/log/utils/folder.py: first_li_si_after_one_time."""
    session_path = log_path / "__session__"
    max_li = max(int(p.name) for p in session_path.iterdir() if p.is_dir() and p.name.isdigit())
    max_step = max(
        int(p.name.split("_")[0]) for p in (session_path / str(max_li)).iterdir() if p.is_file()
    )
    rdloop_obj_p = next((session_path / str(max_li)).glob(f"{max_step}_*"))

    rdloop_obj = loop_cls.load(rdloop_obj_p)
    loop_trace = rdloop_obj.loop_trace
    si2fn = rdloop_obj.steps

    duration = timedelta(seconds=0)
    for li, lts in loop_trace.items():
        for lt in lts:
            si = lt.step_idx
            duration += lt.end - lt.start
            if duration > timedelta(hours=hours):
                return li, si, si2fn[si]
    return None


def rdagent_get_loop_and_fn_after_hours(log_folder: Path, hours: int) -> tuple[int, str]:
    """rdagent/log/mle_summary.py: _get_loop_and_fn_after_hours."""
    stop_session_fp = rdagent_get_first_session_file_after_duration(
        log_folder, timedelta(hours=hours)
    )

    with stop_session_fp.open("rb") as f:
        session_obj: LoopBase = pickle.load(f)

    loop_trace = session_obj.loop_trace
    stop_li = max(loop_trace.keys())
    last_loop = loop_trace[stop_li]
    last_step = last_loop[-1]
    stop_fn = session_obj.steps[last_step.step_idx]
    files = sorted(
        (log_folder / "__session__").glob("*/*_*"),
        key=lambda f: (int(f.parent.name), int(f.name.split("_")[0])),
    )
    assert files[-1:]  # what the tool prints as "Max Session"
    return stop_li, stop_fn


# -- comparing two loads of one step file -------------------------------------------------


def _feed(h: Any, value: Any) -> None:
    """A canonical encoding of plain data (equal values, equal bytes; sharing ignored)."""
    if isinstance(value, (bytes, bytearray)):
        h.update(b"b%d:" % len(value))
        h.update(value)
    elif isinstance(value, str):
        data = value.encode()
        h.update(b"s%d:" % len(data))
        h.update(data)
    elif isinstance(value, (list, tuple)):
        h.update(b"l%d[" % len(value))
        for item in value:
            _feed(h, item)
        h.update(b"]")
    elif isinstance(value, dict):
        h.update(b"d%d{" % len(value))
        for key in sorted(value, key=repr):
            _feed(h, key)
            _feed(h, value[key])
        h.update(b"}")
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def digest_of(value: Any) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:16]


def fingerprint(loop: Any) -> dict[str, Any]:
    """What two loads of one step file must agree on, as JSON (to compare across processes):
    the class, ``loop_idx``, ``step_idx``, every loop's outputs, the step names of every
    loop's trace, and the user state the class names in ``USER_STATE``."""
    return {
        "class": f"{type(loop).__module__}:{type(loop).__qualname__}",
        "loop_idx": loop.loop_idx,
        "step_idx": {str(li): n for li, n in dict(loop.step_idx).items()},
        "prev_out": {
            str(li): {str(k): digest_of(v) for k, v in dict(outputs).items()}
            for li, outputs in dict(loop.loop_prev_out).items()
        },
        "trace": {
            str(li): [t.step_name for t in traces] for li, traces in dict(loop.loop_trace).items()
        },
        "user": {name: digest_of(getattr(loop, name)) for name in type(loop).USER_STATE},
    }


def plain_load(file: Path) -> Any:
    """What RD-Agent's tools do with a step file."""
    with open(file, "rb") as f:
        return pickle.load(f)


def rdagent_tools_report(log_folder: Path, tools: bool) -> dict[str, Any]:
    """What RD-Agent's tools make of a session: the files they list, the fingerprint of
    each file's plain ``pickle.load``, and (``tools``) what the tools answer."""
    files = rdagent_session_files(log_folder)

    def rel(path: Path) -> str:
        return path.relative_to(log_folder).as_posix()

    report: dict[str, Any] = {
        "files": [rel(f) for f in files],
        "plain": {rel(f): fingerprint(plain_load(f)) for f in files},
    }
    if tools:
        report["first_after_0h"] = rel(
            rdagent_get_first_session_file_after_duration(log_folder, timedelta(0))
        )
        report["first_after_1000h"] = rel(
            rdagent_get_first_session_file_after_duration(log_folder, timedelta(hours=1000))
        )
        report["stop_after_0h"] = list(rdagent_get_loop_and_fn_after_hours(log_folder, 0))
        report["first_li_si_after_1000h"] = rdagent_first_li_si_after_one_time(
            log_folder, Mixed, hours=1000
        )
    return report


def child_env() -> dict[str, str]:
    """The environment of a child process that imports the tests' modules."""
    env = dict(os.environ)
    paths = [str(TESTS), str(HERE), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def rdagent_tools_in_a_fresh_process(log_folder: Path, tools: bool) -> dict[str, Any]:
    """``rdagent_tools_report`` in a new Python process, as RD-Agent's tools run."""
    mode = "tools" if tools else "plain"
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "report", str(log_folder), mode],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=HANG,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


# -- the layout -----------------------------------------------------------------------------

_STEP_FILE = re.compile(r"(\d+)_(.+)")


def not_step_files(names: Sequence[str], steps: Sequence[str]) -> list[str]:
    """Names in a loop folder that are not ``<step_idx>_<steps[step_idx]>``."""
    bad = []
    for name in names:
        match = _STEP_FILE.fullmatch(name)
        if match is None or int(match[1]) >= len(steps) or steps[int(match[1])] != match[2]:
            bad.append(name)
    return bad


def assert_layout(session: Path, steps: Sequence[str]) -> None:
    """``__session__`` holds loop folders (digits) and hidden entries (``.<name>``) only; a
    loop folder holds step files only, each parsed as RD-Agent parses it."""
    if not session.exists():
        return
    for entry in session.iterdir():
        assert entry.name.isdigit() or entry.name.startswith("."), entry
        if entry.name.isdigit():
            assert entry.is_dir(), entry
            inside = list(entry.iterdir())
            assert not_step_files([p.name for p in inside], steps) == [], entry
            assert all(p.is_file() for p in inside), inside


def step_files(session: Path) -> list[Path]:
    """The step files of a session, in RD-Agent's order (``assert_layout`` checks that
    nothing else is in the loop folders)."""
    return sorted(
        (
            p
            for p in session.glob("*/*")
            if p.parent.name.isdigit() and _STEP_FILE.fullmatch(p.name) and p.is_file()
        ),
        key=lambda p: (int(p.parent.name), int(p.name.split("_")[0])),
    )


class NameWatch:
    """Every name created in, or renamed into, some folders, seen by Linux's inotify: a
    temporary file that lived for a microsecond is caught, which no listing would see."""

    IN_MOVED_TO = 0x80
    IN_CREATE = 0x100
    IN_Q_OVERFLOW = 0x4000
    _EVENT = struct.Struct("iIII")

    def __init__(self, folders: Sequence[Path]) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.folders: dict[int, Path] = {}
        for folder in folders:
            wd = libc.inotify_add_watch(
                self.fd, os.fsencode(folder), self.IN_CREATE | self.IN_MOVED_TO
            )
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
            self.folders[wd] = folder
        self.seen: dict[Path, set[str]] = {folder: set() for folder in folders}

    def names(self) -> dict[Path, set[str]]:
        """Names seen so far, per folder."""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return self.seen
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = self._EVENT.unpack_from(data, offset)
                start = offset + self._EVENT.size
                name = data[start : start + length].rstrip(b"\0")
                offset = start + length
                assert not mask & self.IN_Q_OVERFLOW, "inotify lost events"
                if wd in self.folders and name:
                    self.seen[self.folders[wd]].add(os.fsdecode(name))

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def watching_names(session: Path, loops: int, steps: Sequence[str]) -> Iterator[None]:
    """Check every name ever created in ``session`` and in its first ``loops`` loop folders.

    The folders are made beforehand, so the watch is in place before the engine writes
    there; the ones left empty are removed at the end (RD-Agent's
    ``first_li_si_after_one_time`` takes the newest loop folder to hold a step file).
    """
    folders = [session, *(session / str(li) for li in range(loops))]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    watch = NameWatch(folders) if sys.platform.startswith("linux") else None
    try:
        yield
        if watch is not None:
            seen = watch.names()
            top = [n for n in seen[session] if not (n.isdigit() or n.startswith("."))]
            assert top == [], f"names created in {session} that are neither loop nor hidden"
            for folder in folders[1:]:
                bad = not_step_files(sorted(seen[folder]), steps)
                assert bad == [], f"names created in loop folder {folder} at some moment"
    finally:
        if watch is not None:
            watch.close()
        for folder in folders[1:]:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty


# -- durable before delivered ---------------------------------------------------------------


def assert_on_disk(cls: type[LoopBase], session: Path, r: StepResult, layout: bool = True) -> None:
    """The step file of ``r`` loads and shows the step completed, with its output (and
    with ``layout``, the session's layout holds at this moment)."""
    file = session / str(r.loop_idx) / f"{r.step_idx}_{r.step_name}"
    assert file.is_file(), f"{r} was delivered before its step file {file} existed"
    loaded = cls.load(file)
    assert loaded.step_idx[r.loop_idx] > r.step_idx, (r, dict(loaded.step_idx))
    assert loaded.loop_prev_out[r.loop_idx][r.step_name] == r.output, r
    if layout:
        assert_layout(session, cls.steps)


# -- 1. RD-Agent's tools read our sessions --------------------------------------------------


@pytest.mark.parametrize("stop", ["finished", "step_n"])
async def test_rdagent_tools_list_sort_and_pickle_load_every_step_file(
    settings: LoopSettings, stop: str
) -> None:
    # parallel loops; sync steps in the default executor (processes), async ones inline
    settings = settings_for(settings, step_semaphore=3)
    loop = Mixed(settings)
    session = loop.session_folder
    loops = 5
    with watching_names(session, loops, Mixed.steps):
        if stop == "finished":
            summary = await loop.run(loop_n=loops, all_duration="1h")
            assert summary.reason == "loop_n"
        else:
            summary = await loop.run(step_n=10, loop_n=loops, all_duration="1h")  # mid-loop
            assert summary.reason == "step_n"
    assert_layout(session, Mixed.steps)
    files = step_files(session)
    newest = Mixed.load(settings.trace_path)
    if stop == "finished":
        assert dict(newest.step_idx) == {li: 4 for li in range(loops)}
    else:
        assert sum(dict(newest.step_idx).values()) == 10
        assert any(0 < n < 4 for n in newest.step_idx.values())  # a loop stopped mid-way
    assert len(files) == sum(dict(newest.step_idx).values())

    report = rdagent_tools_in_a_fresh_process(settings.trace_path, tools=True)
    trace = settings.trace_path
    assert report["files"] == [f.relative_to(trace).as_posix() for f in files]
    for file in files:
        expected = fingerprint(Mixed.load(file))
        assert report["plain"][file.relative_to(trace).as_posix()] == expected, file
    assert report["first_after_0h"] == "__session__/0/0_propose"
    assert report["first_after_1000h"] == files[-1].relative_to(trace).as_posix()
    assert report["stop_after_0h"] == [0, "propose"]
    assert report["first_li_si_after_1000h"] is None
    # the same tools in this process
    assert rdagent_session_files(trace) == files
    assert rdagent_first_li_si_after_one_time(trace, Mixed, hours=1000) is None


# -- 2. a plain pickle.load is Cls.load -----------------------------------------------------

SIZES = {
    "small": {"out_size": 1_000, "big": 0, "many": 0},
    "large": {"out_size": 100_000, "big": 30_000_000, "many": 200_000},
}


@pytest.mark.parametrize("size", list(SIZES))
async def test_a_plain_pickle_load_of_every_step_file_equals_cls_load(
    settings: LoopSettings, size: str, anyio_backend: Any
) -> None:
    if size == "large" and anyio_backend[0] != "asyncio":
        pytest.skip("the file format does not depend on the backend: large runs once")
    settings = settings_for(settings, step_semaphore=2, step_executor="thread")
    loop = Mixed(settings, **SIZES[size])
    await loop.run(loop_n=2)
    session = loop.session_folder
    assert_layout(session, Mixed.steps)
    files = step_files(session)
    assert len(files) == 8
    fingerprints = {}
    complete = 0
    for file in files:
        plain = plain_load(file)  # in place: the session where it was written
        assert type(plain) is Mixed, file
        fingerprints[file] = fingerprint(Mixed.load(file))
        assert fingerprint(plain) == fingerprints[file], file
        for li, n in dict(plain.step_idx).items():  # and it holds the right values
            if n == 0:
                continue
            expected = Mixed.expected_outputs(li, loop.out_size)
            assert dict(plain.loop_prev_out[li]) == {
                k: v for k, v in expected.items() if k not in Mixed.steps[n:]
            }, (file, li)
        assert plain.big == loop.big and plain.many == loop.many, file
        complete += dict(plain.step_idx) == {0: 4, 1: 4}
        del plain
    assert complete == 1  # the file written last
    # the same from a process that did not write the session
    report = rdagent_tools_in_a_fresh_process(settings.trace_path, tools=False)
    for file in files:
        name = file.relative_to(settings.trace_path).as_posix()
        assert report["plain"][name] == fingerprints[file], file


# -- 2b. the check data after the pickle --------------------------------------------------


def pickle_end(data: bytes) -> int:
    """Where the pickle at the start of ``data`` ends (after its STOP opcode), found
    without unpickling anything."""
    for opcode, _arg, pos in pickletools.genops(data):
        if opcode.name == "STOP":
            assert pos is not None
            return pos + 1
    raise AssertionError("no STOP opcode")


def flipped(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0x5A
    return bytes(changed)


def refused(cls: type[LoopBase], file: Path) -> SnapshotError:
    with pytest.raises(SnapshotError) as caught:
        cls.load(file)
    return caught.value


async def test_cls_load_refuses_a_step_file_whose_pickle_or_check_data_changed(
    settings: LoopSettings,
) -> None:
    settings = settings_for(settings, step_semaphore=2, step_executor="thread")
    loop = Mixed(settings)
    await loop.run(loop_n=2)
    files = step_files(loop.session_folder)
    rng = random.Random(5)
    for file in (files[0], files[-1]):  # a loop's first step file; the last, of a finished run
        data = file.read_bytes()
        end = pickle_end(data)
        assert end < len(data), f"{file}: no check data after the pickle"
        trailer = range(end, len(data))
        at_trailer = sorted({end, len(data) - 1, *rng.sample(trailer, min(62, len(trailer)))})
        at_pickle = sorted({0, end // 2, end - 1, *rng.sample(range(end), min(16, end))})
        tampered = {f"check data byte {i - end} changed": flipped(data, i) for i in at_trailer}
        tampered.update({f"pickle byte {i} changed": flipped(data, i) for i in at_pickle})
        tampered["check data removed"] = data[:end]
        tampered["check data truncated"] = data[: end + (len(data) - end) // 2]
        problems = []
        for what, bad in tampered.items():
            file.write_bytes(bad)
            try:
                Mixed.load(file)
            except SnapshotError as error:
                if file.name not in str(error):
                    problems.append(f"{what}: the error does not name the file: {error}")
            except Exception as error:
                problems.append(f"{what}: {error!r} instead of a SnapshotError")
            else:
                problems.append(f"{what}: loaded")
        assert problems == [], f"{file} ({end} bytes of pickle, {len(data)} in all)"
        file.write_bytes(data)
        assert fingerprint(Mixed.load(file)) == fingerprint(plain_load(file))


class _Plant:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.target), "w"))


def test_a_raw_pickle_of_a_loop_is_refused_and_never_unpickled(
    settings: LoopSettings, tmp_path: Path
) -> None:
    target = tmp_path / "planted"
    loop = Mixed(settings)
    loop.plant = _Plant(target)  # type: ignore[attr-defined]
    file = loop.session_folder / "0" / "0_propose"
    file.parent.mkdir(parents=True)
    file.write_bytes(pickle.dumps(loop))
    error = refused(Mixed, file)
    assert file.name in str(error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SnapshotWarning)
        with pytest.raises(FileNotFoundError) as caught:
            Mixed.load(settings.trace_path)
    assert "nothing was saved yet" not in str(caught.value)  # a step file is there, broken
    assert not target.exists()


# -- 3. durable before delivered --------------------------------------------------------------


@pytest.mark.parametrize("durability", ["flush", "fsync"])
@pytest.mark.parametrize("form", ["async with", "async for"])
async def test_a_result_reaches_the_consumer_only_once_its_step_file_loads(
    settings: LoopSettings, durability: str, form: str
) -> None:
    settings = settings_for(
        settings, durability=durability, step_semaphore=3, step_executor="thread"
    )
    loop = Mixed(settings)
    session = loop.session_folder
    loops = 6
    received: list[StepResult] = []

    async def check(r: StepResult) -> None:
        received.append(r)
        await anyio.to_thread.run_sync(assert_on_disk, Mixed, session, r)

    with watching_names(session, loops, Mixed.steps):
        if form == "async with":
            async with loop.run(loop_n=loops) as results:
                async for r in results:
                    await check(r)
        else:
            async for r in loop.run(loop_n=loops):
                await check(r)
    assert sorted((r.loop_idx, r.step_idx) for r in received) == [
        (li, si) for li in range(loops) for si in range(4)
    ]


# -- 4. nothing saved yet, broken snapshots, leftovers ---------------------------------------

ORPHAN_CHUNK = "0f" * 32  # 64 hex characters: a chunk's name


def make_leftovers(session: Path, mtime: float) -> list[Path]:
    """What a run killed before or while saving leaves: a temporary file, a chunk written
    at ``mtime`` that no step file references, and an empty loop folder."""
    (session / ".tmp").mkdir(parents=True, exist_ok=True)
    (session / ".chunks").mkdir(parents=True, exist_ok=True)
    (session / "0").mkdir(parents=True, exist_ok=True)
    temp = session / ".tmp" / "leftover-1234"
    temp.write_bytes(os.urandom(3000))
    chunk = session / ".chunks" / ORPHAN_CHUNK
    chunk.write_bytes(os.urandom(5000))
    os.utime(chunk, (mtime, mtime))
    return [temp, chunk]


def test_a_session_with_leftovers_but_no_step_file_says_nothing_was_saved_yet(
    tmp_path: Path,
) -> None:
    trace = tmp_path / "trace"
    session = trace / "__session__"
    make_leftovers(session, time.time())
    for where in (trace, session):
        with pytest.raises(FileNotFoundError) as caught:
            Mixed.load(where)
        message = str(caught.value)
        assert "nothing was saved yet" in message
        assert str(trace) in message  # names the folder


async def test_a_session_whose_every_step_file_is_broken_does_not_say_nothing_was_saved(
    settings: LoopSettings,
) -> None:
    loop = Mixed(settings)
    await loop.run(loop_n=1)
    files = step_files(loop.session_folder)
    assert len(files) == 4
    for file in files:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SnapshotWarning)
        with pytest.raises(FileNotFoundError) as caught:
            Mixed.load(settings.trace_path)
    message = str(caught.value)
    assert "nothing was saved yet" not in message
    assert str(settings.trace_path) in message
    assert re.search(r"broken|corrupt|invalid|no valid", message, re.IGNORECASE), message


@pytest.mark.parametrize("before", ["nothing saved", "a finished run"])
async def test_a_new_run_removes_temporary_files_and_chunks_written_after_the_newest_step(
    settings: LoopSettings, before: str
) -> None:
    settings = settings_for(settings, step_executor="thread")
    session = settings.trace_path / "__session__"
    big = 2_000_000  # stored in chunks: the chunks step files reference must stay
    if before == "a finished run":
        await Mixed(settings, big=big).run(loop_n=2)
        newest = max(f.stat().st_mtime for f in step_files(session))
        temp, chunk = make_leftovers(session, newest + 60)
        loop = Mixed.load(settings.trace_path)
    else:
        temp, chunk = make_leftovers(session, time.time())
        loop = Mixed(settings, big=big)
    await loop.run(loop_n=1)
    assert not chunk.exists(), "an orphaned chunk outlived a run"
    assert not temp.exists(), "a temporary file outlived a run"
    assert [p for p in (session / ".tmp").rglob("*") if p.is_file()] == []
    assert_layout(session, Mixed.steps)
    loops = 3 if before == "a finished run" else 1
    files = step_files(session)
    assert len(files) == 4 * loops
    for file in files:
        assert Mixed.load(file).big == loop.big, file
    assert sorted(Mixed.load(settings.trace_path).records) == list(range(loops))


# -- 5. SIGKILL at random moments, with a large state ---------------------------------------

LARGE_KILLS = int(os.environ.get("RDAGENT_LOOP_CRASH_LARGE_KILLS", "6"))
SEED = int(os.environ.get("RDAGENT_LOOP_CRASH_SEED", "20240611"))
LARGE_CHILD = HERE / "session_large_crash_child.py"
LARGE_LOOPS = 2
LARGE_STEPS = LARGE_LOOPS * len(LargeCrashLoop.steps)
LARGE = {
    "loops": LARGE_LOOPS,
    "parallel": 2,
    "out_size": 100_000,
    "big": 16_000_000,  # tens of MB of state with the strings: stored in chunks
    "many": 50_000,
    "blob": 1_000_000,  # ``record`` adds this much to the state: new chunks mid-run
}
CONFIGS = [("asyncio", "flush"), ("trio", "fsync"), ("trio", "flush"), ("asyncio", "fsync")]


def lines(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [(int(a), int(b)) for a, b in (line.split() for line in path.read_text().splitlines())]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(proc.pid) == pgid and _running(proc.pid):
                members.append(proc.pid)
    return members


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child and everything it started (its process group and descendants),
    and wait until none of them runs: no writer may still touch the session afterwards."""
    try:
        family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=HANG)
    deadline = time.monotonic() + HANG
    while alive := [*_group_members(proc.pid), *filter(_running, family)]:
        assert time.monotonic() < deadline, f"still running after SIGKILL: {alive}"
        time.sleep(0.005)


class LargeSession:
    """One session of the large-state run, lived by child processes one after another."""

    def __init__(self, root: Path, name: str, backend: str, durability: str) -> None:
        self.trace = root / name
        self.session = self.trace / "__session__"
        self.starts = root / f"{name}.starts"  # a line when a step starts
        self.side = root / f"{name}.side"  # a line when a step's body ends
        self.delivered = root / f"{name}.delivered"  # a line per result the consumer got
        self.log = root / f"{name}.log"
        self.cmd = {
            "trace": str(self.trace),
            "starts": str(self.starts),
            "side": str(self.side),
            "delivered": str(self.delivered),
            "backend": backend,
            "durability": durability,
            **LARGE,
        }
        self.done: set[tuple[int, int]] = set()  # steps the newest snapshot shows as done

    def kill_moment(self, rng: random.Random) -> Callable[[], bool]:
        """When to kill the next life: once a random number of steps have started, or a
        random number of new step files exist, short of the last one (so the kill lands
        among the writes of the steps still running)."""
        left = LARGE_STEPS - len(self.done)
        if rng.random() < 1 / 3:
            starts = len(lines(self.starts)) + rng.randint(1, left)
            return lambda: len(lines(self.starts)) >= starts
        files = len(step_files(self.session)) + rng.randint(1, max(1, left - 1))
        return lambda: len(step_files(self.session)) >= files

    def life(self, kill_when: Callable[[], bool] | None = None, delay: float = 0.0) -> bool:
        """Run one life; SIGKILL it ``delay`` seconds after ``kill_when()`` turns true.
        Return whether it was killed."""
        ran = len(lines(self.side))
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(LARGE_CHILD), json.dumps(self.cmd)],
                stdout=log,
                stderr=log,
                env=child_env(),
                start_new_session=True,
            )
        try:
            if kill_when is not None:
                deadline = time.monotonic() + HANG
                while proc.poll() is None and not kill_when():
                    assert time.monotonic() < deadline, "the child made no progress"
                    time.sleep(0.001)  # waiting for files, not for time to pass
                time.sleep(delay)
                kill_group(proc)
            proc.wait(timeout=HANG)
        finally:
            if proc.poll() is None:
                kill_group(proc)
        killed = proc.returncode == -signal.SIGKILL
        assert killed or proc.returncode == 0, self.log.read_text()
        again = set(lines(self.side)[ran:]) & self.done
        assert not again, f"steps shown done before this life ran again: {sorted(again)}"
        self.check()
        return killed

    def check(self) -> None:
        """Every session loads, consistent: the layout holds, every step file loads, the
        newest snapshot keeps what was done and every result a consumer received."""
        assert_layout(self.session, LargeCrashLoop.steps)
        files = rdagent_session_files(self.trace)  # RD-Agent's listing parses every name
        if not files:
            with pytest.raises(FileNotFoundError, match="nothing was saved yet"):
                LargeCrashLoop.load(self.trace)
            assert not self.done and not lines(self.delivered)
            return
        newest = LargeCrashLoop.load(self.trace)  # a warning (a skipped file) fails the test
        done = {(li, si) for li, n in dict(newest.step_idx).items() for si in range(n)}
        del newest
        for file in files:
            LargeCrashLoop.load(file)
        assert self.done <= done, f"lost: {sorted(self.done - done)}"
        lost = set(lines(self.delivered)) - done
        assert not lost, f"delivered to the consumer, then lost: {sorted(lost)}"
        self.done = done


def test_killed_runs_with_a_large_state_always_load_and_resume_to_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    # What an uninterrupted run ends with: LargeCrashLoop's values depend on the loop
    # index only (the other tests here check uninterrupted runs against the same values).
    every_step = {(li, si) for li in range(LARGE_LOOPS) for si in range(4)}
    rng = random.Random(SEED)
    kills = number = 0
    while kills < LARGE_KILLS:
        session = LargeSession(tmp_path, f"killed{number}", *CONFIGS[number % len(CONFIGS)])
        number += 1
        for _ in range(2):  # kill its first life (fresh), then a resumed one
            if kills >= LARGE_KILLS or session.done == every_step:
                break
            delay = rng.choice([0.0, rng.uniform(0.0, 0.02)])
            kills += session.life(session.kill_moment(rng), delay)
        while session.done != every_step:  # resume to the end
            assert not session.life()
        loop = LargeCrashLoop.load(session.trace)
        assert sorted(loop.records) == list(range(LARGE_LOOPS))  # each recorded once
        assert loop.blobs == {li: payload(li, 4, LARGE["blob"]) for li in range(LARGE_LOOPS)}
        assert loop.big == payload(-1, 0, LARGE["big"])
        assert loop.many == [f"item-{i}" for i in range(LARGE["many"])]
        assert dict(loop.step_idx) == {li: 4 for li in range(LARGE_LOOPS)}
        assert loop.loop_idx == LARGE_LOOPS
        for li in range(LARGE_LOOPS):
            expected = LargeCrashLoop.expected_outputs(li, LARGE["out_size"])
            assert dict(loop.loop_prev_out[li]) == expected
        assert set(lines(session.side)) == every_step
        assert set(lines(session.delivered)) <= every_step


# -- 6. faults ------------------------------------------------------------------------------


class Mounts:
    """Mounts made by a test (root only), undone at teardown."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def _mount(self, *args: str) -> None:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount here: {done.stderr.strip()}")

    def tmpfs(self, point: Path, size: str) -> None:
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point))
        self.points.append(point)

    def resize(self, point: Path, size: str) -> None:
        self._mount("-o", f"remount,size={size}", str(point))

    def read_only(self, point: Path) -> None:
        self._mount("--bind", str(point), str(point))
        self.points.append(point)
        self._mount("-o", "remount,ro,bind", str(point))

    def writable(self, point: Path) -> None:
        self._mount("-o", "remount,rw,bind", str(point))

    def undo(self) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)
        self.points.clear()


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("needs root on Linux to mount")
    made = Mounts()
    try:
        yield made
    finally:
        made.undo()


def described(error: BaseException) -> str:
    return "\n".join([str(error), *getattr(error, "__notes__", [])])


FAULT_HANG = 60.0  # seconds: a failing run that takes longer hangs (below pytest's timeout)


async def failure_of(run: Any) -> tuple[list[StepResult], BaseException]:
    """Consume ``run``, which must fail: the results it delivered, and its error (as
    raised: an ``ExceptionGroup`` stays one). A run that neither fails nor ends within
    ``FAULT_HANG`` seconds fails the test instead of hanging it."""
    received: list[StepResult] = []
    error: BaseException | None = None
    with anyio.move_on_after(FAULT_HANG) as scope:
        try:
            async with run as results:
                async for r in results:
                    received.append(r)
        except Exception as exc:
            error = exc
    assert not scope.cancelled_caught, f"the failing run still ran after {FAULT_HANG}s"
    assert error is not None, "the run did not fail"
    return received, error


async def test_a_read_only_session_fails_the_run_clearly_and_still_loads_as_before(
    settings: LoopSettings, mounts: Mounts
) -> None:
    settings = settings_for(settings, step_semaphore=2, step_executor="thread")
    trace = settings.trace_path
    await Mixed(settings).run(loop_n=2)
    files = step_files(trace / "__session__")
    before = fingerprint(Mixed.load(trace))
    mounts.read_only(trace)  # a real read-only file system: root ignores permissions
    loop = Mixed.load(trace)
    received, error = await failure_of(loop.run(loop_n=2))
    assert isinstance(error, (OSError, SnapshotError)), repr(error)
    assert str(trace) in described(error)  # says which session
    assert received == []  # nothing can be on disk, so nothing was delivered
    assert step_files(trace / "__session__") == files
    assert fingerprint(Mixed.load(trace)) == before
    mounts.writable(trace)  # a resume finishes the work
    resumed = Mixed.load(trace)
    await resumed.run(loop_n=2)
    assert sorted(resumed.records) == list(range(4))
    assert dict(Mixed.load(trace).step_idx) == {li: 4 for li in range(4)}


async def test_a_loop_folder_that_cannot_be_made_fails_the_run_and_keeps_what_was_delivered(
    settings: LoopSettings,
) -> None:
    settings = settings_for(settings, step_semaphore=2, step_executor="thread")
    trace = settings.trace_path
    session = trace / "__session__"
    await Mixed(settings).run(loop_n=1)
    before = fingerprint(Mixed.load(trace))
    (session / "2").write_text("a file where loop 2's folder would go")
    loop = Mixed.load(trace)
    received, error = await failure_of(loop.run(loop_n=3))
    assert isinstance(error, (NotADirectoryError, FileExistsError)), repr(error)
    for r in received:
        assert_on_disk(Mixed, session, r, layout=False)  # loop 2's "folder" is a file
    after = Mixed.load(trace)
    assert fingerprint(after)["prev_out"]["0"] == before["prev_out"]["0"]
    for file in step_files(session):
        Mixed.load(file)
    (session / "2").unlink()  # a resume finishes the work
    resumed = Mixed.load(trace)
    await resumed.run(loop_n=3)  # loop 1 if it started, then new loops up to 3
    final = dict(Mixed.load(trace).step_idx)
    assert set(range(4)) <= set(final) and set(final.values()) == {4}, final


async def test_a_full_disk_fails_the_run_with_enospc_and_keeps_what_was_delivered(
    settings: LoopSettings, tmp_path: Path, mounts: Mounts
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounts.tmpfs(disk, "2m")
    trace = disk / "trace"
    settings = settings_for(settings, trace_path=trace, step_semaphore=2, step_executor="thread")
    loop = Mixed(settings, out_size=100_000)  # ~100 KB per step: the disk fills mid-run
    session = loop.session_folder
    loops = 12
    received, error = await failure_of(loop.run(loop_n=loops))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC, repr(error)
    for r in received:
        assert_on_disk(Mixed, session, r)
    assert_layout(session, Mixed.steps)
    files = step_files(session)
    assert files, "nothing fit on the disk"
    for file in files:
        Mixed.load(file)
    Mixed.load(trace)
    mounts.resize(disk, "64m")  # space again: a resume finishes the work
    resumed = Mixed.load(trace)
    await resumed.run()
    final = Mixed.load(trace)
    assert dict(final.step_idx) == {li: 4 for li in range(loops)}
    assert sorted(final.records) == list(range(loops))


if __name__ == "__main__":
    # python test_session_v02.py report LOG_FOLDER tools|plain
    print(json.dumps(rdagent_tools_report(Path(sys.argv[2]), tools=sys.argv[3] == "tools")))
