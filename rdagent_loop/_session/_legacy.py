"""Sessions of rdagent_loop 0.1 (format 2): read them, and convert them in place.

A format-2 step file is ``MAGIC``, one line of JSON (the header: kind, class, time of
writing, the body's size and SHA-256, an HMAC with a signing key), then the body: a
manifest line (the state's *segments*, one per attribute, each a list of pieces kept in
the file or stored as chunks in ``<session>/.chunks/<sha256>``), then the inline bytes.
Segments marked *own* are pickles of their own; the others continue one pickler's memo, and
a chunked segment is stored without its FRAME opcodes (which the unpickler does not need).
Finished loops' outputs and traces lived in ``<session>/<loop>/outputs-<sha256 prefix>``
files (header kind ``outputs``), named from the snapshot's ``_finished`` archive.

This module reads them without the modules 0.1 had and today's engine does not
(``rdagent_loop._finished``, ``rdagent_loop._step_index``): their names in a pickle are
mapped to small stand-ins, and the state is rebuilt for today's loop class: ``step_idx``,
``loop_prev_out`` and ``loop_trace`` as :class:`~rdagent_loop._loops.LoopMap`\\ s holding
every loop's values (the finished ones' read back from their outputs files), ``_finished``
gone. Each file is checked (header, HMAC, body, chunks; an outputs file against the hash
the step file names) before anything in it is unpickled.

:func:`upgrade_session` converts a session (``rdagent-loop upgrade``): the old files are kept
in ``<session>/.format2`` (hard links), then every format-2 step file is loaded from there,
oldest first, and dumped again under its own name in today's format.
"""

from __future__ import annotations

import contextlib
import filecmp
import hashlib
import hmac
import io
import json
import os
import pickle
import shutil
import struct
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .._errors import SnapshotError
from .._loops import LoopMap
from ._atomic import fsync_dir
from ._format import OLD_MAGIC, read_manifest, signing_key
from ._lock import SessionLock
from ._reader import instantiate, resolve_class

FORMAT = 2
MAX_HEADER = 64 * 1024
KEPT_NAME = ".format2"
"""Where :func:`upgrade_session` keeps the old files: ``<session>/.format2/<loop>/<name>``."""
LOG_NAME = "converted.jsonl"
OUTPUTS_PREFIX = "outputs-"
TMP_PREFIX = ".tmp-"  # what a killed 0.1 run left half written in a loop folder
STORE_NAME = ".chunks"

_ENTRY = struct.Struct(">I16s")  # an archive entry: loop index, SHA-256 prefix of its file
_GONE = bytes(16)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_FACTORIES: dict[str, Callable[[], Any]] = {"list": list, "dict": dict, "int": int}


# -- files: header, body, chunks -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OldHeader:
    """The checked header of a format-2 file."""

    kind: str
    cls: str
    written_at_ns: int
    seq: int
    body_size: int
    body_sha256: str

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: time of writing."""
        return self.written_at_ns, self.seq


def is_format2(path: Path) -> bool:
    """Whether ``path`` starts like a format-2 file (nothing else is checked)."""
    try:
        with path.open("rb") as f:
            return f.read(len(OLD_MAGIC)) == OLD_MAGIC
    except OSError:
        return False


def read_old_header(f: BinaryIO, path: Path, key: bytes | None) -> OldHeader:
    """The header at the start of ``f``; with a ``key``, its HMAC must be there and right."""
    if f.read(len(OLD_MAGIC)) != OLD_MAGIC:
        raise SnapshotError(f"{path} is not a format-2 rdagent_loop file (no magic string)")
    line = f.readline(MAX_HEADER)
    if not line.endswith(b"\n"):
        raise SnapshotError(f"{path} is truncated or corrupt: its header line is not complete")
    try:
        fields = json.loads(line)
        if not isinstance(fields, dict):
            raise TypeError("the header is not a JSON object")
        if fields.get("format") != FORMAT:
            raise SnapshotError(f"{path} has format {fields.get('format')!r}, not {FORMAT}")
        mac = fields.pop("hmac", None)
        header = OldHeader(
            kind=str(fields["kind"]),
            cls=str(fields["cls"]),
            written_at_ns=int(fields["written_at_ns"]),
            seq=int(fields["seq"]),
            body_size=int(fields["body_size"]),
            body_sha256=str(fields["body_sha256"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise SnapshotError(f"{path} has a corrupt header: {exc!r}") from None
    if key is not None:
        if mac is None:
            raise SnapshotError(f"{path} is not signed, and a signing key is configured")
        expected = hmac.new(key, _CANONICAL.encode(fields).encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(str(mac), expected):
            raise SnapshotError(f"{path} has a wrong signature (HMAC): refused")
    return header


def read_old_body(f: BinaryIO, path: Path, header: OldHeader) -> bytes:
    """The rest of ``f``, checked against the header's size and SHA-256."""
    body = f.read(header.body_size + 1)
    if len(body) != header.body_size:
        what = "truncated" if len(body) < header.body_size else "longer than its header says"
        raise SnapshotError(f"{path} is {what}: {len(body)} of {header.body_size} body bytes")
    if hashlib.sha256(body).hexdigest() != header.body_sha256:
        raise SnapshotError(f"{path} is corrupt: its body fails its SHA-256 checksum")
    return body


