"""OpenTelemetry traces of a run (DESIGN §3.5), checked with the SDK's in-memory exporter.

The engine takes the global tracer provider, which a process can set only once; so these
tests hand ``rdagent_loop._otel`` a provider of their own (its private ``_provider``), and
one test, in a subprocess, sets the global provider as an application does. Steps that
open spans of their own take a tracer from the same provider (``app_span``); a step in a
worker process or a Ray task makes a provider there and returns what its span says about
its parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from looplib import CoderError, PolicyError
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from rdagent_loop import LoopBase, LoopSettings, Question, _otel, step

pytestmark = pytest.mark.anyio


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(_otel, "_provider", provider)
    return exporter


def app_span(name: str) -> Any:
    """A span the application's own code opens (an LLM client's, say)."""
    return trace.get_tracer("app", tracer_provider=_otel._provider).start_as_current_span(name)


def make_settings(tmp_path: Path, **kwargs: Any) -> LoopSettings:
    return LoopSettings(trace_path=tmp_path / "trace", progress=False, durability="flush", **kwargs)


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def only(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    (found,) = named(exporter, name)
    return found


def steps_of(exporter: InMemorySpanExporter) -> dict[tuple[int, str], ReadableSpan]:
    found: dict[tuple[int, str], ReadableSpan] = {}
    for s in named(exporter, "rdagent_loop.step"):
        key = (attrs(s)["rdagent_loop.loop_idx"], attrs(s)["rdagent_loop.step_name"])
        assert key not in found, key
        found[key] = s
    return found


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def events(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(e.name, dict(e.attributes or {})) for e in span.events]


def stop_reason(exporter: InMemorySpanExporter) -> str:
    (reason,) = [
        a["rdagent_loop.reason"]
        for name, a in events(only(exporter, "rdagent_loop.run"))
        if name == "rdagent_loop.stop"
    ]
    return str(reason)


# -- run, loops, steps --------------------------------------------------------------------


class Charged(LoopBase):
    """An async step that opens a span of its own, and a sync step; both charge."""

    async def propose(self, prev_out: dict[str, Any]) -> int:
        with app_span("llm call"):
            self.charge(0.25, tokens=10)
            await anyio.lowlevel.checkpoint()
        return 1

    def coding(self, prev_out: dict[str, Any]) -> int:
        with app_span("sync call"):
            self.charge(0.5, tokens=5)
        return 2


@pytest.mark.parametrize("executor", ["inline", "thread"])
async def test_a_run_is_a_span_its_loops_children_their_steps_grandchildren(
    spans: InMemorySpanExporter, tmp_path: Path, executor: str
) -> None:
    loop = Charged(make_settings(tmp_path, step_executor={"coding": executor}))
    with app_span("the application"):
        summary = await loop.run(loop_n=2)
    assert summary.steps == 4
    app = only(spans, "the application")
    run = only(spans, "rdagent_loop.run")
    assert parent_id(run) == app.context.span_id  # the caller's span is the run's parent
    assert attrs(run)["rdagent_loop.cost"] == 1.5
    assert attrs(run)["rdagent_loop.tokens"] == 30
    assert stop_reason(spans) == "loop_n"

    loops = {attrs(s)["rdagent_loop.loop_idx"]: s for s in named(spans, "rdagent_loop.loop")}
    assert sorted(loops) == [0, 1]
    for li, loop_span in loops.items():
        assert parent_id(loop_span) == run.context.span_id
        assert attrs(loop_span) == {
            "rdagent_loop.loop_idx": li,
            "rdagent_loop.cost": 0.75,
            "rdagent_loop.tokens": 15,
        }

    steps = steps_of(spans)
    assert sorted(steps) == [(0, "coding"), (0, "propose"), (1, "coding"), (1, "propose")]
    for (li, name), s in steps.items():
        assert parent_id(s) == loops[li].context.span_id
        si = loop.steps.index(name)
        assert attrs(s) == {
            "rdagent_loop.loop_idx": li,
            "rdagent_loop.step_idx": si,
            "rdagent_loop.step_name": name,
            "rdagent_loop.executor": "inline" if name == "propose" else executor,
            "rdagent_loop.attempts": 1,
            "rdagent_loop.cost": 0.25 if name == "propose" else 0.5,
            "rdagent_loop.tokens": 10 if name == "propose" else 5,
        }
        assert s.status.status_code is StatusCode.UNSET

    # the step's span is current while the step's code runs: its spans nest under it
    own = named(spans, "llm call") + named(spans, "sync call")
    assert sorted(parent_id(s) or 0 for s in own) == sorted(
        s.context.span_id for s in steps.values()
    )
    for s in own:
        (parent,) = [p for p in steps.values() if p.context.span_id == parent_id(s)]
        expected = "propose" if s.name == "llm call" else "coding"
        assert attrs(parent)["rdagent_loop.step_name"] == expected
    assert {s.context.trace_id for s in spans.get_finished_spans()} == {app.context.trace_id}


async def test_the_bare_async_for_form_is_traced_too(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    loop = Charged(make_settings(tmp_path))
    with app_span("the application"):
        async for _ in loop.run(loop_n=1):
            pass
    run = only(spans, "rdagent_loop.run")
    assert parent_id(run) == only(spans, "the application").context.span_id
    assert len(steps_of(spans)) == 2


# -- failures -------------------------------------------------------------------------------


class Fails(LoopBase):
    def s0(self, prev_out: dict[str, Any]) -> int:
        return 0

    @step(retries=1, backoff=0.001)
    def s1(self, prev_out: dict[str, Any]) -> int:
        raise ValueError("the model is down")

    def s2(self, prev_out: dict[str, Any]) -> int:
        return 2


async def test_a_failed_step_records_its_exception_and_attempts(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="the model is down"):
        await Fails(make_settings(tmp_path)).run(loop_n=1)
    failed = steps_of(spans)[(0, "s1")]
    assert failed.status.status_code is StatusCode.ERROR
    assert "ValueError: the model is down" in (failed.status.description or "")
    assert attrs(failed)["rdagent_loop.attempts"] == 2
    names = [name for name, _ in events(failed)]
    assert names == ["rdagent_loop.retry", "exception"]
    retry, exception = (a for _, a in events(failed))
    assert retry["exception.type"] == "ValueError"
    assert retry["rdagent_loop.attempt"] == 1
    assert exception["exception.type"] == "ValueError"
    assert exception["exception.message"] == "the model is down"
    assert "Traceback" in str(exception["exception.stacktrace"])
    # the run fails with it; its loop's span ends with the run
    run = only(spans, "rdagent_loop.run")
    assert run.status.status_code is StatusCode.ERROR
    assert [s.end_time is not None for s in named(spans, "rdagent_loop.loop")] == [True]
    assert steps_of(spans)[(0, "s0")].status.status_code is StatusCode.UNSET


class Skips(LoopBase):
    skip_loop_error = (CoderError,)
    skip_loop_error_stepname = "s2"

    def s0(self, prev_out: dict[str, Any]) -> int:
        return 0

    def s1(self, prev_out: dict[str, Any]) -> int:
        raise CoderError("no code today")

    def s2(self, prev_out: dict[str, Any]) -> int:
        return 2


async def test_a_skipped_step_records_its_exception_and_the_loop_goes_on(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    summary = await Skips(make_settings(tmp_path)).run(loop_n=1)
    assert summary.steps == 3
    steps = steps_of(spans)
    skipped = steps[(0, "s1")]
    assert skipped.status.status_code is StatusCode.ERROR
    assert [name for name, _ in events(skipped)] == ["exception"]
    assert attrs(skipped)["rdagent_loop.attempts"] == 1
    assert steps[(0, "s2")].status.status_code is StatusCode.UNSET
    assert only(spans, "rdagent_loop.run").status.status_code is StatusCode.UNSET


# -- worker processes -----------------------------------------------------------------------


def span_in_this_process() -> dict[str, Any]:
    """Open a span with a provider of this process; what it says about its parent."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("app").start_as_current_span("in the worker"):
        pass
    (span,) = exporter.get_finished_spans()
    return {
        "pid": os.getpid(),
        "trace_id": span.context.trace_id,
        "parent": None if span.parent is None else span.parent.span_id,
    }


