"""Snapshot files: atomic writes, verified reads, refusals, and the inspection API."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread
import pytest
from session_loops import Chain, OtherChain, Unrelated, payload

import rdagent_loop._session._atomic as atomic
from rdagent_loop import (
    LoopBase,
    LoopSettings,
    SnapshotError,
    SnapshotInfo,
    SnapshotWarning,
    list_snapshots,
)
from rdagent_loop._current import run_of
from rdagent_loop._session._format import FOOTER, MAGIC, Manifest, encode_tail, read_manifest

pytestmark = pytest.mark.anyio


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*_*") if p.is_file())


def leftovers(folder: Path) -> list[Path]:
    """Temporary files (in ``.tmp``): there must be none once a write has failed or finished."""
    return [p for p in folder.rglob(".tmp-*")]


def manifest(file: Path, key: bytes | None = None) -> Manifest:
    with file.open("rb") as f:
        return read_manifest(f, file, key)


def canonical(fields: dict[str, Any]) -> bytes:
    """The JSON a manifest line must be: keys sorted, no spaces (written here independently)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def flipped(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x55]) + data[at + 1 :]


async def ran(settings: LoopSettings, loops: int = 1, cls: type[Chain] = Chain) -> Chain:
    loop = cls(settings)
    await loop.run(loop_n=loops)
    return loop


# -- the manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, b"secret"])
def test_the_manifest_line_is_the_canonical_json_its_signature_covers(key: bytes | None) -> None:
    fields = {
        "format": 3,
        "cls": "m\u00e9:C",
        "written_at_ns": 123,
        "seq": 4,
        "z": [{"b": 1, "a": 2}],
    }
    tail = encode_tail(fields, key)
    assert tail.endswith(MAGIC)
    line = tail[:-FOOTER]
    assert int.from_bytes(tail[-FOOTER : -FOOTER + 8], "big") == len(line)
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    parsed = json.loads(line)
    assert line[:-1] == canonical(parsed)  # a verifier that parses and encodes again agrees
    mac = parsed.pop("hmac", None)
    assert parsed == fields
    assert (mac is None) == (key is None)
    if key is not None:
        assert mac == hmac.new(key, canonical(fields), hashlib.sha256).hexdigest()


def test_a_step_files_manifest_is_canonical_and_signed_over_everything_else_on_its_line(
    settings: LoopSettings,
) -> None:
    loop = Chain(settings.model_copy(update={"signing_key": "k"}))
    loop.step_idx[0] = 1
    file = loop.session_folder / "0" / "0_s0"
    loop.dump(file)
    data = file.read_bytes()
    assert data.endswith(MAGIC)
    found = manifest(file, b"k")  # accepted with the key
    line = data[found.body_end : -FOOTER]
    assert int.from_bytes(data[-FOOTER : -FOOTER + 8], "big") == len(line)
    fields = json.loads(line)
    assert line[:-1] == canonical(fields)
    mac = fields.pop("hmac")
    assert mac == hmac.new(b"k", canonical(fields), hashlib.sha256).hexdigest()
    assert fields["body_sha256"] == hashlib.sha256(data[: found.body_end]).hexdigest()


# -- capture ----------------------------------------------------------------------------------


def test_a_capture_changes_the_switch_interval_only_to_take_a_torn_one_again() -> None:
    from rdagent_loop._session import without_tearing
    from rdagent_loop._session._capture import QUIET_INTERVAL

    before = sys.getswitchinterval()
    seen: list[float] = []

    def make() -> str:
        seen.append(sys.getswitchinterval())
        if len(seen) == 2:
            raise RuntimeError("dictionary changed size during iteration")
        return "picture"

    assert without_tearing(make) == "picture"  # not torn: the host's setting is left alone
    assert without_tearing(make) == "picture"  # torn, then taken again with threads held off
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
    loop.big = os.urandom(100_000)  # type: ignore[attr-defined]  # a blob, not written either
    with pytest.raises(OSError, match="between write and rename"):
        loop.dump(loop.session_folder / "0" / "1_s1")
    monkeypatch.undo()
    assert files(loop.session_folder) == [loop.session_folder / "0" / "0_s0"]
    assert leftovers(loop.session_folder) == []
    assert Chain.load(loop.session_folder).step_idx[0] == 1
    # what the failed dump meant to store is stored by the next one: it loads in full
    loop.dump(loop.session_folder / "0" / "1_s1")
    assert all(i.valid for i in list_snapshots(loop.session_folder, deep=True))
    assert Chain.load(loop.session_folder).step_idx[0] == 2


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
    assert resumed.loop_prev_out[0]["s3"] == "s3@0"  # loop 0 is whole, its records and all
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