def old_order(path: Path) -> tuple[int, int]:
    """When a format-2 file was written (its header's time, or its mtime if unreadable)."""
    try:
        with path.open("rb") as f:
            return read_old_header(f, path, None).order
    except (SnapshotError, OSError):
        try:
            return path.stat().st_mtime_ns, 0
        except OSError:
            return 0, 0


Piece = tuple[int, str | None]
"""(size, sha256 of a stored chunk), or (size, None) for bytes inside the file."""


@dataclass(frozen=True, slots=True)
class OldSnapshot:
    """A format-2 step file whose header and body passed their checks."""

    path: Path
    header: OldHeader
    whole: bool  # the state is one object, not a dict of attributes
    store: Path | None
    segments: tuple[tuple[str, tuple[Piece, ...], bool], ...]  # name, pieces, own
    inline: bytes

    def chunks(self) -> set[str]:
        """The stored chunks it refers to."""
        return {d for _, pieces, _ in self.segments for _, d in pieces if d is not None}

    def read_segments(self) -> list[bytes]:
        """Every segment's bytes, each chunk checked against its size and hash."""
        cache: dict[str, bytes] = {}
        offset = 0
        out = []
        for _, pieces, _ in self.segments:
            parts: list[bytes] = []
            for size, digest in pieces:
                if digest is None:
                    parts.append(self.inline[offset : offset + size])
                    offset += size
                    continue
                if digest not in cache:
                    cache[digest] = self._chunk(digest, size)
                parts.append(cache[digest])
            out.append(b"".join(parts))
        return out

    def _chunk(self, digest: str, size: int) -> bytes:
        if self.store is None:
            raise SnapshotError(f"{self.path} refers to chunks but names no store")
        path = self.store / digest
        try:
            with path.open("rb") as f:
                data = f.read(size + 1)
        except FileNotFoundError:
            raise SnapshotError(f"{self.path}: chunk {path} is missing") from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            raise SnapshotError(f"{self.path}: chunk {path} is damaged (it fails its hash)")
        return data


def read_old_snapshot(path: Path, key: bytes | None) -> OldSnapshot:
    """Read and check a format-2 step file (header, HMAC, body). Never unpickles."""
    with path.open("rb") as f:
        header = read_old_header(f, path, key)
        if header.kind != "snapshot":
            raise SnapshotError(f"{path} is an {header.kind} file, not a snapshot")
        body = read_old_body(f, path, header)
    end = body.find(b"\n")
    try:
        manifest = json.loads(body[:end])
        segments = tuple(
            (str(s[0]), tuple(_piece(p) for p in s[1]), len(s) > 2 and bool(s[2]))
            for s in manifest["segments"]
        )
        whole = manifest["state"] == "object"
        store = manifest["store"]
        if int(manifest["protocol"]) > pickle.HIGHEST_PROTOCOL:
            raise ValueError(f"pickle protocol {manifest['protocol']} is too new")
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise SnapshotError(f"{path} has a corrupt manifest: {exc!r}") from None
    inline = body[end + 1 :]
    if sum(size for _, pieces, _ in segments for size, d in pieces if d is None) != len(inline):
        raise SnapshotError(f"{path} has a corrupt manifest: inline sizes do not add up")
    return OldSnapshot(
        path=path,
        header=header,
        whole=whole,
        store=Path(os.path.normpath(path.parent / store)) if isinstance(store, str) else None,
        segments=segments,
        inline=inline,
    )