class InWorker(LoopBase):
    def s0(self, prev_out: dict[str, Any]) -> int:
        return 0

    @step(executor="process")
    def s1(self, prev_out: dict[str, Any]) -> dict[str, Any]:
        return span_in_this_process()

    def s2(self, prev_out: dict[str, Any]) -> int:
        return 2


async def test_a_span_opened_in_a_process_step_nests_under_the_step_span(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    outputs: dict[int, dict[str, Any]] = {}
    async with InWorker(make_settings(tmp_path)).run(loop_n=2) as results:
        async for r in results:
            if r.step_name == "s1":
                outputs[r.loop_idx] = r.output
    steps = steps_of(spans)
    for li in (0, 1):
        in_worker, parent = outputs[li], steps[(li, "s1")]
        assert in_worker["pid"] != os.getpid()
        assert attrs(parent)["rdagent_loop.executor"] == "process"
        assert in_worker["trace_id"] == parent.context.trace_id
        assert in_worker["parent"] == parent.context.span_id


# -- events ---------------------------------------------------------------------------------


class Asks(LoopBase):
    async def s0(self, prev_out: dict[str, Any]) -> Any:
        return await self.ask("go ahead?", payload=prev_out[self.LOOP_IDX_KEY])

    def s1(self, prev_out: dict[str, Any]) -> Any:
        return prev_out["s0"]


async def test_a_question_and_its_answer_are_events_of_the_step_span(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    asked: list[Question] = []
    async with Asks(make_settings(tmp_path)).run(loop_n=1) as results:
        async for item in results:
            if isinstance(item, Question):
                asked.append(item)
                results.answer(item.id, "yes")
    (question,) = asked
    s0 = steps_of(spans)[(0, "s0")]
    assert events(s0) == [
        (
            "rdagent_loop.question",
            {
                "rdagent_loop.question_id": question.id,
                "rdagent_loop.question": "go ahead?",
                "rdagent_loop.loop_idx": 0,
                "rdagent_loop.step_idx": 0,
                "rdagent_loop.step_name": "s0",
            },
        ),
        (
            "rdagent_loop.answer",
            {"rdagent_loop.question_id": question.id, "rdagent_loop.timed_out": False},
        ),
    ]


class WithdrawsOnce(LoopBase):
    withdraw_loop_error = (PolicyError,)

    def __init__(self, settings: LoopSettings, flag: Path) -> None:
        super().__init__(settings)
        self.flag = flag  # on disk: a withdraw restores the loop object, not the file

    def s0(self, prev_out: dict[str, Any]) -> int:
        return 0

    def s1(self, prev_out: dict[str, Any]) -> int:
        if not self.flag.exists():
            self.flag.touch()
            raise PolicyError("against the policy")
        return 1


async def test_a_withdraw_is_an_event_of_the_run_and_of_the_loop_it_rolled_back(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    summary = await WithdrawsOnce(make_settings(tmp_path), tmp_path / "flag").run(loop_n=1)
    assert summary.loops == 1
    withdraws = [
        a for name, a in events(only(spans, "rdagent_loop.run")) if name == "rdagent_loop.withdraw"
    ]
    assert len(withdraws) == 1
    assert withdraws[0]["rdagent_loop.loop_idx"] == 0
    assert str(withdraws[0]["exception.type"]).endswith("PolicyError")
    assert withdraws[0]["exception.message"] == "against the policy"
    # the loop ran twice: a span for the withdrawn attempt, one for the loop run again
    first, again = sorted(named(spans, "rdagent_loop.loop"), key=lambda s: s.start_time or 0)
    assert [name for name, _ in events(first)] == ["rdagent_loop.withdraw"]
    assert events(again) == []
    s1 = [
        s for s in named(spans, "rdagent_loop.step") if attrs(s)["rdagent_loop.step_name"] == "s1"
    ]
    failed, done = sorted(s1, key=lambda s: s.start_time or 0)
    assert parent_id(failed) == first.context.span_id
    assert failed.status.status_code is StatusCode.ERROR
    assert parent_id(done) == again.context.span_id
    assert done.status.status_code is StatusCode.UNSET


class Budgeted(LoopBase):
    """Each step charges 1; ``stop_after`` terminates the run after that many steps."""

    def __init__(self, settings: LoopSettings, stop_after: int = 0) -> None:
        super().__init__(settings)
        self.stop_after = stop_after
        self.done = 0

    def s0(self, prev_out: dict[str, Any]) -> int:
        self.charge(1.0)
        return 0

    def s1(self, prev_out: dict[str, Any]) -> int:
        self.charge(1.0)
        return 1

    def _check_exit_conditions_on_step(
        self, loop_id: int | None = None, step_id: int | None = None
    ) -> None:
        self.done += 1
        if self.done == self.stop_after:
            raise self.LoopTerminationError("good enough")


@pytest.mark.parametrize(
    ("budget", "reason"),
    [
        ({"step_n": 3}, "step_n"),
        ({"loop_n": 1}, "loop_n"),
        ({"loop_n": 5, "all_cost": 3.0}, "all_cost"),
        ({"loop_n": 5, "stop_after": 1}, "terminated"),
    ],
)
async def test_the_run_span_has_an_event_for_the_budget_that_stopped_it(
    spans: InMemorySpanExporter, tmp_path: Path, budget: dict[str, Any], reason: str
) -> None:
    budget = dict(budget)
    loop = Budgeted(make_settings(tmp_path), stop_after=budget.pop("stop_after", 0))
    summary = await loop.run(**budget)
    assert summary.reason == reason
    assert stop_reason(spans) == reason


class Sleeps(LoopBase):
    async def s0(self, prev_out: dict[str, Any]) -> int:
        await anyio.sleep_forever()
        return 0  # pragma: no cover


async def test_a_step_cancelled_at_the_deadline_ends_its_span_and_the_run_says_why(
    spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    summary = await Sleeps(make_settings(tmp_path)).run(loop_n=1, all_duration=0.2)
    assert summary.reason == "all_duration"
    assert stop_reason(spans) == "all_duration"
    cancelled = steps_of(spans)[(0, "s0")]
    assert attrs(cancelled)["rdagent_loop.cancelled"] is True
    assert cancelled.status.status_code is StatusCode.UNSET
    assert [s.end_time is not None for s in named(spans, "rdagent_loop.loop")] == [True]


# -- Ray ------------------------------------------------------------------------------------


class OnRay(LoopBase):
    def s0(self, prev_out: dict[str, Any]) -> int:
        return 0

    @step(executor="ray", num_cpus=1)
    def s1(self, prev_out: dict[str, Any]) -> dict[str, Any]:
        return span_in_this_process()

    def s2(self, prev_out: dict[str, Any]) -> int:
        return 2


@pytest.mark.ray
async def test_a_span_opened_in_a_ray_step_nests_under_the_step_span(
    spans: InMemorySpanExporter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray")
    from ray import cloudpickle

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers lack tests/
    try:
        loop = OnRay(make_settings(tmp_path))
        async with loop.run(loop_n=1) as results:
            outputs = [r.output async for r in results if r.step_name == "s1"]
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    (in_task,) = outputs
    parent = steps_of(spans)[(0, "s1")]
    assert attrs(parent)["rdagent_loop.executor"] == "ray"
    assert in_task["trace_id"] == parent.context.trace_id
    assert in_task["parent"] == parent.context.span_id


# -- the global tracer provider, and no OpenTelemetry at all (subprocesses) ----------------


def run_script(tmp_path: Path, body: str) -> dict[str, Any]:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(body))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "trace")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def test_without_opentelemetry_nothing_of_it_is_imported(tmp_path: Path) -> None:
    found = run_script(
        tmp_path,
        """
        import importlib.abc, json, sys

        class NoOpenTelemetry(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "opentelemetry":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoOpenTelemetry())

        import anyio
        from rdagent_loop import LoopBase, LoopSettings, step


        class Loop(LoopBase):
            async def s0(self, prev_out):
                return 0

            @step(executor="process")
            def s1(self, prev_out):  # in a worker process
                return sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")

            def s2(self, prev_out):
                return prev_out["s1"]


        if __name__ == "__main__":
            settings = LoopSettings(trace_path=sys.argv[1], progress=False, durability="flush")
            outputs = []

            async def main():
                async with Loop(settings).run(loop_n=2) as results:
                    async for r in results:
                        outputs.append(r.output)

            anyio.run(main)
            here = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
            otel = "rdagent_loop._otel" in sys.modules
            print(json.dumps({"here": here, "outputs": outputs, "otel": otel}))
        """,
    )
    assert found == {"here": [], "outputs": [0, [], [], 0, [], []], "otel": True}


def test_an_application_sets_the_global_tracer_provider(tmp_path: Path) -> None:
    found = run_script(
        tmp_path,
        """
        import json, sys

        import anyio
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from rdagent_loop import LoopBase, LoopSettings


        class Loop(LoopBase):
            async def s0(self, prev_out):
                return 0

            def s1(self, prev_out):
                return 1


        if __name__ == "__main__":
            exporter = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            settings = LoopSettings(trace_path=sys.argv[1], progress=False, durability="flush")
            anyio.run(lambda: Loop(settings).run(loop_n=1))
            spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
            print(json.dumps(sorted(
                [s.name, spans[s.parent.span_id].name if s.parent else None]
                for s in spans.values()
            )))
        """,
    )
    assert found == [
        ["rdagent_loop.loop", "rdagent_loop.run"],
        ["rdagent_loop.run", None],
        ["rdagent_loop.step", "rdagent_loop.loop"],
        ["rdagent_loop.step", "rdagent_loop.loop"],
    ]
