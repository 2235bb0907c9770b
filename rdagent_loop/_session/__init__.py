"""Sessions on disk: step files, the store they point at, the writer, verified reads.

Layout (RD-Agent's, so its tools keep working)::

    <session>/<loop>/<step>_<name>   one step file per completed step: a plain pickle
                                     followed by its manifest (``_format``)
    <session>/.chunks/<sha256>       what step files point at, by content: chunks of large
                                     attributes, blobs, pages of loop records
    <session>/.tmp/                  files being written (renamed into place when complete)
    <session>/.lock/pid              the lock a run holds (``_lock``)

Modules: ``_format`` (the step file), ``_atomic`` (temp file, fsync, rename), ``_blobs``
(large bytes by reference), ``_pages`` (per-loop records), ``_chunks`` (content-defined
chunking), ``_capture`` (a consistent picture, the write job), ``_writer`` and
``_disk_worker`` (the run's writer and its process), ``_reader`` (verify, then unpickle),
``_listing`` (inspection, checkout's truncation, clean-up), ``_lock``.
"""

from ._atomic import Durability, write_atomic
from ._capture import SnapshotJob, make_job, session_for, without_tearing
from ._format import qualified_name, signing_key
from ._listing import (
    SnapshotInfo,
    list_snapshots,
    remove_orphans,
    session_folder_of,
    snapshot_files,
    truncate_after,
)
from ._reader import Snapshot, Verified, newest_valid, read_snapshot
from ._writer import SnapshotWriter, WriterStatistics

__all__ = (
    "Durability",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotJob",
    "SnapshotWriter",
    "Verified",
    "WriterStatistics",
    "list_snapshots",
    "make_job",
    "newest_valid",
    "qualified_name",
    "read_snapshot",
    "remove_orphans",
    "session_folder_of",
    "session_for",
    "signing_key",
    "snapshot_files",
    "truncate_after",
    "without_tearing",
    "write_atomic",
)
