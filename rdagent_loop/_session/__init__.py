"""Snapshots on disk: format, atomic writes, chunk store, verified reads, inspection.

Layout (RD-Agent's, so existing tooling keeps working)::

    <session>/<loop>/<step>_<name>     one snapshot per completed step (header + manifest)
    <session>/<loop>/outputs-<sha256>  the outputs and trace of a finished loop, written once
    <session>/.chunks/<sha256>         content-defined chunks of state, shared by snapshots

Modules: ``_format`` (header, checksum, HMAC), ``_atomic`` (temp file, fsync, rename),
``_chunks`` (content-defined chunking, the store), ``_capture`` (a consistent picture, the
write job), ``_writer`` (the run's snapshot writer), ``_writer_process`` and ``_disk_worker``
(its writer process, both sides), ``_reader`` (verify, then unpickle),
``_listing`` (inspection and checkout's truncation).
"""

from ._atomic import Durability, write_atomic
from ._capture import (
    OutputsBlob,
    SnapshotJob,
    capturing,
    consistently,
    make_job,
    outputs_path,
    store_for,
    write_outputs,
)
from ._chunks import ChunkIndex
from ._format import qualified_name, signing_key
from ._listing import (
    SnapshotInfo,
    list_snapshots,
    session_folder_of,
    snapshot_files,
    truncate_after,
)
from ._reader import Snapshot, newest_valid, read_snapshot
from ._writer import SnapshotWriter, WriterStatistics

__all__ = (
    "ChunkIndex",
    "Durability",
    "OutputsBlob",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotJob",
    "SnapshotWriter",
    "WriterStatistics",
    "capturing",
    "consistently",
    "list_snapshots",
    "make_job",
    "newest_valid",
    "outputs_path",
    "qualified_name",
    "read_snapshot",
    "session_folder_of",
    "signing_key",
    "snapshot_files",
    "store_for",
    "truncate_after",
    "write_atomic",
    "write_outputs",
)
