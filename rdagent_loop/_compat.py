"""Names that moved between the Python versions we support."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from builtins import BaseExceptionGroup, ExceptionGroup
else:  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup, ExceptionGroup

__all__ = ("BaseExceptionGroup", "ExceptionGroup")
