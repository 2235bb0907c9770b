"""Step discovery (LoopMeta), class checks and per-loop state."""

from __future__ import annotations

import pickle
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from rdagent_loop import LoopBase, LoopSettings, step
from rdagent_loop._results import LoopTrace


class Base(LoopBase):
    def propose(self, prev_out: dict[str, Any]) -> None: ...

    async def coding(self, prev_out: dict[str, Any]) -> None: ...

    def record(self, prev_out: dict[str, Any]) -> None: ...


class Child(Base):
    helper_cls = dict  # a class attribute that is callable, not a step

    class Nested:  # a nested class is not a step
        pass

    @staticmethod
    def helper(x: int) -> int:
        return x

    @classmethod
    def make(cls) -> None: ...

    @property
    def size(self) -> int:
        return 1

    def _private(self, prev_out: dict[str, Any]) -> None: ...

    def coding(self, prev_out: dict[str, Any]) -> None:  # an override keeps its place
        ...

    def running(self, prev_out: dict[str, Any]) -> None: ...

    def dump(self, path: Any) -> None:  # an override of the API is not a step
        super().dump(path)

    @step(limit=2)
    def feedback(self, prev_out: dict[str, Any]) -> None: ...


def test_steps_are_public_functions_in_definition_order_inherited_first() -> None:
    assert Base.steps == ["propose", "coding", "record"]
    assert Child.steps == ["propose", "coding", "record", "running", "feedback"]


def test_class_attributes_nested_classes_and_static_helpers_are_not_steps() -> None:
    for name in ("helper_cls", "Nested", "helper", "make", "size", "_private", "dump", "load"):
        assert name not in Child.steps


def test_loopbase_api_is_not_a_step() -> None:
    class Plain(LoopBase):
        def only(self, prev_out: dict[str, Any]) -> None: ...

    assert Plain.steps == ["only"]
    assert LoopBase.steps == []


def test_an_unknown_skip_target_is_an_error_when_the_class_is_defined() -> None:
    with pytest.raises(ValueError, match="'recrod'"):

        class Typo(LoopBase):
            skip_loop_error_stepname = "recrod"

            def propose(self, prev_out: dict[str, Any]) -> None: ...

            def record(self, prev_out: dict[str, Any]) -> None: ...


def test_the_default_skip_target_is_feedback_else_the_last_step(tmp_path: Any) -> None:
    settings = LoopSettings(trace_path=tmp_path)
    assert Child(settings).skip_target == Child.steps.index("feedback")
    assert Base(settings).skip_target == Base.steps.index("record")


def test_state_rdagent_code_reads_is_there(tmp_path: Any) -> None:
    loop = Base(LoopSettings(trace_path=tmp_path))
    assert loop.loop_idx == 0
    assert loop.step_idx[3] == 0
    assert loop.loop_prev_out[0] == {}
    assert loop.loop_trace[0] == []
    assert loop.session_folder == tmp_path / "__session__"
    assert loop.timer.remain_time() is None
    assert loop.get_unfinished_loop_cnt(0) == 0
    assert loop.LoopTerminationError is not None and loop.LoopResumeError is not None


def test_subclasses_calling_super_init_with_no_argument_read_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("RDAGENT_LOOP_STEP_SEMAPHORE", '{"coding": 4}')
    monkeypatch.setenv("RDAGENT_LOOP_TRACE_PATH", str(tmp_path))

    class App(Base):
        def __init__(self) -> None:
            super().__init__()

    loop = App()
    assert loop.settings.step_semaphore == {"coding": 4}
    assert loop.settings.max_parallel == 4
    assert loop.session_folder == tmp_path / "__session__"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"step_semaphore": 0}, "step_semaphore"),
        ({"step_semaphore": {"coding": -1}}, "step_semaphore"),
        ({"step_executor": "gpu"}, "step_executor"),
        ({"durability": "never"}, "durability"),
        ({"grace_period": -1}, "grace_period"),
        ({"step_timeout": 0}, "step_timeout"),
        ({"result_buffer": -2}, "result_buffer"),
    ],
)
def test_invalid_settings_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        LoopSettings(**kwargs)


