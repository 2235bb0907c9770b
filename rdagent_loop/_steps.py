"""Which methods are steps, and the ``@step`` decorator that attaches per-step policies."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ._settings import ExecutorName

F = TypeVar("F", bound=Callable[..., Any])

_OPTIONS_ATTR = "__rdagent_step__"
_EXECUTORS = ("inline", "thread", "process", "ray")


@dataclass(frozen=True, slots=True)
class StepOptions:
    """Policies of one step; ``None`` means "use the settings"."""

    executor: ExecutorName | None = None
    limit: int | None = None
    timeout: float | None = None
    retries: int | None = None
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    backoff: float = 1.0
    backoff_factor: float = 2.0
    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: int | None = None
    resources: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def step(
    *,
    executor: ExecutorName | None = None,
    limit: int | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    retry_on: Iterable[type[BaseException]] = (Exception,),
    backoff: float = 1.0,
    backoff_factor: float = 2.0,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    memory: int | None = None,
    resources: dict[str, float] | None = None,
) -> Callable[[F], F]:
    """Declare where and how a step runs; what it says wins over :class:`LoopSettings`.

    ``retries`` tries a failing step again after ``backoff * backoff_factor**k`` seconds, only
    for exceptions in ``retry_on``; ``timeout`` raises :class:`StepTimeoutError`. ``num_cpus``,
    ``num_gpus``, ``memory`` and custom ``resources`` are what a ``ray`` step asks Ray for.
    """
    if executor is not None and executor not in _EXECUTORS:
        raise ValueError(f"executor must be one of {_EXECUTORS}, got {executor!r}")
    if limit is not None and (isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be at least 1, got {limit!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if retries is not None and retries < 0:
        raise ValueError(f"retries must not be negative, got {retries!r}")
    if backoff < 0 or backoff_factor < 1:
        raise ValueError(
            f"backoff must be >= 0 and backoff_factor >= 1, got {backoff!r}, {backoff_factor!r}"
        )
    retry_types = tuple(retry_on)
    for exc_type in retry_types:
        if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
            raise TypeError(f"retry_on must hold exception types, got {exc_type!r}")
    options = StepOptions(
        executor=executor,
        limit=limit,
        timeout=timeout,
        retries=retries,
        retry_on=retry_types,
        backoff=backoff,
        backoff_factor=backoff_factor,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        memory=memory,
        resources=dict(resources or {}),
    )

    def mark(func: F) -> F:
        if not inspect.isfunction(func):
            raise TypeError(f"@step decorates a method, got {func!r}")
        if inspect.iscoroutinefunction(func) and executor not in (None, "inline"):
            raise TypeError(
                f"@step(executor={executor!r}) on async def {func.__qualname__}: async steps "
                "are awaited on the event loop; make the step sync to run it elsewhere"
            )
        setattr(func, _OPTIONS_ATTR, options)
        return func

    return mark


def step_options(func: object) -> StepOptions:
    """The policies declared on ``func`` with ``@step``, or the defaults."""
    target = getattr(func, "__func__", func)
    options = getattr(target, _OPTIONS_ATTR, None)
    return options if isinstance(options, StepOptions) else StepOptions()


def is_step_candidate(name: str, attr: object) -> bool:
    """A public plain function (sync or async) defined in a class body is a step.

    Nested classes, static and class methods, properties and other callables
    (``helper_cls = dict``) are not.
    """
    return not name.startswith("_") and inspect.isfunction(attr)


def collect_steps(
    bases: tuple[type, ...], namespace: dict[str, Any], excluded: frozenset[str]
) -> list[str]:
    """RD-Agent's rule: inherited steps first, in definition order; an override keeps its place."""
    steps: list[str] = []
    for base in bases:
        for name in getattr(base, "steps", ()):
            if name not in steps and name not in excluded:
                steps.append(name)
    for name, attr in namespace.items():
        if is_step_candidate(name, attr) and name not in steps and name not in excluded:
            steps.append(name)
    return steps
