"""Snapshot files: atomic writes, verified reads, refusals, and the inspection API."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
from session_loops import Chain, OtherChain, Unrelated

import rdagent_loop._session._atomic as atomic
from rdagent_loop import (
    LoopBase,
    LoopSettings,
    SnapshotError,
    SnapshotInfo,
    SnapshotWarning,
    list_snapshots,
)

pytestmark = pytest.mark.anyio


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*_*") if p.is_file())


def leftovers(folder: Path) -> list[Path]:
    """Temporary files: there must be none once a write has failed or finished."""
    return [p for p in folder.rglob(".tmp-*")]


async def ran(settings: LoopSettings, loops: int = 1, cls: type[Chain] = Chain) -> Chain:
    loop = cls(settings)
    await loop.run(loop_n=loops)
    return loop


# -- the header --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, b"secret"])
def test_the_header_line_is_the_canonical_json_its_signature_covers(key: bytes | None) -> None:
    import json

    from rdagent_loop._session import _format

    header = _format.encode_header("snapshot", "m\u00e9:C", 12, "ab" * 32, key, (123, 4))
    assert header.startswith(_format.MAGIC) and header.endswith(b"\n")
    line = header[len(_format.MAGIC) : -1]
    fields = json.loads(line)
    assert line == _format._canonical(fields)  # written by hand, checked against the encoder
    mac = fields.pop("hmac", None)
    assert (mac is None) == (key is None)
    if key is not None:
        assert mac == _format._mac(key, fields)


# -- capture ----------------------------------------------------------------------------------


def test_a_capture_changes_the_switch_interval_only_to_take_a_torn_one_again() -> None:
    from rdagent_loop._session import consistently
    from rdagent_loop._session._capture import QUIET_INTERVAL

    before = sys.getswitchinterval()
    seen: list[float] = []

    def make() -> str:
        seen.append(sys.getswitchinterval())
        if len(seen) == 2:
            raise RuntimeError("dictionary changed size during iteration")
        return "picture"

    assert consistently(make) == "picture"  # not torn: the host's setting is left alone
    assert consistently(make) == "picture"  # torn, then taken again with threads held off
    assert seen == pytest.approx([before, before, max(QUIET_INTERVAL, before)])
    assert sys.getswitchinterval() == before


# -- atomic writes --------------------------------------------------------------------------


def test_a_failure_between_write_and_rename_leaves_no_file_and_the_previous_one_loads(
    settings: LoopSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = Chain(settings)
    loop.step_idx[0] = 1
    loop.dump(loop.session_folder / "0" / "0_s0")

    def fail(src: str, dst: str) -> None:
        raise OSError("killed between write and rename")

    monkeypatch.setattr(atomic, "_replace", fail)
    loop.step_idx[0] = 2
    with pytest.raises(OSError, match="between write and rename"):
        loop.dump(loop.session_folder / "0" / "1_s1")
    monkeypatch.undo()
    assert files(loop.session_folder) == [loop.session_folder / "0" / "0_s0"]
    assert leftovers(loop.session_folder) == []
    assert Chain.load(loop.session_folder).step_idx[0] == 1


@pytest.mark.parametrize("writer", ["process", "thread"])
async def test_a_failed_write_during_a_run_fails_the_run_and_keeps_the_session(
    settings: LoopSettings, writer: str
) -> None:
    settings = settings.model_copy(update={"snapshot_writer": writer})
    loop = Chain(settings)
    loop.session_folder.mkdir(parents=True)
    (loop.session_folder / "1").write_text("a file where loop 1's folder would go")
    with pytest.raises(NotADirectoryError) as caught:
        await loop.run(loop_n=3)
    notes = getattr(caught.value, "__notes__", [""])
    assert sys.version_info < (3, 11) or str(loop.session_folder / "1" / "0_s0") in notes[0]
    assert leftovers(loop.session_folder) == []
    assert [p.name for p in files(loop.session_folder)] == ["0_s0", "1_s1", "2_s2", "3_s3"]
    assert all(info.valid for info in list_snapshots(loop.session_folder))
    resumed = Chain.load(loop.session_folder)
    assert resumed.loop_prev_out[0]["s3"] == "s3@0"  # loop 0 is whole, outputs file and all
    assert (loop.session_folder / "1").read_text().startswith("a file")


def test_an_unpicklable_attribute_fails_the_dump_and_leaves_the_previous_snapshot(
    settings: LoopSettings,
) -> None:
    loop = Chain(settings)
    loop.step_idx[0] = 1
    loop.dump(loop.session_folder / "0" / "0_s0")
    loop.lock = __import__("threading").Lock()  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="lock"):
        loop.dump(loop.session_folder / "0" / "1_s1")
    assert files(loop.session_folder) == [loop.session_folder / "0" / "0_s0"]
    assert leftovers(loop.session_folder) == []
    assert Chain.load(loop.session_folder).step_idx[0] == 1


async def test_a_truncated_newest_snapshot_is_skipped_with_a_warning_naming_it(
    settings: LoopSettings,
) -> None:
    loop = await ran(settings)
    newest = list_snapshots(loop.session_folder)[-1].path
    assert newest.name == "3_s3"
    newest.write_bytes(newest.read_bytes()[:-10])
    with pytest.warns(SnapshotWarning, match=str(newest)):
        resumed = Chain.load(loop.session_folder)
    assert resumed.step_idx[0] == 3
    with pytest.raises(SnapshotError, match="truncated"):
        Chain.load(newest)
    info = list_snapshots(loop.session_folder)[-1]
    assert (info.path, info.valid) == (newest, False)
    assert "truncated" in (info.problem or "")


async def test_a_damaged_chunk_is_caught_by_its_hash(settings: LoopSettings) -> None:
    loop = Chain(settings)
    loop.big = os.urandom(200_000)  # type: ignore[attr-defined]
    await loop.run(loop_n=1)
    chunks = sorted((loop.session_folder / ".chunks").iterdir())
    assert chunks
    for chunk in chunks:
        data = bytearray(chunk.read_bytes())
        data[100] ^= 0xFF
        chunk.write_bytes(bytes(data))
    newest = list_snapshots(loop.session_folder)[-1].path
    with pytest.raises(SnapshotError, match="does not match its hash"):
        Chain.load(newest)
    infos = list_snapshots(loop.session_folder, deep=True)
    assert not infos[-1].valid
    valid = [i for i in infos if i.valid]  # early snapshots may hold all their bytes inline
    if valid:
        with pytest.warns(SnapshotWarning):
            resumed = Chain.load(loop.session_folder)
        assert resumed.step_idx[0] == valid[-1].step_idx + 1
    else:
        with pytest.warns(SnapshotWarning), pytest.raises(FileNotFoundError, match="no valid"):
            Chain.load(loop.session_folder)


def test_no_snapshot_at_all_is_a_file_not_found_error_naming_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "trace" / "__session__"
    folder.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=str(folder)):
        Chain.load(folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Chain.load(tmp_path / "nowhere")


# -- foreign and tampered files -------------------------------------------------------------


class _Plant:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.target), "w"))


def test_a_raw_pickle_is_never_unpickled(tmp_path: Path) -> None:
    target = tmp_path / "planted"
    folder = tmp_path / "trace" / "__session__"
    (folder / "0").mkdir(parents=True)
    raw = folder / "0" / "0_s0"
    raw.write_bytes(pickle.dumps(_Plant(target)))
    with pytest.raises(SnapshotError, match="not an rdagent_loop snapshot"):
        Chain.load(raw)
    with pytest.warns(SnapshotWarning, match="0_s0"), pytest.raises(FileNotFoundError):
        Chain.load(tmp_path / "trace")
    [info] = list_snapshots(tmp_path / "trace")
    assert not info.valid
    assert not target.exists()


async def test_a_file_with_a_tampered_body_is_never_unpickled(settings: LoopSettings) -> None:
    loop = await ran(settings)
    newest = list_snapshots(loop.session_folder)[-1].path
    data = newest.read_bytes()
    newest.write_bytes(data[:-3] + bytes(b ^ 0x55 for b in data[-3:]))
    with pytest.raises(SnapshotError, match="checksum"):
        Chain.load(newest)


async def test_with_a_signing_key_a_wrong_or_missing_signature_is_refused(
    settings: LoopSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed = settings.model_copy(update={"signing_key": "right key"})
    loop = await ran(signed)
    newest = list_snapshots(loop.session_folder, settings=signed)[-1].path
    assert Chain.load(newest, settings=signed).step_idx[0] == 4
    wrong = settings.model_copy(update={"signing_key": "wrong key"})
    with pytest.raises(SnapshotError, match="signature"):
        Chain.load(newest, settings=wrong)
    # the key of LoopSettings() (the environment) is used when no settings are given
    monkeypatch.setenv("RDAGENT_LOOP_SIGNING_KEY", "wrong key")
    with pytest.raises(SnapshotError, match="signature"):
        Chain.load(newest)
    monkeypatch.setenv("RDAGENT_LOOP_SIGNING_KEY", "right key")
    resumed = Chain.load(newest)
    assert resumed.settings.signing_key is not None  # it keeps signing what it writes
    # a header changed by hand (the class it names) breaks the signature
    data = newest.read_bytes()
    newest.write_bytes(data.replace(b"session_loops:Chain", b"session_loops:Chaim", 1))
    with pytest.raises(SnapshotError, match="signature"):
        Chain.load(newest)
    # unsigned files are refused when a key is configured
    unsigned = await ran(settings.model_copy(update={"trace_path": settings.trace_path / "u"}))
    with pytest.raises(SnapshotError, match="not signed"):
        Chain.load(list_snapshots(unsigned.session_folder, settings=settings)[-1].path)
    assert not any(i.valid for i in list_snapshots(unsigned.session_folder))
    # the key itself is never written to disk
    for path in loop.session_folder.rglob("*"):
        assert not path.is_file() or b"right key" not in path.read_bytes()


async def test_a_snapshot_of_another_class_is_refused_naming_both(settings: LoopSettings) -> None:
    loop = await ran(settings)
    newest = list_snapshots(loop.session_folder)[-1].path
    with pytest.raises(SnapshotError, match=r"session_loops:Chain.*session_loops:Unrelated"):
        Unrelated.load(newest)
    with pytest.raises(SnapshotError, match=r"session_loops:Chain.*session_loops:OtherChain"):
        OtherChain.load(loop.session_folder)
    assert isinstance(LoopBase.load(newest), Chain)  # a subclass of the class asked for is fine
    other = await ran(
        settings.model_copy(update={"trace_path": settings.trace_path / "o"}), 1, OtherChain
    )
    assert type(Chain.load(other.session_folder)) is OtherChain


_VANISHING = """
from rdagent_loop import LoopBase