def _piece(raw: Any) -> Piece:
    size = int(raw[0])
    digest = str(raw[1]) if len(raw) > 1 else None
    if size < 0 or (digest is not None and (len(digest) != 64 or digest.strip("0123456789abcdef"))):
        raise ValueError(f"bad piece {raw!r}")
    return size, digest


# -- unpickling: stand-ins for the modules 0.1 had ---------------------------------------------


class _Archive:
    """Stands in for 0.1's ``FinishedLoops``: which outputs file holds each finished loop."""

    def __init__(self) -> None:
        self.pages: list[bytes] = []
        self.pending: dict[int, bytes] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.pages = [bytes(page) for page in state.get("refs", ())]
        self.pending = dict(state.get("pending") or {})

    def refs(self) -> dict[int, bytes]:
        """Loop index -> the first 16 bytes of the SHA-256 of its outputs file's body."""
        refs: dict[int, bytes] = {}
        for page in self.pages:
            for loop_idx, digest in _ENTRY.iter_unpack(page):
                if digest == _GONE:
                    refs.pop(loop_idx, None)
                else:
                    refs[loop_idx] = digest
        return refs


class _StepIndex(defaultdict[int, int]):
    """Stands in for 0.1's ``StepIndex`` class, should a pickle name it."""


def _step_index(pages: Iterable[bytes], page: bytes, loose: dict[int, int]) -> LoopMap[int]:
    """0.1's ``_step_index._rebuild``: sealed values of loops 0.., then the loose entries."""
    values = array("q", b"".join(pages))
    values.frombytes(page)
    entries = dict(enumerate(values))
    entries.update(loose)
    return LoopMap(int, entries)


@dataclass
class _Maps:
    """The loop maps an unpickling rebuilt, each with 0.1's field name and hidden loops."""

    maps: list[tuple[LoopMap[Any], str, set[int]]] = field(default_factory=list)

    def rebuild(
        self, factory: Callable[[], Any] | str, name: str, live: dict[int, Any], hidden: set[int]
    ) -> LoopMap[Any]:
        """0.1's ``_finished._rebuild_map``: today's map, finished loops added later."""
        if isinstance(factory, str):
            factory = _FACTORIES[factory]
        mapping: LoopMap[Any] = LoopMap(factory, live)
        self.maps.append((mapping, name, set(hidden)))
        return mapping


class LegacyUnpickler(pickle.Unpickler):
    """An unpickler that maps what 0.1's modules pickled to today's objects."""

    def __init__(self, file: BinaryIO, maps: _Maps) -> None:
        super().__init__(file)
        self._maps = maps

    def find_class(self, module: str, name: str) -> Any:
        if module == "rdagent_loop._finished":
            found: Any = {"_rebuild_map": self._maps.rebuild, "FinishedLoops": _Archive}.get(name)
        elif module == "rdagent_loop._step_index":
            found = {"_rebuild": _step_index, "StepIndex": _StepIndex}.get(name)
        else:
            return super().find_class(module, name)
        if found is None:
            raise AttributeError(f"module {module!r} of rdagent_loop 0.1 has no {name!r}")
        return found


# -- a loop object of today's class ------------------------------------------------------------


