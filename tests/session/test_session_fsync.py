"""``durability="fsync"`` reaches the disk: every file a snapshot writes (the step file, and in
the store its chunks, blobs and pages) is fsynced once, before its folder is; every folder that
got a new entry is fsynced; the store is durable before a step file that points at it is;
whoever writes them (inline, the writer thread, the writer process). At ``durability="flush"``
nothing is.

The fsync comes in through the constructor (``SnapshotWriter(fsync=...)``, ``job.run(fsync)``):
a fake that still calls ``os.fsync`` and remembers what each call made durable. The writer
process is a program of its own that calls ``os.fsync`` itself: it reports how many fsyncs it
took, which must be as many as the writer thread took for the same snapshots.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from session_loops import Grows, payload

from rdagent_loop import LoopSettings
from rdagent_loop._session import Durability, SnapshotJob, SnapshotWriter, make_job
from rdagent_loop._session._format import read_manifest
from rdagent_loop._session._writer import process_available

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
    """The snapshots of 17 loops of ``Grows``, made as its ``dump()`` makes them: the
    history's entries are blobs, ``notes`` is cut into chunks, the loops' records go into
    pages (the first 16 sealed in the store). The same bytes at every call (the store's
    files are the same)."""
    loop = Grows(LoopSettings(trace_path=session.parent, progress=False), size=70_000)
    loop.notes = [payload(n, 0, 100) for n in range(1_000)]  # type: ignore[attr-defined]
    jobs = []
    for li in range(17):
        loop.loop_idx = li + 1
        for si, name in enumerate(loop.steps):
            if name == "record":
                loop.history.append(payload(li, si, 70_000))
                loop.notes.append(payload(li, si, 100))  # type: ignore[attr-defined]
            loop.step_idx[li] = si + 1
            loop.loop_prev_out[li][name] = payload(li, si, 1_000)
            path = session / str(li) / f"{si}_{name}"
            jobs.append(make_job(loop, path, durability=durability, key=None))
    return jobs


def pointed_at(step_file: Path) -> dict[str, list[Path]]:
    """The files of the store that ``step_file`` points at, by kind."""
    with step_file.open("rb") as f:
        fields = read_manifest(f, step_file, None).fields
    loops = fields["loops"]
    shas = {
        "chunk": [p[1] for _, pieces, _ in fields["attrs"] for p in pieces if len(p) > 1],
        "blob": [sha for _, _, refs in fields["attrs"] for sha, _ in refs],
        "page": [sha[0] for _, _, *sha in loops["open"] if sha]  # else in the step file
        + ([loops["chain"][1]] if loops["chain"] else []),
    }
    store = step_file.parent.parent / ".chunks"
    return {kind: [store / sha for sha in found] for kind, found in shas.items()}


def check(session: Path, synced: list[Identity], durability: Durability) -> None:
    """Each file under ``session`` fsynced once, and its folder after it; every folder fsynced;
    what a step file points at fsynced, and its folder, before the step file."""
    store = session / ".chunks"
    step_files = sorted(session.glob("*/*_*"))
    assert {p.name for p in step_files} == {"0_propose", "1_record"}
    kinds: dict[str, set[Path]] = {"chunk": set(), "blob": set(), "page": set()}
    for step_file in step_files:
        for kind, found in pointed_at(step_file).items():
            kinds[kind].update(found)
    assert all(kinds.values()), kinds  # every kind of file
    files = sorted(p for p in session.rglob("*") if p.is_file())
    assert files == sorted({*step_files, *kinds["chunk"], *kinds["blob"], *kinds["page"]})
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
    # the temporary files' folder is left out: its entries are renamed away, none stays
    folders = [session.parent, session, store, *(p for p in session.iterdir() if p.name.isdigit())]
    for folder_path in folders:  # each got a new entry: a folder, or a file
        assert identity(folder_path) in synced, f"the folder {folder_path} was never fsynced"
    store_synced = [i for i, x in enumerate(synced) if x == identity(store)]
    for step_file in step_files:
        at = synced.index(identity(step_file))
        for found in pointed_at(step_file).values():
            for file in found:
                written = synced.index(identity(file))
                assert any(written < n < at for n in store_synced), (
                    f"{step_file} was made durable before {file}, which it points at"
                )


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
@pytest.mark.skipif(not process_available(), reason="no writer process here")
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
            assert fsync.synced == []  # this process only sent the bytes
    if durability == "flush":
        assert fsyncs == {"thread": 0, "process": 0}
    else:
        assert fsyncs["process"] == fsyncs["thread"] > 0
