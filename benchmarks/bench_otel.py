"""OpenTelemetry (docs/benchmarks.md): what tracing a run costs the engine per step.

``python -m benchmarks.bench_otel`` prints a table; ``run()`` returns its rows ``(what,
figure, bar)`` for ``python -m benchmarks``. The loop is ``bench_engine.NoOp`` (four async
no-op steps), ``OVERHEAD_STEPS`` steps per run, so the figures are the engine's own cost and
tracing's share of it: the worst case, since a real step takes far longer than its span.

A process can set its global tracer provider only once, so each measurement runs in a child
process (``python -m benchmarks.bench_otel --child MODE``) that sets up one mode:

* ``absent``: ``opentelemetry`` cannot be imported (a meta-path finder refuses it);
* ``no provider``: the API is installed, no provider is set (the engine then traces nothing);
* ``SDK, simple``: an SDK ``TracerProvider`` with a ``SimpleSpanProcessor`` and an exporter
  that drops every span (each span is handed to it as it ends, on the event loop's thread);
* ``SDK, batch``: the same exporter behind a ``BatchSpanProcessor`` (a thread exports).

Each child warms up with one run, then measures both backends with snapshots off (the
engine alone) and with ``durability="flush"`` snapshots (the default's cheaper twin). The
figure is the CPU time of the process per step (``time.process_time``: the event loop's
thread and the batch processor's, not the snapshot writer process's), which a machine busy
with other work disturbs far less than the wall time. The children run round-robin over the
modes, ``REPEATS`` rounds, and each figure is a median over the rounds. The bar (<= 1.1 x
the time per step with a real provider) is for snapshots on, as the engine's own bar is;
without snapshots the engine's ~100 us per step is the whole step, and the SDK's ~30 us per
span shows in full. The last row times the no-op hooks a step of an untraced run calls.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any, Literal

import anyio

from benchmarks._scratch import scratch
from benchmarks.bench_engine import OVERHEAD_STEPS, NoOp, _settings, format_table

Row = tuple[str, str, str]
Mode = Literal["absent", "no provider", "SDK, simple", "SDK, batch"]
Snapshots = Literal["off", "flush"]

MODES: tuple[Mode, ...] = ("absent", "no provider", "SDK, simple", "SDK, batch")
BACKENDS = ("asyncio", "trio")
SNAPSHOTS: tuple[Snapshots, ...] = ("off", "flush")
REPEATS = 5
BAR = 1.1  # CPU per step traced (SDK) / untraced, with snapshots
HOOKS_BAR = 0.01  # the hooks a run calls per step when nothing traces it: <= 1% of a step
HOOK_CALLS = 200_000


# -- the child: one mode, every backend and snapshot setting ----------------------------------


def _block_opentelemetry() -> None:
    import importlib.abc

    class NoOpenTelemetry(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name.split(".")[0] == "opentelemetry":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoOpenTelemetry())


def _set_up(mode: Mode) -> None:
    if mode == "absent":
        _block_opentelemetry()
        return
    if mode == "no provider":
        return
    from collections.abc import Sequence

    from opentelemetry import trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    processor = SimpleSpanProcessor if mode == "SDK, simple" else BatchSpanProcessor
    provider.add_span_processor(processor(Discard()))
    trace.set_tracer_provider(provider)


async def _cpu_per_step(snapshots: Snapshots) -> float:
    tmp = scratch(f"otel-{snapshots}-")
    if snapshots == "off":
        settings = _settings(tmp, save_snapshots=False)
    else:
        settings = _settings(tmp, durability="flush")
    started = time.process_time()
    summary = await NoOp(settings).run(step_n=OVERHEAD_STEPS)
    seconds = time.process_time() - started
    assert summary.steps == OVERHEAD_STEPS, summary
    return seconds / OVERHEAD_STEPS * 1e6


def _child(mode: Mode) -> None:
    _set_up(mode)
    anyio.run(_cpu_per_step, "off")  # warm up: imports, first-run costs
    us = {
        f"{backend} {snapshots}": anyio.run(_cpu_per_step, snapshots, backend=backend)
        for snapshots in SNAPSHOTS
        for backend in BACKENDS
    }
    imported = any(m.split(".")[0] == "opentelemetry" for m in sys.modules)
    print(json.dumps({"us": us, "imported": imported}))


# -- the parent -------------------------------------------------------------------------------


def _measure(mode: Mode) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_otel", "--child", mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def run() -> list[Row]:
    """Measure every mode; return rows of (what, figure, bar)."""
    samples: dict[Mode, list[dict[str, float]]] = {mode: [] for mode in MODES}
    imported: dict[Mode, bool] = {}
    for _ in range(REPEATS):
        for mode in MODES:
            found = _measure(mode)
            samples[mode].append(found["us"])
            imported[mode] = found["imported"]
    us = {
        (mode, key): statistics.median(s[key] for s in samples[mode])
        for mode in MODES
        for key in samples[mode][0]
    }
    rows: list[Row] = []
    for snapshots in SNAPSHOTS:
        for backend in BACKENDS:
            key = f"{backend} {snapshots}"
            what = "no snapshots" if snapshots == "off" else 'snapshots, durability="flush"'
            base = us[("absent", key)]
            for mode in MODES:
                step = us[(mode, key)]
                figure = f"{step:,.1f} us CPU/step"
                if mode == "absent":
                    figure += "" if not imported[mode] else " (!: opentelemetry was imported)"
                    bar = "reference"
                else:
                    ratio = step / base
                    figure += f"; {ratio:.3f}x ({step - base:+,.1f} us)"
                    if mode == "no provider":
                        bar = "reported (the same no-op hooks as absent: see the last row)"
                    elif snapshots == "flush":
                        bar = f"<= {BAR}x: {_verdict(ratio <= BAR)}"
                    else:
                        bar = "reported (the engine alone: the worst case)"
                rows.append(
                    (
                        f"[{backend}] {OVERHEAD_STEPS} no-op steps, {what}, OTel {mode}",
                        figure,
                        bar,
                    )
                )
    hooks = _hook_ns()
    engine = us[("absent", "asyncio off")] * 1000
    share = hooks / engine
    rows.append(
        (
            "untraced run (no provider, or no OpenTelemetry): the hooks of one step",
            f"{hooks:,.0f} ns/step; {share:.2%} of the engine's CPU per step (asyncio, no "
            "snapshots)",
            f"<= {HOOKS_BAR:.0%} (no measurable cost): {_verdict(share <= HOOKS_BAR)}",
        )
    )
    return rows


def _hook_ns() -> float:
    """What the engine's trace hooks cost a step of an untraced run: the step's context
    manager and the recorded result's hook, as ``_run_step`` and ``step_recorded`` call
    them (the loop around them included)."""
    from datetime import datetime, timezone

    from rdagent_loop import StepResult
    from rdagent_loop._otel import NO_TRACE

    now = datetime.now(timezone.utc)
    result = StepResult(0, 0, "s0", None, None, now, now)
    otel = NO_TRACE
    started = time.perf_counter_ns()
    for _ in range(HOOK_CALLS):
        with otel.step(0, 0, "s0", None):
            pass
        otel.step_recorded(result, loop_done=False)
    return (time.perf_counter_ns() - started) / HOOK_CALLS


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2])  # type: ignore[arg-type]
        return
    print(format_table(run()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
