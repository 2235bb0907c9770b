"""``durability="fsync"`` reaches the disk: every file a snapshot writes (the snapshot, its new
chunks, a finished loop's outputs) is fsynced before its folder is, and every folder that got a
new entry is fsynced, whoever writes them (inline, the writer thread, the writer process);
at ``durability="flush"`` nothing is.

The fsync comes in through the constructor (``SnapshotWriter(fsync=...)``, ``job.run(fsync)``):
a fake that still calls ``os.fsync`` and remembers what each call made durable. The writer
process is a program of its own that calls ``os.fsync`` itself: it reports how many fsyncs it
took, which must be as many as the writer thread took for the same snapshots.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from session_loops import Grows, payload

from rdagent_loop import LoopSettings
from rdagent_loop._session import (
    ChunkIndex,
    Durability,
    OutputsBlob,
    SnapshotJob,
    SnapshotWriter,
    make_job,
)
from rdagent_loop._session._writer_process import available

Identity = tuple[int, int]  # (device, inode): what fsync made durable; a rename keeps it


class CountingFsync:
    """``os.fsync`` that remembers, in order, the identity of each file or folder it synced."""

    def __init__(self) -> None:
        self.synced: list[Identity] = []

    def __call__(self, fd: int) -> None:
        os.fsync(fd)
        info = os.fstat(fd)
        self.synced.append((info.st_dev, info.st_ino))


def identity(path: Path) -> Identity:
    info = path.stat()
    return info.st_dev, info.st_ino


def snapshot_jobs(session: Path, durability: Durability) -> list[SnapshotJob]:
    """The snapshots of three loops of ``Grows``, made as its ``dump()`` makes them: the
    history is cut into chunks, and the last snapshot of a loop carries its outputs.
    The same bytes at every call (the chunks, and so the files, are the same)."""
    loop = Grows(LoopSettings(trace_path=session.parent, progress=False), size=70_000)
    index = ChunkIndex(session / ".chunks")
    jobs = []
    for li in range(3):
        for si, name in enumerate(loop.steps):
            if name == "record":
                loop.history.append(payload(li, si, 70_000))
            loop.step_idx[li] = si + 1
            outputs = []
            if si == len(loop.steps) - 1:
                data = payload(li, 9, 1000)
                digest = hashlib.sha256(data).hexdigest()
                outputs.append(OutputsBlob(session, li, digest, data))
            path = session / str(li) / f"{si}_{name}"
            jobs.append(
                make_job(loop, path, durability=durability, key=None, index=index, outputs=outputs)
            )
    return jobs


def check(session: Path, synced: list[Identity], durability: Durability) -> None:
    """Each file under ``session`` fsynced once, and its folder after it; every folder fsynced."""
    files = sorted(p for p in session.rglob("*") if p.is_file())
    names = {p.name.split("-")[0] if p.parent.name != ".chunks" else "chunk" for p in files}
    assert names == {"0_propose", "1_record", "outputs", "chunk"}  # every kind of file
    if durability == "flush":
        assert synced == []
        return
    for file in files:
        times = synced.count(identity(file))
        assert times == 1, f"{file} was fsynced {times} times, not once"
        folder = identity(file.parent)
        after = [i for i, x in enumerate(synced) if x == folder]
        assert after and after[-1] > synced.index(identity(file)), (
            f"{file.parent} not fsynced after {file.name} was written"
        )
    folders = [session.parent, session, *(p for p in session.rglob("*") if p.is_dir())]
    for folder_path in folders:  # each got a new entry: a folder, or a file
        assert identity(folder_path) in synced, f"the folder {folder_path} was never fsynced"


@pytest.mark.parametrize("durability", ["fsync", "flush"])
def test_an_inline_write_fsyncs_every_file_and_folder(
    tmp_path: Path, durability: Durability
) -> None:
    session = tmp_path / "__session__"
    fsync = CountingFsync()
    for job in snapshot_jobs(session, durability):
        job.run(fsync)
    check(session, fsync.synced, durability)


@pytest.mark.anyio
@pytest.mark.parametrize("durability", ["fsync", "flush"])
async def test_the_writer_thread_fsyncs_every_file_and_folder(
    tmp_path: Path, durability: Durability
) -> None:
    session = tmp_path / "__session__"
    fsync = CountingFsync()
    async with SnapshotWriter(mode="thread", fsync=fsync) as writer:
        for job in snapshot_jobs(session, durability):
            assert writer.submit(job)
            await writer.wait_room()
        await writer.drain()
        check(session, fsync.synced, durability)
    assert writer.statistics().fsyncs == len(fsync.synced)


@pytest.mark.anyio
@pytest.mark.skipif(not available(), reason="the writer process needs Linux")
@pytest.mark.parametrize("durability", ["fsync", "flush"])
async def test_the_writer_process_fsyncs_as_often_as_the_thread(
    tmp_path: Path, durability: Durability
) -> None:
    fsyncs = {}
    for mode in ("thread", "process"):
        session = tmp_path / mode / "__session__"
        fsync = CountingFsync()
        async with SnapshotWriter(mode=mode, fsync=fsync) as writer:
            for job in snapshot_jobs(session, durability):
                assert writer.submit(job)
                await writer.wait_room()
        statistics = writer.statistics()
        assert (statistics.process_id is not None) == (mode == "process")
        fsyncs[mode] = statistics.fsyncs
        if mode == "thread":
            check(session, fsync.synced, durability)
        else:
            assert fsync.synced == []  # the writer thread only sent the bytes
    if durability == "flush":
        assert fsyncs == {"thread": 0, "process": 0}
    else:
        assert fsyncs["process"] == fsyncs["thread"] > 0
