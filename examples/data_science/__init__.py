"""RD-Agent's data-science R&D loop on a generated data set: see :mod:`.loop`."""

from .loop import CoderError as CoderError
from .loop import DataScienceLoop as DataScienceLoop
from .loop import Feedback as Feedback
from .loop import PolicyError as PolicyError
from .loop import Record as Record
from .loop import RunnerError as RunnerError
from .loop import RunResult as RunResult

__all__ = (
    "CoderError",
    "DataScienceLoop",
    "Feedback",
    "PolicyError",
    "Record",
    "RunResult",
    "RunnerError",
)