class Stored(Chain):
    """A chain whose state has a large ``bytes`` value (a blob in the store) and a large
    attribute of small values (cut into chunks in the store)."""

    def __init__(self, settings: LoopSettings | None = None) -> None:
        super().__init__(settings)
        self.big = os.urandom(200_000)
        self.many = [os.urandom(100) for _ in range(2_000)]


def stored_files(file: Path, kind: str) -> list[Path]:
    """The files of the store that step file ``file`` points at: its ``chunk`` pieces, its
    ``blob`` values, or its ``page`` of loop records."""
    fields = manifest(file).fields
    if kind == "chunk":
        shas = [p[1] for _, pieces, _ in fields["attrs"] for p in pieces if len(p) > 1]
    elif kind == "blob":
        shas = [sha for _, _, refs in fields["attrs"] for sha, _ in refs]
    else:
        loops = fields["loops"]
        shas = [sha[0] for _, _, *sha in loops["open"] if sha] + (
            [loops["chain"][1]] if loops["chain"] else []
        )
    return [file.parent.parent / ".chunks" / sha for sha in shas]


@pytest.mark.parametrize("kind", ["chunk", "blob"])
async def test_a_damaged_file_of_the_store_is_caught_by_its_hash(
    settings: LoopSettings, kind: str
) -> None:
    loop = Stored(settings)
    await loop.run(loop_n=1)
    newest = list_snapshots(loop.session_folder)[-1].path
    damaged = stored_files(newest, kind)
    assert damaged
    for file in damaged:
        data = file.read_bytes()
        file.write_bytes(flipped(data, len(data) // 2))
    with pytest.raises(SnapshotError, match="does not match its hash") as caught:
        Chain.load(newest)
    assert str(newest) in str(caught.value) and str(damaged[0].parent) in str(caught.value)
    infos = list_snapshots(loop.session_folder, deep=True)
    assert not infos[-1].valid
    valid = [i for i in infos if i.valid]  # early snapshots may not point at the damaged ones
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
    with pytest.raises(SnapshotError, match="not a complete rdagent_loop snapshot"):
        Chain.load(raw)
    with pytest.warns(SnapshotWarning, match="0_s0"), pytest.raises(FileNotFoundError):
        Chain.load(tmp_path / "trace")
    [info] = list_snapshots(tmp_path / "trace")
    assert not info.valid
    assert not target.exists()


@pytest.mark.parametrize("where", ["stub", "inline"])
async def test_a_file_with_a_tampered_body_is_refused_and_never_unpickled(
    settings: LoopSettings, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    loop = await ran(settings)
    newest = list_snapshots(loop.session_folder)[-1].path
    found = manifest(newest)
    # the stub is the pickle a plain pickle.load runs; the inline bytes are the attributes
    at = found.body_offset // 2 if where == "stub" else (found.body_offset + found.body_end) // 2
    newest.write_bytes(flipped(newest.read_bytes(), at))

    def no_unpickling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a tampered file was unpickled")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "Unpickler", no_unpickling)
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
    # a manifest changed by hand (the class it names) breaks the signature
    data = newest.read_bytes()
    found = manifest(newest)
    end = found.body_end
    assert data[end:].count(b"session_loops:Chain") == 1
    # (its checksum recomputed, as anyone could: only the HMAC needs the key)
    renamed = json.loads(data[end:-FOOTER])
    renamed["cls"] = renamed["cls"].replace("session_loops:Chain", "session_loops:Chaim")
    newest.write_bytes(data[:end] + encode_tail(renamed, None))
    with pytest.raises(SnapshotError, match="signature"):
        Chain.load(newest)
    # so does a body changed with the checksum that the manifest gives for it
    fields = json.loads(data[end:-FOOTER])
    body = flipped(data[:end], (found.body_offset + end) // 2)
    fields["body_sha256"] = hashlib.sha256(body).hexdigest()
    newest.write_bytes(body + encode_tail(fields, None))  # the old HMAC kept
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
    broken.write_bytes(b"garbage" * 10)

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
    assert "not a complete rdagent_loop snapshot" in (bad[0].problem or "")
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
    assert not (tmp_path / ".chunks").exists() and not (tmp_path / ".tmp").exists()
    assert Chain.load(tmp_path / "elsewhere.snapshot").big == loop.big  # type: ignore[attr-defined]


async def test_a_damaged_page_of_finished_loops_is_refused_naming_it(
    settings: LoopSettings,
) -> None:
    loop = await ran(settings, loops=20)  # loops 0..15 finished: their records are sealed
    infos = list_snapshots(loop.session_folder)
    newest = infos[-1].path
    sealed = manifest(newest).fields["loops"]["chain"]
    assert sealed is not None
    page = loop.session_folder / ".chunks" / sealed[1]
    data = bytearray(page.read_bytes())
    data[-5] ^= 0xFF  # in the pickled record of loop 15
    page.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="does not match its hash") as caught:
        Chain.load(newest)
    assert str(newest) in str(caught.value) and str(page) in str(caught.value)
    # the snapshots that point at the page are skipped, each named; an older one loads
    pointing = [i.path for i in infos if manifest(i.path).fields["loops"]["chain"] == sealed]
    with pytest.warns(SnapshotWarning) as warned:
        resumed = Chain.load(loop.session_folder)
    skipped = [str(w.message) for w in warned if issubclass(w.category, SnapshotWarning)]
    assert len(skipped) == len(pointing)
    assert str(newest) in skipped[0] and str(page) in skipped[0]
    older = infos[len(infos) - len(pointing) - 1]
    assert older.path not in pointing
    assert resumed.step_idx[older.loop_idx] == older.step_idx + 1
    assert resumed.loop_prev_out[0]["s3"] == "s3@0"  # read from the page before it was sealed
    assert not list_snapshots(loop.session_folder, deep=True)[-1].valid


class Paged(LoopBase):
    """Two steps, each with a 2 kB output. Each step first waits until every snapshot before
    it is on disk, and notes how many bytes the store holds then (in ``sizes``, outside the
    loop's state)."""

    sizes: ClassVar[list[int]] = []

    async def _measure(self) -> None:
        run = run_of(self)
        assert run is not None
        await run.writer.drain()
        store = self.session_folder / ".chunks"
        self.sizes.append(await anyio.to_thread.run_sync(store_bytes, store))

    async def propose(self, prev_out: dict[str, Any]) -> bytes:
        await self._measure()
        return payload(prev_out[self.LOOP_IDX_KEY], 0, 2_000)

    async def record(self, prev_out: dict[str, Any]) -> int:
        await self._measure()
        return int(prev_out[self.LOOP_IDX_KEY])


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.iterdir()) if store.is_dir() else 0


async def test_a_step_costs_the_same_whatever_the_number_of_finished_loops(
    settings: LoopSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a snapshot pickles the records of the loop it saves a step of, not of the others; its
    # step file, and the bytes it adds to the store, are the same at loop 60 as at loop 5:
    # finished loops are sealed in pages, written once
    from rdagent_loop._session._pages import LoopPages

    pickled: list[list[int]] = []
    real = LoopPages.pickle_records

    def spy(pages: LoopPages, maps: Any, touched: set[int], blobs: Any) -> Any:
        pickled.append(sorted(touched))
        return real(pages, maps, touched, blobs)

    monkeypatch.setattr(LoopPages, "pickle_records", spy)
    Paged.sizes = []
    loop = Paged(settings)
    await loop.run(loop_n=64)
    assert pickled == [[li] for li in range(64) for _ in range(2)]
    sizes = [*Paged.sizes, store_bytes(loop.session_folder / ".chunks")]
    added = [after - before for before, after in itertools.pairwise(sizes)]  # by step, in order
    assert len(added) == 128
    # loops 48..63 against loops 0..15: the same places in their pages of 16 loops (the open
    # page grows within a page, and starts over when it is sealed)
    for n in range(32):
        assert abs(added[96 + n] - added[n]) < 200, (n, added[n], added[96 + n])
    step_file = {(i.loop_idx, i.step_idx): i.size for i in list_snapshots(loop.session_folder)}
    for si in range(2):  # loop 53 against loop 5: the same place in their pages
        assert step_file[(53, si)] <= step_file[(5, si)] + 200, (si, step_file)
    resumed = Paged.load(loop.session_folder)
    assert [resumed.loop_prev_out[li]["record"] for li in range(64)] == list(range(64))
