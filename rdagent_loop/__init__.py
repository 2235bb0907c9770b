"""rdagent_loop: the loop engine of automated R&D agents, on AnyIO (asyncio and trio)."""

from ._budget import Timer as Timer
from ._budget import parse_duration as parse_duration
from ._errors import LoopError as LoopError
from ._errors import LoopResumeError as LoopResumeError
from ._errors import LoopTerminationError as LoopTerminationError
from ._errors import QuestionTimeoutError as QuestionTimeoutError
from ._errors import RemoteStepError as RemoteStepError
from ._errors import SessionBusyError as SessionBusyError
from ._errors import SnapshotError as SnapshotError
from ._errors import SnapshotWarning as SnapshotWarning
from ._errors import StepTimeoutError as StepTimeoutError
from ._errors import WorkerCrashedError as WorkerCrashedError
from ._handle import LoopRun as LoopRun
from ._handle import ResultStream as ResultStream
from ._loop import LoopBase as LoopBase
from ._loop import LoopMeta as LoopMeta
from ._questions import answer as answer
from ._questions import pending_questions as pending_questions
from ._results import LoopTrace as LoopTrace
from ._results import Question as Question
from ._results import RunSummary as RunSummary
from ._results import StepResult as StepResult
from ._run import RunStatistics as RunStatistics
from ._session import SnapshotInfo as SnapshotInfo
from ._session import list_snapshots as list_snapshots
from ._settings import LoopSettings as LoopSettings
from ._steps import StepOptions as StepOptions
from ._steps import step as step
from ._version import __version__ as __version__

__all__ = (
    "LoopBase",
    "LoopError",
    "LoopMeta",
    "LoopResumeError",
    "LoopRun",
    "LoopSettings",
    "LoopTerminationError",
    "LoopTrace",
    "Question",
    "QuestionTimeoutError",
    "RemoteStepError",
    "ResultStream",
    "RunStatistics",
    "RunSummary",
    "SessionBusyError",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotWarning",
    "StepOptions",
    "StepResult",
    "StepTimeoutError",
    "Timer",
    "WorkerCrashedError",
    "answer",
    "list_snapshots",
    "parse_duration",
    "pending_questions",
    "step",
)