@dataclass
class Format2Reader:
    """Loads format-2 step files as loop objects of today's classes.

    ``outputs_folder``: where the ``<loop>/outputs-*`` files are (default: the session the
    step file lies in). ``outputs_read`` collects the outputs files read so far.

    ``share_outputs``: each outputs file is read and unpickled once, and the loops that
    name it share its values (as one object of 0.1 did). For a converter, which dumps each
    object and drops it: every step file names the outputs of all the loops finished
    before it, and reading them again for each would cost (step files x loops) reads.
    """

    key: bytes | None = None
    outputs_folder: Path | None = None
    share_outputs: bool = False
    outputs_read: set[Path] = field(default_factory=set)
    _shared: dict[tuple[Path, int, bytes], Any] = field(default_factory=dict, repr=False)

    def load(self, path: Path, expected: type | None = None) -> Any:
        """The loop object of step file ``path``: an instance of ``expected`` (default
        ``LoopBase``) or of a subclass, rebuilt as today's engine holds it."""
        if expected is None:
            from .._loop import LoopBase

            expected = LoopBase
        snapshot = read_old_snapshot(path, self.key)
        segments = snapshot.read_segments()
        cls = resolve_class(path, snapshot.header.cls, expected)
        maps = _Maps()
        name = ""
        try:
            shared = LegacyUnpickler(
                io.BytesIO(
                    b"".join(
                        d
                        for (_, _, own), d in zip(snapshot.segments, segments, strict=True)
                        if not own
                    )
                ),
                maps,
            )
            state: Any
            if snapshot.whole:
                state = shared.load()
            else:
                state = {}
                for (name, _, own), data in zip(snapshot.segments, segments, strict=True):
                    unpickler = LegacyUnpickler(io.BytesIO(data), maps) if own else shared
                    state[name] = unpickler.load()
            name = ""
        except (ImportError, AttributeError, pickle.UnpicklingError, EOFError) as exc:
            where = f"attribute {name!r}" if name else "the state"
            raise SnapshotError(
                f"{path} holds a snapshot of {snapshot.header.cls}, but {where} cannot be "
                f"rebuilt: {exc} (was a module or class it uses renamed or moved?)"
            ) from exc
        if isinstance(state, dict):
            state = self._today(path, state, maps)
        return instantiate(cls, state)

    def _today(self, path: Path, state: dict[str, Any], maps: _Maps) -> dict[str, Any]:
        """0.1's state as today's engine holds it: finished loops back in the loop maps,
        ``step_idx`` a ``LoopMap(int)``, no ``_finished``."""
        archive = state.pop("_finished", None)
        if isinstance(archive, _Archive) and maps.maps:
            refs = archive.refs()
            wanted = sorted(
                li
                for li in refs
                if any(li not in hidden and li not in m for m, _, hidden in maps.maps)
            )
            folder = self.outputs_folder or path.parent.parent
            records = {li: self._record(folder, li, refs[li], archive) for li in wanted}
            for mapping, name, hidden in maps.maps:
                values = dict(mapping.items())
                for li, record in records.items():
                    if li not in hidden and li not in values and name in record:
                        values[li] = record[name]
                mapping.clear()
                mapping.update(sorted(values.items()))
        for mapping, _, _ in maps.maps:
            mapping.take_touched()
            mapping.take_lowest_write()
        steps = state.get("step_idx")
        if isinstance(steps, LoopMap):  # 0.1's StepIndex
            steps.take_touched()
        elif isinstance(steps, array):  # 0.1's pickle of a plain defaultdict of loops 0..n-1
            state["step_idx"] = LoopMap(int, dict(enumerate(steps)))
        elif isinstance(steps, defaultdict) and steps.default_factory is int:
            state["step_idx"] = LoopMap(int, dict(steps))
        return state

    def _record(self, folder: Path, loop_idx: int, digest: bytes, archive: _Archive) -> Any:
        """The outputs and trace of finished loop ``loop_idx``, read and checked."""
        if not self.share_outputs:
            return self._read_record(folder, loop_idx, digest, archive)
        shared = self._shared.get((folder, loop_idx, digest))
        if shared is None:
            shared = self._read_record(folder, loop_idx, digest, archive)
            self._shared[folder, loop_idx, digest] = shared
        return shared

    def _read_record(self, folder: Path, loop_idx: int, digest: bytes, archive: _Archive) -> Any:
        prefix = digest.hex()
        path = folder / str(loop_idx) / f"{OUTPUTS_PREFIX}{prefix[:16]}"
        data = archive.pending.get(loop_idx)
        if data is None or not hashlib.sha256(data).hexdigest().startswith(prefix):
            try:
                with path.open("rb") as f:
                    header = read_old_header(f, path, None)
                    if header.kind != "outputs" or not header.body_sha256.startswith(prefix):
                        raise SnapshotError(f"{path} is not the file the snapshot refers to")
                    data = read_old_body(f, path, header)
            except (OSError, SnapshotError) as exc:
                raise SnapshotError(
                    f"the outputs of finished loop {loop_idx} cannot be read back: {exc}"
                ) from exc
            self.outputs_read.add(path)
        try:
            return LegacyUnpickler(io.BytesIO(data), _Maps()).load()
        except (ImportError, AttributeError, pickle.UnpicklingError, EOFError) as exc:
            raise SnapshotError(
                f"the outputs of finished loop {loop_idx} ({path}) cannot be rebuilt: {exc}"
            ) from exc


def load_format2(path: str | Path, expected: type | None = None, key: bytes | None = None) -> Any:
    """The loop object of a format-2 step file, of today's class (see :class:`Format2Reader`)."""
    return Format2Reader(key).load(Path(path).absolute(), expected)


# -- converting a session in place -------------------------------------------------------------


