"""Scratch folders for benchmarks, all deleted when the process exits, none before.

On ext4 without a journal, creating files in the minutes after thousands were deleted is
several times slower (the inode allocator skips recently deleted inodes). A benchmark that
cleaned up after itself would slow down the one that runs next, so nothing is deleted until
every figure has been measured.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_root: Path | None = None


def scratch(prefix: str) -> Path:
    """A new empty folder, deleted with the others at exit."""
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="rdagent-loop-bench-"))
        atexit.register(shutil.rmtree, _root, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_root))
