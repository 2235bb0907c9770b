"""The on-disk header shared by snapshot and outputs files, and its verification.

A file is ``MAGIC``, one line of JSON (the header), then ``body_size`` bytes of body. The
header names what the body is and carries its SHA-256, so nothing is unpickled before the
whole file is known to be the one that was written; with a signing key it also carries an
HMAC over the header (and, through ``body_sha256``, over everything the body points at).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from .._errors import SnapshotError
from .._version import __version__

MAGIC = b"RDLOOP-SNAPSHOT\n"
FORMAT_VERSION = 2
MAX_HEADER = 64 * 1024

Kind = Literal["snapshot", "outputs"]

ENGINE_VERSION = __version__


def qualified_name(cls: type) -> str:
    """``module:qualname``: what a header records, and what a loader imports."""
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


@dataclass(frozen=True, slots=True)
class Header:
    """The verified header of a snapshot or outputs file."""

    kind: Kind
    cls: str
    engine: str
    written_at_ns: int
    seq: int
    body_size: int
    body_sha256: str
    signed: bool
    offset: int  # where the body starts in the file

    @property
    def order(self) -> tuple[int, int]:
        """Sort key: time of writing."""
        return self.written_at_ns, self.seq


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def _canonical(fields: dict[str, Any]) -> bytes:
    return _CANONICAL.encode(fields).encode()


def _mac(key: bytes, fields: dict[str, Any]) -> str:
    return hmac.new(key, _canonical(fields), hashlib.sha256).hexdigest()


@functools.lru_cache(maxsize=256)
def json_string(text: str) -> str:
    return json.dumps(text)


def encode_header(
    kind: Kind,
    cls: str,
    body_size: int,
    body_sha256: str,
    key: bytes | None,
    written_at: tuple[int, int] | None = None,
) -> bytes:
    """``MAGIC`` + the header line for a body of ``body_size`` bytes.

    The line is the canonical JSON of the fields (``_canonical``), written out by hand:
    this runs for every snapshot, and a JSON encoder with sorted keys costs more than the
    rest of the header. A test checks that both agree. ``body_sha256`` is a hex digest (no
    escaping needed, and never worth caching: each is new).
    """
    written_at_ns, seq = written_at if written_at is not None else clock.tick()
    head = (
        f'{{"body_sha256":"{body_sha256}","body_size":{int(body_size)},'
        f'"cls":{json_string(cls)},"engine":{json_string(ENGINE_VERSION)},'
        f'"format":{FORMAT_VERSION},'
    )
    tail = f'"kind":{json_string(kind)},"seq":{int(seq)},"written_at_ns":{int(written_at_ns)}}}'
    if key is None:
        return MAGIC + (head + tail).encode() + b"\n"
    mac = hmac.new(key, (head + tail).encode(), hashlib.sha256).hexdigest()
    return MAGIC + f'{head}"hmac":"{mac}",{tail}'.encode() + b"\n"


def read_header(f: BinaryIO, path: Path, key: bytes | None) -> Header:
    """Read and check the header at the start of ``f``. Never unpickles anything.

    With a ``key``, a header without a valid HMAC is refused.
    """
    if f.read(len(MAGIC)) != MAGIC:
        raise SnapshotError(f"{path} is not an rdagent_loop snapshot (no magic string)")
    line = f.readline(MAX_HEADER)
    if not line.endswith(b"\n"):
        raise SnapshotError(f"{path} is truncated or corrupt: its header line is not complete")
    try:
        fields = json.loads(line)
        if not isinstance(fields, dict):
            raise TypeError("the header is not a JSON object")
        version = fields.get("format")
        if version != FORMAT_VERSION:
            raise SnapshotError(
                f"{path} has snapshot format {version!r}; this engine reads format "
                f"{FORMAT_VERSION} only"
            )
        mac = fields.pop("hmac", None)
        header = Header(
            kind=fields["kind"],
            cls=str(fields["cls"]),
            engine=str(fields["engine"]),
            written_at_ns=int(fields["written_at_ns"]),
            seq=int(fields["seq"]),
            body_size=int(fields["body_size"]),
            body_sha256=str(fields["body_sha256"]),
            signed=mac is not None,
            offset=len(MAGIC) + len(line),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise SnapshotError(f"{path} has a corrupt header: {exc!r}") from None
    if header.kind not in ("snapshot", "outputs"):
        raise SnapshotError(f"{path} has a header of unknown kind {header.kind!r}")
    if key is not None:
        if mac is None:
            raise SnapshotError(f"{path} is not signed, and a signing key is configured")
        if not hmac.compare_digest(str(mac), _mac(key, fields)):
            raise SnapshotError(f"{path} has a wrong signature (HMAC): refused")
    return header


def read_body(f: BinaryIO, path: Path, header: Header) -> bytes:
    """The rest of ``f``, checked against the header's size and checksum."""
    body = f.read(header.body_size + 1)
    if len(body) != header.body_size:
        what = "truncated" if len(body) < header.body_size else "longer than its header says"
        raise SnapshotError(f"{path} is {what}: {len(body)} of {header.body_size} body bytes")
    if hashlib.sha256(body).hexdigest() != header.body_sha256:
        raise SnapshotError(f"{path} is corrupt: its body fails its SHA-256 checksum")
    return body


def signing_key(secret: Any) -> bytes | None:
    """The key bytes of a ``SecretStr`` (or a plain string), or None."""
    if secret is None:
        return None
    value = secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret
    return str(value).encode() if value else None