@dataclass
class UpgradeReport:
    """What :func:`upgrade_session` did."""

    session: Path
    kept: Path
    """Where the old files are: ``<session>/.format2``."""
    already_current: bool = False
    """Nothing to do: the session holds no format-2 files."""
    converted: list[Path] = field(default_factory=list)
    """Step files now in today's format, in the order they were converted."""
    outputs_merged: int = 0
    """Finished loops' outputs files read into the converted step files."""
    outputs_removed: int = 0
    """``outputs-*`` (and half-written ``.tmp-*``) files removed from the loop folders."""
    failed: list[tuple[Path, str]] = field(default_factory=list)
    """Step files left as they were (still format 2), and why."""

    @property
    def ok(self) -> bool:
        return not self.failed


def upgrade_session(session_folder: Path, settings_key: Any = None) -> UpgradeReport:
    """Convert a format-2 session (``<trace_path>/__session__``) to today's format, in place.

    Every file of every loop folder is first kept in ``<session>/.format2/<loop>/<name>``
    (a hard link, else a copy), with the chunks the step files use in ``.format2/.chunks``:
    that folder is the old session, whole. Then each format-2 step file, oldest first, is
    loaded from there and dumped (``obj.dump``) under its own name in today's format, and,
    when all of them were converted, the ``outputs-*`` files leave the loop folders. A file
    that fails is left as it is and reported. Running this again retries it, and converts
    again the files converted before (listed in ``.format2/converted.jsonl``), so that the
    new files keep the order of the old ones; unless a run wrote step files since, which
    would then be older than the retried ones: those are refused (reported as failed). A
    session without format-2 files is reported as current and left alone.

    ``settings_key``: the signing key (a ``SecretStr`` or a string) that the old files were
    signed with and the new ones are signed with; ``None``: that of ``LoopSettings()``, as
    for ``load``. Refuses (:class:`SessionBusyError`) while a run holds the session.
    """
    folder = Path(session_folder).absolute()
    if not folder.is_dir():
        raise FileNotFoundError(f"no session folder at {folder}")
    if settings_key is None:
        from .._settings import LoopSettings

        settings_key = LoopSettings().signing_key
    lock = SessionLock(folder)
    lock.acquire()
    try:
        return _upgrade(folder, settings_key)
    finally:
        lock.release()


def _upgrade(folder: Path, secret: Any) -> UpgradeReport:
    kept = folder / KEPT_NAME
    report = UpgradeReport(folder, kept)
    log = _Log(kept / LOG_NAME)
    old_steps: list[Path] = []
    converted: dict[Path, Path] = {}  # format 3, written by an earlier upgrade -> its source
    foreign: list[Path] = []  # format 3, written by a run
    others: list[Path] = []  # outputs files, half-written files: moved out of the loop folders
    for loop_dir in sorted(_loop_folders(folder), key=lambda p: int(p.name)):
        for file in sorted(loop_dir.iterdir()):
            if not file.is_file():
                continue
            if _is_step_name(file.name):
                if is_format2(file):
                    old_steps.append(file)
                else:
                    source = log.source_of(file, kept)
                    if source is None:
                        foreign.append(file)
                    else:
                        converted[file] = source
            elif file.name.startswith((OUTPUTS_PREFIX, TMP_PREFIX)):
                others.append(file)
    if not old_steps and not others:
        if not converted and not foreign:
            raise FileNotFoundError(f"no step files in session folder {folder}")
        report.already_current = True
        return report
    # keep everything first: nothing below changes a file that is not kept
    sources = {file: _keep(file, kept / file.parent.name / file.name) for file in old_steps}
    for file in others:
        _keep(file, kept / file.parent.name / file.name)
    chunks: set[str] = set()
    for source in sources.values():
        with contextlib.suppress(SnapshotError, OSError):  # broken: reported when converted
            chunks |= read_old_snapshot(source, None).chunks()
    for digest in sorted(chunks):
        with contextlib.suppress(FileNotFoundError):  # missing: reported when converted
            _keep(folder / STORE_NAME / digest, kept / STORE_NAME / digest)
    for sub in {p.parent for p in sources.values()} | {kept / STORE_NAME, kept}:
        if sub.is_dir():
            fsync_dir(sub)
    if old_steps and foreign:
        # converted now, they would be newer than what the run wrote, and be what a load of
        # the session continues from
        why = (
            f"the session was run after an earlier upgrade ({len(foreign)} newer step "
            f"files, {_relative(foreign[-1])} among them): converted now, this older state "
            "would come after them; delete it (a copy is in .format2)"
        )
        report.failed = [(file, why) for file in old_steps]
        return report
    # the step files an earlier upgrade converted are converted again, so that all of them
    # are written in the order of the old files (the newest old one the newest new one)
    if old_steps:
        sources.update(converted)
    key = signing_key(secret)
    reader = Format2Reader(key, outputs_folder=kept, share_outputs=True)
    ordered = sorted(sources, key=lambda f: (old_order(sources[f]), _step_key(f)))
    for file in ordered:
        try:
            obj = reader.load(sources[file])
            _settle(obj, folder, secret)
            obj.dump(file)
            with file.open("rb") as f:
                log.add(file, sources[file], read_manifest(f, file, None).order)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            report.failed.append((file, " ".join(text.split())))
            continue
        report.converted.append(file)
    report.outputs_merged = len(reader.outputs_read)
    if report.ok:
        for file in others:
            file.unlink(missing_ok=True)
            report.outputs_removed += 1
    return report


