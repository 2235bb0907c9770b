"""Snapshots and resume: SCENARIOS.md 21-29, checkout, the timer, flat cost and flat disk."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import trio
from looplib import run_cancelled_after, virtual_clock_params
from session_loops import (
    Chain,
    Crowded,
    Grows,
    KeepsKnowledge,
    Steady,
    Withdraws,
)

from rdagent_loop import LoopSettings, list_snapshots
from rdagent_loop._current import run_of
from rdagent_loop._session._format import read_manifest

pytestmark = pytest.mark.anyio


def files(loop: Chain | Grows) -> list[Path]:
    return sorted(p for p in loop.session_folder.glob("*/*_*") if p.is_file())


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def with_(settings: LoopSettings, **changes: object) -> LoopSettings:
    return settings.model_copy(update=changes)


# -- SCENARIOS.md 21-29 ---------------------------------------------------------------------


async def test_21_every_snapshot_points_at_the_next_step(settings: LoopSettings) -> None:
    loop = Chain(with_(settings, step_semaphore=2))
    await loop.run(loop_n=3)
    assert len(files(loop)) == 12
    for file in files(loop):
        li, si = int(file.parent.name), int(file.name.split("_")[0])
        restored = Chain.load(file)
        assert restored.step_idx[li] == si + 1
        assert restored.loop_prev_out[li][f"s{si}"] == f"s{si}@{li}"


@pytest.mark.parametrize("anyio_backend", virtual_clock_params())
async def test_23_a_cancelled_step_is_not_marked_done_in_memory_or_on_disk(
    settings: LoopSettings,
) -> None:
    # the thread writer: a run waits for a writer process to start, and a virtual clock
    # jumps while it waits on a real process (past this test's 2.5 s)
    loop = Chain(settings.model_copy(update={"snapshot_writer": "thread"}), delay=1)
    # s0 ends at 1 s, s1 at 2 s; s2 is cancelled half-way (the 2.5 s count from s0's start)
    await run_cancelled_after(loop, 2.5, loop_n=1)
    assert loop.step_idx[0] == 2
    assert [p.name for p in files(loop)] == ["0_s0", "1_s1"]
    assert Chain.load(loop.session_folder).step_idx[0] == 2
    await loop.run()
    assert [name for _, name in loop.executed] == ["s0", "s1", "s2", "s3"]


def test_24_saving_while_a_thread_mutates_a_big_dict_never_fails(settings: LoopSettings) -> None:
    loop = Crowded(settings)
    stop = threading.Event()
    churn = threading.Thread(target=loop._churn, args=(stop,))
    churn.start()
    try:
        for i in range(40):
            loop.step_idx[i] = 1
            loop.dump(loop.session_folder / str(i) / "0_start")
    finally:
        stop.set()
        churn.join()
    infos = list_snapshots(loop.session_folder)
    assert len(infos) == 40
    assert all(i.valid for i in infos)
    restored = Crowded.load(infos[-1].path)
    assert 0 < len(restored.crowd) <= 4000


async def test_24_saving_beside_a_thread_step_never_fails(settings: LoopSettings) -> None:
    loop = Crowded(with_(settings, step_semaphore=3, step_executor={"mutate": "thread"}))
    await loop.run(loop_n=12)
    infos = list_snapshots(loop.session_folder)
    assert len(infos) == 36
    assert all(i.valid for i in infos)


def test_a_capture_is_taken_again_when_a_mutation_slipped_in() -> None:
    from rdagent_loop._session import without_tearing

    attempts = []

    def make() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return "picture"

    assert without_tearing(make) == "picture"
    assert len(attempts) == 2
    with pytest.raises(RuntimeError, match="other"):
        without_tearing(lambda: (_ for _ in ()).throw(RuntimeError("other")))


async def test_25_checkout_to_a_copy_writes_only_into_the_copy(
    settings: LoopSettings, tmp_path: Path
) -> None:
    loop = Grows(settings)
    await loop.run(loop_n=3)
    before = tree_digest(loop.session_folder)
    middle = loop.session_folder / "1" / "0_propose"
    fork = Grows.load(middle, checkout=tmp_path / "fork")
    assert fork.session_folder == tmp_path / "fork" / "__session__"
    assert fork.settings.trace_path == tmp_path / "fork"
    assert fork.loop_prev_out[0]["record"] == 1  # finished loops stay readable in the fork
    await fork.run(loop_n=2)
    assert tree_digest(loop.session_folder) == before
    names = sorted(str(p.relative_to(fork.session_folder)) for p in files(fork))  # type: ignore[arg-type]
    assert names == ["1/0_propose", "1/1_record", "2/0_propose", "2/1_record"]
    resumed = Grows.load(tmp_path / "fork")
    assert len(resumed.history) == 3
    assert all(resumed.loop_prev_out[li]["record"] == li + 1 for li in range(3))


def test_26_a_dump_that_fails_half_way_leaves_the_previous_snapshot(
    settings: LoopSettings,
) -> None:
    loop = Chain(settings)
    loop.step_idx[0] = 1
    loop.dump(loop.session_folder / "0" / "0_s0")
    loop.unpicklable = lambda: None  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="pickle"):
        loop.dump(loop.session_folder / "0" / "1_s1")
    assert [p.name for p in files(loop)] == ["0_s0"]
    assert not list(loop.session_folder.rglob(".tmp-*"))
    assert Chain.load(loop.session_folder).step_idx[0] == 1


def test_27_load_picks_the_newest_snapshot_by_time_of_writing(settings: LoopSettings) -> None:
    loop = Chain(with_(settings, step_semaphore=2))
    loop.step_idx.update({0: 3, 1: 1})
    loop.loop_idx = 2
    loop.dump(loop.session_folder / "1" / "0_s0")
    loop.step_idx[0] = 3
    loop.loop_prev_out[0]["s2"] = "s2@0"
    loop.dump(loop.session_folder / "0" / "2_s2")  # written after 1/0_s0
    newest = Chain.load(loop.session_folder)
    assert newest.loop_prev_out[0]["s2"] == "s2@0"
    # and the other way round: the larger name written first is not the newest
    loop.loop_prev_out[1]["s0"] = "s0@1"
    loop.dump(loop.session_folder / "1" / "0_s0")
    assert Chain.load(loop.session_folder).loop_prev_out[1]["s0"] == "s0@1"


def test_28_running_twice_works_in_new_event_loops(settings: LoopSettings) -> None:
    loop = Chain(settings)
    assert asyncio.run(loop.run(loop_n=1)).loops == 1
    assert trio.run(lambda: loop.run(loop_n=1)).loops == 1
    assert asyncio.run(loop.run(loop_n=1)).loops == 1
    assert loop.loop_idx == 3
    assert len(files(loop)) == 12
    resumed = Chain.load(loop.session_folder)
    assert [resumed.loop_prev_out[li]["s3"] for li in range(3)] == ["s3@0", "s3@1", "s3@2"]


async def test_29_withdraw_restores_cleanly_from_disk(settings: LoopSettings) -> None:
    Withdraws.tries, Withdraws.cancelled = {}, []
    loop = Withdraws(with_(settings, step_semaphore=2))
    summary = await loop.run(loop_n=2)
    assert summary.reason == "loop_n"
    assert Withdraws.cancelled == [0]  # the sibling in flight was cancelled
    for li in range(2):
        assert loop.loop_prev_out[li]["s2"] == f"s2@{li}"
    infos = list_snapshots(loop.session_folder)
    assert all(i.valid for i in infos)
    resumed = Withdraws.load(loop.session_folder)
    assert dict(resumed.step_idx) == {0: 3, 1: 3}
    assert [resumed.loop_prev_out[li]["s1"] for li in range(2)] == ["s1@0", "s1@1"]


# -- checkout, timer, overrides -------------------------------------------------------------


async def test_checkout_true_deletes_the_snapshots_written_later(settings: LoopSettings) -> None:
    loop = Chain(with_(settings, step_semaphore=2))
    await loop.run(loop_n=2)
    infos = list_snapshots(loop.session_folder)
    kept = loop.session_folder / "0" / "1_s1"
    order = [i.path for i in infos]
    later = set(order[order.index(kept) + 1 :])
    resumed = Chain.load(kept, checkout=True)
    assert set(files(loop)) == set(order) - later
    await resumed.run()
    assert all(i.valid for i in list_snapshots(loop.session_folder))
    assert dict(Chain.load(loop.session_folder).step_idx) == {0: 4, 1: 4}


async def test_the_remaining_time_survives_a_resume(settings: LoopSettings) -> None:
    loop = Chain(settings, delay=0.02)
    await loop.run(loop_n=1, all_duration="1h")
    left = Chain.load(loop.session_folder).timer.remain_time()
    assert left is not None
    assert timedelta(minutes=59) < left < timedelta(hours=1)
    fresh = Chain.load(loop.session_folder, replace_timer=False)
    assert fresh.timer.remain_time() is None


async def test_a_dump_override_drops_an_attribute_and_load_can_extend(
    settings: LoopSettings,
) -> None:
    loop = KeepsKnowledge(settings)
    await loop.run(loop_n=1)
    assert loop.knowledge == b"k" * 1_000_000  # put back after every dump
    assert all(i.state_size < 100_000 for i in list_snapshots(loop.session_folder))
    assert KeepsKnowledge.load(loop.session_folder).knowledge == b"reloaded"


async def test_a_resumed_run_repeats_no_step_and_skips_none(settings: LoopSettings) -> None:
    loop = Chain(settings)
    await loop.run(step_n=6)  # loop 0 done, loop 1 half way
    resumed = Chain.load(loop.session_folder)
    resumed.executed = []
    await resumed.run(loop_n=1)
    assert resumed.executed == [(1, "s2"), (1, "s3")]


# -- flat cost and flat disk ----------------------------------------------------------------


def loops_of(file: Path) -> dict[str, Any]:
    """Where step file ``file`` says the loop records are: sealed pages and open pages."""
    with file.open("rb") as f:
        loops: dict[str, Any] = read_manifest(f, file, None).fields["loops"]
    return loops


async def test_finished_loops_records_are_sealed_once_and_read_back(
    settings: LoopSettings,
) -> None:
    loop = Grows(settings, size=30_000)
    await loop.run(loop_n=20)
    infos = list_snapshots(loop.session_folder)
    pages = [loops_of(info.path) for info in infos]
    # loops 0..15 are sealed in one page, once, when the last of them finished; every later
    # snapshot points at that same page and writes only the open page of loops 16..19
    sealed = [n for n, p in enumerate(pages) if p["sealed"]]
    assert sealed, "loops 0..15 were never sealed"
    first = sealed[0]
    assert (infos[first].loop_idx, infos[first].step_idx) == (15, 1)
    assert all(p["sealed"] == 0 and p["chain"] is None for p in pages[:first])
    assert all(p["sealed"] == 1 and p["chain"] == pages[first]["chain"] for p in pages[first:])
    assert all([page for page, *_ in p["open"]] == [1] for p in pages[first + 1 :])
    resumed = Grows.load(loop.session_folder)
    for li in range(20):
        assert resumed.loop_prev_out[li]["propose"] == loop.loop_prev_out[li]["propose"]
        assert [t.step_name for t in resumed.loop_trace[li]] == ["propose", "record"]
    assert 0 in resumed.loop_prev_out and 99 not in resumed.loop_prev_out
    assert list(resumed.loop_prev_out) == list(range(20))


async def test_snapshot_size_does_not_grow_with_finished_loops(settings: LoopSettings) -> None:
    loop = Steady(settings, size=30_000)
    await loop.run(loop_n=60)
    infos = {(i.loop_idx, i.step_idx): i for i in list_snapshots(loop.session_folder)}
    early, late = infos[(5, 0)], infos[(53, 0)]  # the same place in their pages of 16
    assert late.state_size < early.state_size * 1.1, (early, late)
    assert late.size < early.size + 200, (early, late)  # the step file, loop records' refs and all


async def test_disk_grows_with_new_state_not_with_snapshots(settings: LoopSettings) -> None:
    loop = Grows(settings, size=50_000)
    await loop.run(loop_n=30)
    usage = sum(p.stat().st_size for p in loop.session_folder.rglob("*") if p.is_file())
    new = 2 * 30 * 50_000  # what the run made: history added to self, and the outputs
    assert usage < 3 * new, usage  # the old engine wrote snapshots x state: 60 x 0.8 MB
    infos = list_snapshots(loop.session_folder, deep=True)
    assert len(infos) == 60
    assert all(i.valid for i in infos)
    for info in infos:  # every snapshot stays loadable
        restored = Grows.load(info.path)
        assert len(restored.history) == info.loop_idx + info.step_idx


class SeesTheWriter(Chain):
    """Notes, in its last step, the snapshot writer processes the run has started."""

    async def s3(self, prev_out: dict[str, Any]) -> str:
        run = run_of(self)
        assert run is not None
        await run.writer.drain()  # its thread has started the writer process, if there is one
        self.writers = await anyio.to_thread.run_sync(_writer_processes)
        return await super().s3(prev_out)


def _writer_processes() -> list[int]:
    return [
        child.pid
        for child in psutil.Process().children()
        if any(arg.endswith("_disk_worker.py") for arg in child.cmdline())
    ]


@pytest.mark.parametrize("writer", ["auto", "thread"])
async def test_snapshots_are_written_off_the_event_loop_thread(
    settings: LoopSettings, writer: str
) -> None:
    import rdagent_loop._session._atomic as atomic

    event_loop_thread = threading.get_ident()
    writers: set[int] = set()  # the threads of this process that put a file in place
    real = atomic._replace

    def spy(src: str, dst: str) -> None:
        writers.add(threading.get_ident())
        real(src, dst)

    atomic._replace = spy  # type: ignore[assignment]
    loop = SeesTheWriter(settings.model_copy(update={"snapshot_writer": writer}))
    try:
        await loop.run(loop_n=1)
    finally:
        atomic._replace = real  # type: ignore[assignment]
    assert [p.name for p in files(loop)] == ["0_s0", "1_s1", "2_s2", "3_s3"]
    if writer == "thread":  # worker threads (AnyIO's), never the event loop's
        assert writers and event_loop_thread not in writers
        assert loop.writers == []
    else:  # one writer process, no file written by a thread of this process
        assert writers == set()
        assert len(loop.writers) == 1
        assert not psutil.pid_exists(loop.writers[0])  # waited for, when the run ended


async def test_a_session_loaded_by_a_relative_path_continues_in_an_absolute_folder(
    settings: LoopSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = Chain(settings)
    await loop.run(loop_n=1)
    monkeypatch.chdir(loop.session_folder.parent.parent)
    resumed = Chain.load(Path(loop.session_folder.parent.name))
    assert resumed.session_folder.is_absolute()
    assert resumed.session_folder == loop.session_folder