class Vanishing(LoopBase):
    def only(self, prev_out):
        return 1

class Gadget:
    pass
"""


def test_a_class_whose_module_is_gone_is_an_error_naming_snapshot_class_and_module(
    settings: LoopSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "vanishing_mod.py").write_text(_VANISHING)
    monkeypatch.syspath_prepend(str(tmp_path))
    import vanishing_mod

    loop = vanishing_mod.Vanishing(settings)
    file = loop.session_folder / "0" / "0_only"
    loop.dump(file)
    holder = Chain(settings)
    holder.gadget = vanishing_mod.Gadget()  # type: ignore[attr-defined]
    other = holder.session_folder / "1" / "0_s0"
    holder.dump(other)
    monkeypatch.delitem(sys.modules, "vanishing_mod")
    (tmp_path / "vanishing_mod.py").unlink()
    with pytest.raises(SnapshotError) as caught:
        LoopBase.load(file)
    message = str(caught.value)
    assert str(file) in message
    assert "vanishing_mod:Vanishing" in message
    assert "'vanishing_mod' cannot be imported" in message
    with pytest.raises(SnapshotError, match=r"attribute 'gadget'.*vanishing_mod"):
        Chain.load(other)
    # listing needs no import: the snapshot is intact
    assert all(i.valid for i in list_snapshots(settings.trace_path))


def test_a_renamed_class_is_an_error_naming_it(
    settings: LoopSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "renaming_mod.py").write_text(_VANISHING)
    monkeypatch.syspath_prepend(str(tmp_path))
    import renaming_mod

    loop = renaming_mod.Vanishing(settings)
    file = loop.session_folder / "0" / "0_only"
    loop.dump(file)
    monkeypatch.delattr(renaming_mod, "Vanishing")
    with pytest.raises(SnapshotError, match=r"has no 'Vanishing'.*renamed"):
        LoopBase.load(file)


# -- inspection -------------------------------------------------------------------------


async def test_list_snapshots_reports_every_file_without_unpickling(
    settings: LoopSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = await ran(settings.model_copy(update={"step_semaphore": 2}), loops=2)
    broken = loop.session_folder / "1" / "0_s0"
    broken.write_bytes(b"garbage")

    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("list_snapshots unpickled something")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
    infos = list_snapshots(settings.trace_path)
    monkeypatch.undo()
    assert len(infos) == 8
    assert all(isinstance(i, SnapshotInfo) for i in infos)
    assert [i.written_at_ns for i in infos] == sorted(i.written_at_ns for i in infos)
    bad = [i for i in infos if not i.valid]
    assert [(i.loop_idx, i.step_idx, i.step_name) for i in bad] == [(1, 0, "s0")]
    assert "magic" in (bad[0].problem or "")
    good = [i for i in infos if i.valid]
    assert all(i.cls == "session_loops:Chain" and i.size > 0 and i.state_size > 0 for i in good)
    assert all(i.written_at.tzinfo is not None for i in infos)
    with pytest.raises(AttributeError):
        good[0].valid = False  # type: ignore[misc]


def test_a_dump_outside_a_session_holds_all_its_bytes(
    settings: LoopSettings, tmp_path: Path
) -> None:
    loop = Chain(settings)
    loop.big = os.urandom(300_000)  # type: ignore[attr-defined]
    loop.dump(tmp_path / "elsewhere.snapshot")
    assert not (tmp_path / ".chunks").exists()
    assert Chain.load(tmp_path / "elsewhere.snapshot").big == loop.big  # type: ignore[attr-defined]


async def test_a_damaged_outputs_file_of_a_finished_loop_is_refused_on_access(
    settings: LoopSettings,
) -> None:
    loop = await ran(settings, loops=2)
    [outputs] = (loop.session_folder / "0").glob("outputs-*")
    data = bytearray(outputs.read_bytes())
    data[-5] ^= 0xFF
    outputs.write_bytes(bytes(data))
    resumed = Chain.load(loop.session_folder)  # the snapshot itself is intact
    assert resumed.loop_prev_out[1]["s3"] == "s3@1"
    with pytest.raises(SnapshotError, match=r"finished loop 0.*checksum"):
        resumed.loop_prev_out[0]


async def test_memory_for_finished_loops_stays_bounded(settings: LoopSettings) -> None:
    from rdagent_loop._finished import FinishedLoops

    loop = await ran(settings, loops=FinishedLoops.cache_size * 3)
    archive = loop._finished
    assert len(archive._cache) <= FinishedLoops.cache_size
    assert archive._pending == {}  # everything is on disk once run() has returned
    assert loop.loop_prev_out._live == {}
    assert [loop.loop_prev_out[li]["s0"] for li in range(3)] == ["s0@0", "s0@1", "s0@2"]
