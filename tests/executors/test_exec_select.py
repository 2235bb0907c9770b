"""Which executor runs each step: the decorator, the settings, then RD-Agent's default rule."""

from __future__ import annotations

import sys

import pytest
from executor_helpers import settings_for

from rdagent_loop import LoopBase, step
from rdagent_loop._executors import StepRunner
from rdagent_loop._executors._select import choose_executors


class Five(LoopBase):
    async def propose(self, prev_out):
        return 0

    def coding(self, prev_out):
        return 1

    def running(self, prev_out):
        return 2

    async def feedback(self, prev_out):
        return 3

    def record(self, prev_out):
        return 4


class Declared(Five):
    @step(executor="thread")
    def coding(self, prev_out):
        return 1

    @step(executor="inline")
    async def feedback(self, prev_out):
        return 3


def chosen(cls, tmp_path, **kwargs):
    return choose_executors(cls, cls.steps, settings_for(tmp_path, **kwargs))


def test_one_worker_runs_everything_inline(tmp_path):
    assert set(chosen(Five, tmp_path).values()) == {"inline"}


@pytest.mark.parametrize("kwargs", [{"step_semaphore": 3}, {"subproc_step": True}])
def test_parallel_mode_sends_middle_sync_steps_to_processes(tmp_path, kwargs):
    assert chosen(Five, tmp_path, **kwargs) == {
        "propose": "inline",  # async
        "coding": "process",
        "running": "process",
        "feedback": "inline",  # async
        "record": "inline",  # the last step writes shared state
    }


def test_first_sync_step_stays_inline_in_parallel_mode(tmp_path):
    class SyncFirst(LoopBase):
        def s0(self, prev_out):
            return 0

        def s1(self, prev_out):
            return 1

        def s2(self, prev_out):
            return 2

    assert chosen(SyncFirst, tmp_path, step_semaphore=2) == {
        "s0": "inline",
        "s1": "process",
        "s2": "inline",
    }


def test_settings_name_applies_to_every_sync_step(tmp_path):
    assert chosen(Five, tmp_path, step_executor="thread") == {
        "propose": "inline",
        "coding": "thread",
        "running": "thread",
        "feedback": "inline",
        "record": "thread",
    }


def test_settings_dict_names_steps_and_the_rest_follow_the_default(tmp_path):
    result = chosen(Five, tmp_path, step_semaphore=2, step_executor={"running": "thread"})
    assert result["running"] == "thread"
    assert result["coding"] == "process"
    assert result["record"] == "inline"


def test_decorator_wins_over_settings(tmp_path):
    result = chosen(Declared, tmp_path, step_executor={"coding": "process", "record": "thread"})
    assert result["coding"] == "thread"
    assert result["feedback"] == "inline"
    assert result["record"] == "thread"


def test_unknown_step_in_settings_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"\['codng'\].*not steps of Five"):
        chosen(Five, tmp_path, step_executor={"codng": "process"})


def test_async_step_with_another_executor_is_refused_at_definition():
    with pytest.raises(TypeError, match=r"async def .*propose.*event loop"):

        class Bad(LoopBase):
            @step(executor="process")
            async def propose(self, prev_out):
                return 0


def test_async_step_named_in_settings_is_refused_when_the_run_starts(tmp_path):
    loop = Five(settings_for(tmp_path, step_executor={"propose": "thread"}))
    with pytest.raises(TypeError, match=r"'thread' for Five\.propose, an async step"):
        StepRunner(type(loop), loop.settings)
    assert StepRunner(Five, settings_for(tmp_path, step_executor="thread")).choice["propose"] == (
        "inline"
    )


def test_missing_ray_is_a_clear_error_when_the_run_starts(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without Ray looks like
    loop = Five(settings_for(tmp_path, step_executor={"coding": "ray"}))
    with pytest.raises(ImportError, match=r"pip install 'rdagent_loop\[ray\]'"):
        StepRunner(type(loop), loop.settings)
