"""Per-step Ray resources: from ``@step(...)`` and from ``LoopSettings.step_resources``.

The option merging needs no cluster; tests/executors/test_ray.py shows the placement on one.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rdagent_loop import LoopSettings, step
from rdagent_loop._executors._base import StepCall
from rdagent_loop._executors._ray import task_options
from rdagent_loop._steps import step_options


@step(executor="ray", num_gpus=1, resources={"big_disk": 1})
def decorated(prev_out: dict) -> None:  # type: ignore[type-arg]
    pass


def plain(prev_out: dict) -> None:  # type: ignore[type-arg]
    pass


def call_of(func: object, name: str = "running") -> StepCall:
    return StepCall(0, 2, name, func, {}, step_options(func))  # type: ignore[arg-type]


def test_settings_give_resources_to_steps_the_decorator_leaves_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "RDAGENT_LOOP_STEP_RESOURCES",
        '{"running": {"num_cpus": 2, "num_gpus": 0.5, "memory": 1000, "resources": {"a": 1}}}',
    )
    settings = LoopSettings()
    configured = settings.step_resources["running"]
    options = task_options(call_of(decorated), configured)
    assert options["num_gpus"] == 1  # the decorator wins
    assert options["num_cpus"] == 2  # the settings fill in
    assert options["memory"] == 1000
    assert options["resources"] == {"a": 1, "big_disk": 1}
    bare = task_options(call_of(plain), configured)
    assert (bare["num_cpus"], bare["num_gpus"]) == (2, 0.5)
    assert "num_cpus" not in task_options(call_of(plain), None)


def test_bad_step_resources_name_the_field() -> None:
    with pytest.raises(ValidationError, match="step_resources"):
        LoopSettings(step_resources={"running": {"num_gpus": -1}})  # type: ignore[dict-item]
    with pytest.raises(ValidationError, match="step_resources"):
        LoopSettings(step_resources={"running": {"gpus": 1}})  # type: ignore[dict-item]
