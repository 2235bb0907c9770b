"""A step file: a plain pickle, then the check data that plain pickle never reads.

::

    stub     a pickle of ``_reader.assemble("<this file's absolute path>")``, ending in STOP
    inline   the bytes of the small segments, kept in the file
    manifest one line of JSON: what the file holds and points at, its checksums, its HMAC
    footer   the manifest's length (8 bytes, big-endian), its SHA-256 (32), ``MAGIC`` (8)

``pickle.load(open(path, "rb"))`` (what RD-Agent's tools do) stops at the stub's STOP and
calls ``assemble``, which reads the file as ``Cls.load`` does: the footer first, then the
manifest, the checksums and the signature, then what the manifest points at, and only then
unpickles anything. The manifest names everything else it needs by content hash, so the
HMAC over it covers all of it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._errors import SnapshotError
from .._version import __version__

MAGIC = b"RDLOOP03"
OLD_MAGIC = b"RDLOOP-SNAPSHOT\n"  # format 2 (rdagent_loop 0.1): a header first
FOOTER = 48
FORMAT_VERSION = 3
MAX_MANIFEST = 64 * 1024 * 1024
ENGINE_VERSION = __version__

_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


class OldFormatError(SnapshotError):
    """A step file of an older format, which ``rdagent-loop upgrade`` converts."""


def qualified_name(cls: type) -> str:
    """``module:qualname``: what a manifest records, and what a loader imports."""
    return f"{cls.__module__}:{cls.__qualname__}"


class _Clock:
    """Time of writing, strictly increasing in this process (ties and small steps back of
    the wall clock must not reorder two snapshots), plus a sequence number."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ns = 0
        self._seq = 0

    def tick(self) -> tuple[int, int]:
        with self._lock:
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            self._seq += 1
            return self._last_ns, self._seq


clock = _Clock()


def signing_key(secret: Any) -> bytes | None:
    """The key bytes of a ``SecretStr`` (or a plain string), or None."""
    if secret is None:
        return None
    value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    return str(value).encode() if value else None


def encode_tail(fields: dict[str, Any], key: bytes | None) -> bytes:
    """The manifest line (with its HMAC when there is a key) and the footer."""
    if key is not None:
        fields = {**fields, "hmac": _mac(key, fields)}
    line = _CANONICAL.encode(fields).encode() + b"\n"
    return line + len(line).to_bytes(8, "big") + hashlib.sha256(line).digest() + MAGIC


def _mac(key: bytes, fields: dict[str, Any]) -> str:
    return hmac.new(key, _CANONICAL.encode(fields).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Manifest:
    """The verified manifest of a step file (nothing it points at is read yet)."""

    fields: dict[str, Any]
    body_offset: int  # where the inline bytes start (after the stub)
    body_end: int  # where the manifest starts

    @property
    def cls(self) -> str:
        return str(self.fields["cls"])

    @property
    def order(self) -> tuple[int, int]:
        return int(self.fields["written_at_ns"]), int(self.fields["seq"])

    @property
    def signed(self) -> bool:
        return "hmac" in self.fields


def read_manifest(f: Any, path: Path, key: bytes | None) -> Manifest:
    """Read and check the manifest at the end of the open file ``f``; never unpickles.

    With a ``key``, a manifest without a valid HMAC is refused.
    """
    size = f.seek(0, os.SEEK_END)
    if size < FOOTER:
        raise SnapshotError(f"{path} is truncated or not an rdagent_loop snapshot ({size} bytes)")
    f.seek(size - FOOTER)
    footer = f.read(FOOTER)
    if footer[40:] != MAGIC:
        f.seek(0)
        if f.read(len(OLD_MAGIC)) == OLD_MAGIC:
            raise OldFormatError(
                f"{path} was written by rdagent_loop 0.1 (snapshot format 2); convert its "
                f"session with `rdagent-loop upgrade {path.parent.parent}` (the old files "
                "are kept in __session__/.format2)"
            )
        raise SnapshotError(
            f"{path} is not a complete rdagent_loop snapshot (no check data at its end: "
            "truncated, or written by something else)"
        )
    length = int.from_bytes(footer[:8], "big")
    start = size - FOOTER - length
    if not 0 < length <= MAX_MANIFEST or start < 0:
        raise SnapshotError(f"{path} is corrupt: its manifest length {length} is impossible")
    f.seek(start)
    line = f.read(length)
    if hashlib.sha256(line).digest() != footer[8:40]:
        raise SnapshotError(f"{path} is corrupt: its manifest fails its SHA-256 checksum")
    try:
        fields = json.loads(line)
        if not isinstance(fields, dict):
            raise TypeError("the manifest is not a JSON object")
        if fields.get("format") != FORMAT_VERSION:
            raise SnapshotError(
                f"{path} has snapshot format {fields.get('format')!r}; this engine reads "
                f"format {FORMAT_VERSION} (convert older sessions with `rdagent-loop upgrade`)"
            )
        stub = int(fields["stub_size"])
        body = int(fields["body_size"])
        str(fields["cls"]), int(fields["written_at_ns"]), int(fields["seq"])
    except (ValueError, TypeError, KeyError) as exc:
        raise SnapshotError(f"{path} has a corrupt manifest: {exc!r}") from None
    if body != start or not 0 < stub <= body:
        raise SnapshotError(f"{path} is corrupt: its sizes do not add up")
    mac = fields.get("hmac")
    if key is not None:
        if mac is None:
            raise SnapshotError(f"{path} is not signed, and a signing key is configured")
        unsigned = {k: v for k, v in fields.items() if k != "hmac"}
        if not hmac.compare_digest(str(mac), _mac(key, unsigned)):
            raise SnapshotError(f"{path} has a wrong signature (HMAC): refused")
    return Manifest(fields, stub, start)


def read_body(f: Any, path: Path, manifest: Manifest) -> bytes:
    """The stub and inline bytes, checked against the manifest's checksum."""
    f.seek(0)
    body: bytes = f.read(manifest.body_end)
    if len(body) != manifest.body_end:
        raise SnapshotError(f"{path} is truncated")
    if hashlib.sha256(body).hexdigest() != manifest.fields.get("body_sha256"):
        raise SnapshotError(f"{path} is corrupt: it fails its SHA-256 checksum")
    return body
