"""LoopSettings: every knob of the engine, read from arguments or ``RDAGENT_LOOP_*``."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ExecutorName = Literal["inline", "thread", "process", "ray"]


class StepResources(BaseModel):
    """What one step asks a Ray cluster for (``@step(...)`` wins field by field)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_cpus: NonNegativeFloat | None = None
    num_gpus: NonNegativeFloat | None = None
    memory: int | None = Field(default=None, ge=0)
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)


# settings that name steps: every name must be a step of the loop's class
_STEP_NAMED_FIELDS = (
    "step_semaphore",
    "serial_steps",
    "step_executor",
    "step_timeout",
    "step_retries",
    "step_resources",
)


def _default_trace_path() -> Path:
    return Path.cwd() / "log" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")


class LoopSettings(BaseSettings):
    """Settings of one loop object.

    ``LoopSettings()`` reads the environment (``RDAGENT_LOOP_STEP_SEMAPHORE='{"coding": 4}'``);
    invalid values raise :class:`pydantic.ValidationError` naming the field.
    """

    model_config = SettingsConfigDict(
        env_prefix="RDAGENT_LOOP_", frozen=True, extra="forbid", validate_default=True
    )

    step_semaphore: int | dict[str, int] = 1
    """How many instances of a step may run at once: one int for all steps, or per step name
    (unnamed steps get 1). The largest value is ``max_parallel``, the number of loops in flight."""

    serial_steps: tuple[str, ...] = ("feedback", "record")
    """Steps that write shared state run one at a time unless ``step_semaphore`` names them."""

    subproc_step: bool = False
    """RD-Agent's switch: run sync middle steps in the process executor even with one worker."""

    step_executor: ExecutorName | dict[str, ExecutorName] | None = None
    """Where sync steps run. ``None`` keeps RD-Agent's rule (inline with one worker, ``process``
    in parallel mode, the first and last step always inline)."""

    step_timeout: float | dict[str, float] | None = None
    """Per-step deadline in seconds (a :class:`StepTimeoutError` when it passes)."""

    step_retries: int | dict[str, int] = 0
    """How many times a failing step is tried again (see ``@step(retry_on=...)``)."""

    trace_path: Path = Field(default_factory=_default_trace_path)
    """The session lives in ``trace_path / "__session__"``."""

    save_snapshots: bool = True
    """Write a snapshot after every completed step (turn off only for throw-away runs)."""

    durability: Literal["fsync", "flush"] = "fsync"
    """``fsync`` survives a power cut; ``flush`` (rename, no fsync) survives a killed process."""

    snapshot_writer: Literal["auto", "process", "thread"] = "auto"
    """Who writes snapshots during a run: a writer ``process`` (in parallel with the event
    loop), a ``thread`` of this process, or ``auto``: the process where one can start
    (``sys.executable`` is a Python interpreter), else the thread."""

    signing_key: SecretStr | None = None
    """With a key, snapshots carry an HMAC and unsigned or mis-signed files are refused."""

    grace_period: float = 0.0
    """Seconds an in-flight step may still run after the ``all_duration`` deadline."""

    result_buffer: int = 16
    """Step results buffered for a slow consumer before the engine waits for it."""

    progress: bool = True
    """Show a progress display when attached to a terminal."""

    ray_address: str | None = None
    """Address of an existing Ray cluster for the ``ray`` executor (``None``: start a local one)."""

    step_resources: dict[str, StepResources] = Field(default_factory=dict)
    """Per step name, what the ``ray`` executor asks the cluster for, e.g.
    ``RDAGENT_LOOP_STEP_RESOURCES='{"running": {"num_gpus": 1}}'``."""

    process_workers: int | None = None
    """Size of the process pool (default: ``max_parallel``)."""

    @field_validator("step_semaphore")
    @classmethod
    def _check_semaphore(cls, value: int | dict[str, int]) -> int | dict[str, int]:
        limits = value.values() if isinstance(value, dict) else [value]
        bad = [v for v in limits if v < 1]
        if bad:
            raise ValueError(f"every step limit must be at least 1, got {bad[0]}")
        return value

    @field_validator("step_retries")
    @classmethod
    def _check_retries(cls, value: int | dict[str, int]) -> int | dict[str, int]:
        counts = value.values() if isinstance(value, dict) else [value]
        if any(v < 0 for v in counts):
            raise ValueError(f"retries must not be negative, got {value!r}")
        return value

    @field_validator("step_timeout")
    @classmethod
    def _check_timeout(
        cls, value: float | dict[str, float] | None
    ) -> float | dict[str, float] | None:
        if value is None:
            return value
        seconds = value.values() if isinstance(value, dict) else [value]
        if any(not v > 0 for v in seconds):
            raise ValueError(f"timeouts must be positive, got {value!r}")
        return value

    @field_validator("grace_period")
    @classmethod
    def _check_grace(cls, value: float) -> float:
        if not value >= 0:
            raise ValueError(f"grace_period must not be negative, got {value!r}")
        return value

    @field_validator("result_buffer")
    @classmethod
    def _check_buffer(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"result_buffer must not be negative, got {value!r}")
        return value

    @field_validator("process_workers")
    @classmethod
    def _check_workers(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"process_workers must be at least 1, got {value!r}")
        return value

    @property
    def max_parallel(self) -> int:
        """How many loops may be in flight at once."""
        if isinstance(self.step_semaphore, dict):
            return max(self.step_semaphore.values(), default=1)
        return self.step_semaphore

    def check_step_names(self, owner: str, steps: Sequence[str]) -> None:
        """Refuse a per-step setting that names a step ``owner`` does not have.

        A misspelt name would be ignored silently: ``step_semaphore={"codng": 4}`` would run
        every step one at a time. ``serial_steps`` is checked only when it was set, since its
        default names RD-Agent's ``feedback`` and ``record``, which many loops lack.
        """
        for field in _STEP_NAMED_FIELDS:
            names: Collection[str] = getattr(self, field)
            if field == "serial_steps" and field not in self.model_fields_set:
                continue
            if not isinstance(names, (dict, tuple)):
                continue  # one value for every step
            unknown = sorted(set(names) - set(steps))
            if unknown:
                raise ValueError(
                    f"{field} names {unknown}, which are not steps of {owner}; "
                    f"its steps are {list(steps)}"
                )

    def get_max_parallel(self) -> int:
        """RD-Agent's name for :attr:`max_parallel`."""
        return self.max_parallel

    def is_force_subproc(self) -> bool:
        """RD-Agent's rule: sync middle steps go to processes in parallel mode."""
        return self.subproc_step or self.max_parallel > 1

    def step_limit(self, step_name: str) -> int:
        """How many instances of ``step_name`` may run at once."""
        if isinstance(self.step_semaphore, dict):
            return self.step_semaphore.get(step_name, 1)
        if step_name in self.serial_steps:
            return 1
        return self.step_semaphore

    def timeout_for(self, step_name: str) -> float | None:
        if isinstance(self.step_timeout, dict):
            return self.step_timeout.get(step_name)
        return self.step_timeout

    def retries_for(self, step_name: str) -> int:
        if isinstance(self.step_retries, dict):
            return self.step_retries.get(step_name, 0)
        return self.step_retries