class _Log:
    """``.format2/converted.jsonl``: the step files an upgrade wrote (when, and from which
    old file), one line each, so that a later upgrade tells them from a run's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, tuple[str, tuple[int, int]]] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in path.read_text().splitlines():
                with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
                    entry = json.loads(line)
                    written = (int(entry["written"][0]), int(entry["written"][1]))
                    self.entries[str(entry["file"])] = (str(entry["from"]), written)

    def source_of(self, file: Path, kept: Path) -> Path | None:
        """The old file that ``file`` was converted from, if an upgrade wrote it."""
        entry = self.entries.get(_relative(file))
        if entry is None:
            return None
        try:
            with file.open("rb") as f:
                order = read_manifest(f, file, None).order
        except (SnapshotError, OSError):
            return None
        source = kept / entry[0]
        return source if order == entry[1] and source.is_file() else None

    def add(self, file: Path, source: Path, written: tuple[int, int]) -> None:
        line = {"file": _relative(file), "from": _relative(source), "written": written}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _relative(path: Path) -> str:
    """``<loop>/<name>``: where a file is in its session (or in ``.format2``)."""
    return f"{path.parent.name}/{path.name}"


def _settle(obj: Any, folder: Path, secret: Any) -> None:
    """What ``load`` does to a loaded loop: it lives in ``folder``, signs with ``secret``."""
    move = getattr(obj, "_move_to", None)
    if callable(move):
        move(folder)
    settings = getattr(obj, "settings", None)
    if secret is not None and settings is not None and hasattr(settings, "model_copy"):
        if not hasattr(secret, "get_secret_value"):
            from pydantic import SecretStr

            secret = SecretStr(secret.decode() if isinstance(secret, bytes) else str(secret))
        obj.settings = settings.model_copy(update={"signing_key": secret})


def _keep(source: Path, target: Path) -> Path:
    """``target`` holds the bytes of ``source`` (a hard link, else a copy); if a different
    file is there already, the next free ``<target>~<n>`` does. Returns where they are."""
    target.parent.mkdir(parents=True, exist_ok=True)
    candidate = target
    n = 1
    while True:
        try:
            os.link(source, candidate)
            return candidate
        except FileExistsError:
            if os.path.samefile(source, candidate) or filecmp.cmp(source, candidate, False):
                return candidate
        except OSError:  # no hard links here (another file system...): a copy
            if candidate.exists():
                if filecmp.cmp(source, candidate, False):
                    return candidate
            else:
                tmp = candidate.with_name(f".{candidate.name}.copying")
                shutil.copy2(source, tmp)
                os.replace(tmp, candidate)
                return candidate
        n += 1
        candidate = target.with_name(f"{target.name}~{n}")


def _loop_folders(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]


def _is_step_name(name: str) -> bool:
    step, sep, _ = name.partition("_")
    return bool(sep) and step.isdigit()


def _step_key(path: Path) -> tuple[int, int]:
    return int(path.parent.name), int(path.name.partition("_")[0])


__all__ = (
    "KEPT_NAME",
    "Format2Reader",
    "LegacyUnpickler",
    "OldHeader",
    "OldSnapshot",
    "UpgradeReport",
    "is_format2",
    "load_format2",
    "old_order",
    "read_old_body",
    "read_old_header",
    "read_old_snapshot",
    "upgrade_session",
)