def test_invalid_settings_from_the_environment_name_the_field(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("RDAGENT_LOOP_STEP_SEMAPHORE", "lots")
    with pytest.raises(ValidationError, match="step_semaphore"):
        LoopSettings()


def test_step_limits_serialise_record_and_feedback_by_default() -> None:
    settings = LoopSettings(step_semaphore=4)
    assert settings.max_parallel == 4
    assert settings.step_limit("coding") == 4
    assert settings.step_limit("record") == settings.step_limit("feedback") == 1
    per_step = LoopSettings(step_semaphore={"coding": 3, "feedback": 2})
    assert per_step.max_parallel == 3
    assert per_step.step_limit("feedback") == 2
    assert per_step.step_limit("running") == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"step_n": -1},
        {"loop_n": -3},
        {"all_duration": "1min"},
        {"loop_n": 1.5},
        # a ValueError at the call, not an OverflowError, nor a budget read another way
        {"all_duration": 1e300},
        pytest.param({"all_duration": 10**400}, id="all_duration-10**400"),
        {"all_duration": " 2h"},
        {"all_duration": "\u0663s"},  # an Arabic-Indic three
    ],
)
def test_bad_budgets_are_refused_at_the_call(tmp_path: Any, kwargs: dict[str, Any]) -> None:
    loop = Base(LoopSettings(trace_path=tmp_path))
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        loop.run(**kwargs)
    assert not (tmp_path / "__session__").exists()


@pytest.mark.parametrize(
    "tz", [timezone.utc, timezone(timedelta(hours=8)), None], ids=["utc", "utc+8", "naive"]
)
def test_loop_traces_pickle_exactly_whatever_their_time_zone(tz: timezone | None) -> None:
    trace = LoopTrace(
        datetime(2026, 11, 25, 14, 35, 18, 999_999, tzinfo=tz),
        datetime(2262, 4, 11, 23, 47, 16, 854_775, tzinfo=tz),
        3,
        "record",
        "ValueError('x')",
    )
    restored = pickle.loads(pickle.dumps(trace, protocol=5))
    assert restored == trace
    assert restored.start.tzinfo == trace.start.tzinfo


# -- settings that name steps ---------------------------------------------------------------

UNKNOWN_STEP_SETTINGS = [
    ("step_semaphore", {"coding": 2, "nonexistent_step": 2}),
    ("serial_steps", ("record", "nonexistent_step")),
    ("step_executor", {"nonexistent_step": "thread"}),
    ("step_timeout", {"nonexistent_step": 5.0}),
    ("step_retries", {"nonexistent_step": 1}),
    ("step_resources", {"nonexistent_step": {"num_gpus": 1}}),
]


def unknown_step_message(field: str) -> str:
    return re.escape(
        f"{field} names ['nonexistent_step'], which are not steps of Base; "
        "its steps are ['propose', 'coding', 'record']"
    )


@pytest.mark.parametrize(("field", "value"), UNKNOWN_STEP_SETTINGS)
def test_a_setting_naming_an_unknown_step_is_refused_when_the_loop_is_built(
    tmp_path: Any, field: str, value: Any
) -> None:
    settings = LoopSettings(trace_path=tmp_path, **{field: value})
    with pytest.raises(ValueError, match=unknown_step_message(field)):
        Base(settings)


def test_an_unknown_step_from_the_environment_is_refused_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("RDAGENT_LOOP_STEP_SEMAPHORE", '{"nonexistent_step": 2}')
    monkeypatch.setenv("RDAGENT_LOOP_TRACE_PATH", str(tmp_path))

    class App(Base):
        def __init__(self) -> None:
            super().__init__()

    with pytest.raises(ValueError, match=r"step_semaphore names \['nonexistent_step'\]"):
        App()


def test_settings_naming_real_steps_and_the_default_serial_steps_are_accepted(
    tmp_path: Any,
) -> None:
    # the default serial_steps names feedback, which Base lacks: only what the user set counts
    assert "feedback" in LoopSettings().serial_steps and "feedback" not in Base.steps
    Base(LoopSettings(trace_path=tmp_path, step_semaphore=3))
    Base(
        LoopSettings(
            trace_path=tmp_path,
            step_semaphore={"coding": 2},
            serial_steps=("record",),
            step_executor={"propose": "thread"},
            step_timeout={"coding": 5.0},
            step_retries={"record": 1},
            step_resources={"coding": {"num_cpus": 1}},
        )
    )


@pytest.mark.anyio
@pytest.mark.parametrize(("field", "value"), UNKNOWN_STEP_SETTINGS)
async def test_a_loaded_loop_given_settings_naming_an_unknown_step_refuses_to_run(
    tmp_path: Any, field: str, value: Any
) -> None:
    settings = LoopSettings(trace_path=tmp_path / "t", progress=False, durability="flush")
    await Base(settings).run(loop_n=1)
    loop = Base.load(tmp_path / "t", settings=settings.model_copy(update={field: value}))
    with pytest.raises(ValueError, match=unknown_step_message(field)):
        await loop.run(loop_n=2)
    assert not loop._running
