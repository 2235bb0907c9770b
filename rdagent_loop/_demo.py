"""A real R&D loop, small enough to watch, with no network and nothing but the standard library.

``python -m rdagent_loop demo`` runs it when the full CLI (``rdagent_loop.cli``) is not
installed; ``python -m rdagent_loop._demo`` runs it always.

A hyper-parameter search for a tiny neural network (pure Python) on generated two-moons
data. Each loop is RD-Agent's cycle:

* ``propose`` picks a configuration, exploring at first and then refining the best so far;
* ``coding`` writes a real training script into the loop's workspace;
* ``running`` runs that script as a child process and reads its validation accuracy;
* ``feedback`` compares the accuracy with the best so far;
* ``record`` keeps the result in ``self.history`` (the only step that changes ``self``).

Several loops run at once, a progress display shows them when standard error is a terminal,
every completed step is saved under ``<trace-path>/__session__``, and ``--resume`` continues a
stopped (or finished) session from its newest snapshot.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ._loop import LoopBase
from ._results import RunSummary, StepResult
from ._settings import LoopSettings
from ._steps import step

DEFAULT_LOOPS = 6
DEFAULT_PARALLEL = 3
DEFAULT_TRACE_PATH = "./demo-session"

_SEARCH_SPACE: dict[str, tuple[Any, ...]] = {
    "hidden": (2, 4, 8, 16, 32),
    "epochs": (10, 20, 30, 40),
    "l2": (0.0, 1e-4, 1e-3, 1e-2),
}
_LR_RANGE = (0.003, 1.0)  # sampled log-uniformly


class RunnerError(Exception):
    """The training script failed (crashed, diverged, printed no metric): skip to feedback."""


@dataclass(frozen=True, slots=True)
class Record:
    """One finished loop of the search."""

    loop_idx: int
    config: dict[str, Any]
    accuracy: float | None
    seconds: float | None
    error: str | None
    best: bool

    def line(self) -> str:
        cfg = _describe(self.config)
        if self.accuracy is None:
            return f"loop {self.loop_idx}: {cfg} -> failed ({self.error})"
        mark = "  * new best" if self.best else ""
        return (
            f"loop {self.loop_idx}: {cfg} -> accuracy {self.accuracy:.3f} "
            f"in {self.seconds:.1f}s{mark}"
        )


def _sample(rng: random.Random) -> dict[str, Any]:
    lo, hi = (math.log(v) for v in _LR_RANGE)
    config = {knob: rng.choice(choices) for knob, choices in _SEARCH_SPACE.items()}
    config["lr"] = round(math.exp(rng.uniform(lo, hi)), 3)
    return config


def _neighbour(rng: random.Random, config: dict[str, Any]) -> dict[str, Any]:
    """The configuration with one knob moved one notch (the learning rate by a random factor)."""
    config = {k: v for k, v in config.items() if k != "seed"}
    knob = rng.choice(("hidden", "lr", "epochs", "l2"))
    if knob == "lr":
        lr = config["lr"] * math.exp(rng.gauss(0.0, 0.7))
        config["lr"] = round(min(max(lr, _LR_RANGE[0]), _LR_RANGE[1]), 3)
    else:
        choices = _SEARCH_SPACE[knob]
        i = choices.index(config[knob]) + rng.choice((-1, 1))
        config[knob] = choices[min(max(i, 0), len(choices) - 1)]
    return config


def _key(config: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(config[k] for k in ("hidden", "lr", "epochs", "l2"))


def _describe(config: dict[str, Any]) -> str:
    return (
        f"hidden={config['hidden']:<2} lr={config['lr']:.3f} "
        f"epochs={config['epochs']:<2} l2={config['l2']:g}"
    )


class HyperSearchLoop(LoopBase):
    """propose → coding → running → feedback → record, on a tiny classifier."""

    skip_loop_error = (RunnerError,)
    skip_loop_error_stepname = "feedback"

    def __init__(self, settings: LoopSettings | None = None, seed: int = 0) -> None:
        super().__init__(settings)
        self.seed = seed
        self.history: list[Record] = []
        _write_dataset(self.data_dir, seed)

    # paths follow the session when it is loaded from (or checked out to) another folder
    @property
    def data_dir(self) -> Path:
        return Path(self.settings.trace_path) / "data"

    def _workspace(self, loop_idx: int) -> Path:
        return Path(self.settings.trace_path) / "workspace" / f"loop_{loop_idx}"

    @property
    def best(self) -> Record | None:
        scored = [r for r in self.history if r.accuracy is not None]
        return max(scored, key=lambda r: r.accuracy or 0.0, default=None)

    # -- the steps ------------------------------------------------------------------------

    async def propose(self, prev_out: dict[str, Any]) -> dict[str, Any]:
        """Explore for the first loops, then mostly refine the best configuration found."""
        li = prev_out[self.LOOP_IDX_KEY]
        rng = random.Random(self.seed * 100_003 + li)
        # configurations of recorded loops and of loops in flight (finished loops' outputs
        # live on disk: history is the cheap place to look them up)
        tried = {_key(r.config) for r in self.history}
        for other in range(self.loop_idx):
            if self.step_idx.get(other, 0) < len(self.steps) and other in self.loop_prev_out:
                proposed = self.loop_prev_out[other].get("propose")
                if proposed is not None:
                    tried.add(_key(proposed))
        best = self.best
        explore = best is None or li < 3 or rng.random() < 0.3
        for _ in range(100):
            config = _sample(rng) if explore or best is None else _neighbour(rng, best.config)
            if _key(config) not in tried:
                break
            explore = rng.random() < 0.5  # stuck around the best: widen the search
        config["seed"] = li
        return config

    async def coding(self, prev_out: dict[str, Any]) -> str:
        """Write the training script for the proposed configuration; return its path."""
        workspace = anyio.Path(self._workspace(prev_out[self.LOOP_IDX_KEY]))
        await workspace.mkdir(parents=True, exist_ok=True)
        script = workspace / "train.py"
        await script.write_text(_training_script(prev_out["propose"]))
        return str(script)

    async def running(self, prev_out: dict[str, Any]) -> dict[str, float]:
        """Run the script as a child process; cancelling the step kills it."""
        script = await anyio.Path(prev_out["coding"]).resolve()
        data = await anyio.Path(self.data_dir).resolve()
        started = time.perf_counter()
        done = await anyio.run_process(
            [sys.executable, "-I", str(script), str(data)], cwd=script.parent, check=False
        )
        seconds = time.perf_counter() - started
        out, err = done.stdout.decode(), done.stderr.decode()
        await (script.parent / "run.log").write_text(out + err)
        if done.returncode != 0:
            last = err.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise RunnerError(last[0])
        try:
            metrics = json.loads(out.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RunnerError(f"no metrics in the output of {script}") from None
        return {"accuracy": float(metrics["accuracy"]), "seconds": seconds}

    @step(executor="inline")  # a comparison: too cheap to send anywhere
    def feedback(self, prev_out: dict[str, Any]) -> dict[str, Any]:
        """Judge the result against the best so far (reads ``self``, changes nothing)."""
        error = prev_out.get(self.EXCEPTION_KEY)
        if error is not None:
            return {"accuracy": None, "error": str(error), "improved": False}
        accuracy = prev_out["running"]["accuracy"]
        best = self.best
        improved = best is None or accuracy > (best.accuracy or 0.0)
        return {"accuracy": accuracy, "error": None, "improved": improved}

    def record(self, prev_out: dict[str, Any]) -> Record:
        """Keep the loop's result; it runs one loop at a time, so it may change ``self``."""
        feedback = prev_out["feedback"]
        run = prev_out.get("running") or {}
        best = self.best
        improved = feedback["accuracy"] is not None and (
            best is None or feedback["accuracy"] > (best.accuracy or 0.0)
        )
        record = Record(
            loop_idx=prev_out[self.LOOP_IDX_KEY],
            config=prev_out["propose"],
            accuracy=feedback["accuracy"],
            seconds=run.get("seconds"),
            error=feedback["error"],
            best=improved,
        )
        self.history.append(record)
        return record


# -- the data and the generated code -------------------------------------------------------


def _write_dataset(folder: Path, seed: int) -> None:
    """Two interleaved half-moons with noise, plus four features that carry nothing."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, offset, n in (("train", 1, 1000), ("valid", 2, 500)):
        rng = random.Random(seed * 1000 + offset)
        rows = []
        for i in range(n):
            label = i % 2
            t = rng.uniform(0.0, math.pi)
            if label == 0:
                x, y = math.cos(t), math.sin(t)
            else:
                x, y = 1 - math.cos(t), 0.5 - math.sin(t)
            features = [x + rng.gauss(0, 0.2), y + rng.gauss(0, 0.2)]
            features += [rng.gauss(0, 1) for _ in range(4)]
            rows.append([*(round(v, 5) for v in features), label])
        with (folder / f"{name}.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["x0", "x1", "n0", "n1", "n2", "n3", "label"])
            writer.writerows(rows)


_SCRIPT = '''\
"""Train a one-hidden-layer network by SGD; print the validation accuracy as JSON."""
import csv, json, math, random, sys

HIDDEN, LR, EPOCHS, L2, SEED = {hidden!r}, {lr!r}, {epochs!r}, {l2!r}, {seed!r}


def load(path):
    with open(path) as f:
        rows = [[float(v) for v in row] for row in list(csv.reader(f))[1:]]
    return [r[:-1] for r in rows], [int(r[-1]) for r in rows]


X, Y = load(sys.argv[1] + "/train.csv")
VX, VY = load(sys.argv[1] + "/valid.csv")
rng = random.Random(SEED)
d = len(X[0])
W1 = [[rng.gauss(0, 1 / math.sqrt(d)) for _ in range(d)] for _ in range(HIDDEN)]
b1 = [0.0] * HIDDEN
W2 = [rng.gauss(0, 1 / math.sqrt(HIDDEN)) for _ in range(HIDDEN)]
b2 = 0.0


def forward(x):
    h = [math.tanh(sum(w * v for w, v in zip(row, x)) + b) for row, b in zip(W1, b1)]
    return h, sum(w * v for w, v in zip(W2, h)) + b2


order = list(range(len(X)))
for epoch in range(EPOCHS):
    rng.shuffle(order)
    loss = 0.0
    for i in order:
        x, y = X[i], Y[i]
        h, z = forward(x)
        p = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
        loss -= math.log(max(p if y else 1 - p, 1e-12))
        g = p - y
        for j in range(HIDDEN):
            gh = g * W2[j] * (1 - h[j] * h[j])
            W2[j] -= LR * (g * h[j] + L2 * W2[j])
            row = W1[j]
            for k in range(d):
                row[k] -= LR * (gh * x[k] + L2 * row[k])
            b1[j] -= LR * gh
        b2 -= LR * g
    if not math.isfinite(loss):
        sys.exit(f"training diverged at epoch {{epoch}} (lr={{LR}})")

correct = sum((forward(x)[1] > 0) == bool(y) for x, y in zip(VX, VY))
print(json.dumps({{"accuracy": correct / len(VX), "train_loss": loss / len(X)}}))
'''


def _training_script(config: dict[str, Any]) -> str:
    return _SCRIPT.format(**config)


# -- the command ---------------------------------------------------------------------------


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A hyper-parameter search run as parallel R&D loops, saved to disk.",
    )
    parser.add_argument(
        "--loops",
        type=int,
        help=f"loops to run (default {DEFAULT_LOOPS}; with --resume: what the "
        f"session had left, or {DEFAULT_LOOPS} more if it was finished)",
    )
    parser.add_argument(
        "--parallel", type=int, help=f"loops in flight at once (default {DEFAULT_PARALLEL})"
    )
    parser.add_argument("--steps", type=int, help="stop after this many steps (resumable)")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument(
        "--trace-path",
        default=DEFAULT_TRACE_PATH,
        help=f"session folder (default {DEFAULT_TRACE_PATH})",
    )
    parser.add_argument("--resume", metavar="PATH", help="continue the session saved in PATH")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a session already in --trace-path"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress display")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    return parser


def _say(text: str) -> None:
    """Print above the progress bars (tqdm redraws them below)."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


def _step_semaphore(parallel: int) -> dict[str, int]:
    # proposing and judging read the shared history: one at a time; coding and training: many
    return {"propose": 1, "coding": parallel, "running": parallel, "feedback": 1, "record": 1}


async def _consume(loop: HyperSearchLoop, run_kwargs: dict[str, Any]) -> RunSummary:
    """The structured form: the engine's task group lives inside this ``async with``."""
    async with loop.run(**run_kwargs) as results:
        async for result in results:
            _report(result)
    assert results.summary is not None
    return results.summary


def _report(result: StepResult) -> None:
    if result.step_name == "record" and isinstance(result.output, Record):
        _say(result.output.line())


class _AboveTheBars(logging.Handler):
    """Log records go above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None, prog: str = "python -m rdagent_loop demo") -> int:
    """Run the demo; return the exit status. ``prog`` is how the resume hint calls it."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    for name, least in (("loops", 0), ("parallel", 1), ("steps", 0)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name} must be at least {least}, got {value}")
    handler = _AboveTheBars()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    engine_log = logging.getLogger("rdagent_loop")
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.backend == "trio":
        try:
            import trio  # noqa: F401
        except ImportError:
            print("the trio backend needs trio: pip install 'rdagent_loop[trio]'", file=sys.stderr)
            return 2

    if args.resume is not None:
        where = Path(args.resume).resolve()
        try:
            loop = HyperSearchLoop.load(where)
        except FileNotFoundError as exc:
            print(f"cannot resume: {exc}", file=sys.stderr)
            return 1
        shown = args.resume
        unfinished = loop.get_unfinished_loop_cnt(loop.loop_idx)
        update: dict[str, Any] = {"progress": not args.no_progress}
        if args.parallel is not None:
            update["step_semaphore"] = _step_semaphore(args.parallel)
        loop.settings = loop.settings.model_copy(update=update)
        loop.step_n = None  # --steps budgets one invocation, not the session
        run_kwargs: dict[str, Any] = {"step_n": args.steps}
        if args.loops is not None:
            run_kwargs["loop_n"] = args.loops  # unfinished loops count first
        elif not unfinished and not loop.loop_n:
            run_kwargs["loop_n"] = DEFAULT_LOOPS
            _say(f"the session in {shown} had finished; running {DEFAULT_LOOPS} more loops")
        _say(
            f"resuming {shown}: {len(loop.history)} loops recorded, {unfinished} unfinished, "
            f"on {args.backend}"
        )
    else:
        trace = Path(args.trace_path)
        shown = args.trace_path
        ours = [trace / name for name in ("__session__", "data", "workspace")]
        if any(p.exists() for p in ours):
            if not args.overwrite:
                print(
                    f"{shown} already holds a session: continue it with "
                    f"`{prog} --resume {shlex.quote(shown)}`, "
                    "or start over with --overwrite",
                    file=sys.stderr,
                )
                return 2
            for path in ours:
                shutil.rmtree(path, ignore_errors=True)
        parallel = DEFAULT_PARALLEL if args.parallel is None else args.parallel
        settings = LoopSettings(
            step_semaphore=_step_semaphore(parallel),
            trace_path=trace.resolve(),
            progress=not args.no_progress,
        )
        loop = HyperSearchLoop(settings, seed=args.seed)
        loops = DEFAULT_LOOPS if args.loops is None else args.loops
        run_kwargs = {"loop_n": loops, "step_n": args.steps}
        _say(
            f"hyper-parameter search: {loops} loop{'s' * (loops != 1)}, {parallel} in parallel, "
            f"on {args.backend}; "
            f"session in {shown}"
        )

    resume = f"{prog} --resume {shlex.quote(shown)}"
    started = time.perf_counter()
    try:
        summary = anyio.run(_consume, loop, run_kwargs, backend=args.backend)
    except KeyboardInterrupt:
        print(f"\ninterrupted; every completed step is saved. Resume with: {resume}")
        return 130
    seconds = time.perf_counter() - started

    best = loop.best
    _say(f"{summary} in {seconds:.1f}s")
    if best is not None:
        what = f"accuracy {best.accuracy:.3f} ({_describe(best.config)})"
        _say(f"best so far: loop {best.loop_idx}, {what}")
    snapshots = sum(1 for _ in loop.session_folder.glob("*/*_*"))
    _say(f"session saved in {shown} ({snapshots} snapshots)")
    if loop.get_unfinished_loop_cnt(loop.loop_idx) or loop.loop_n:
        _say(f"to resume where it stopped: {resume}")
    else:
        _say(f"to resume and search further: {resume}")
    return 0


if __name__ == "__main__":
    # run the module's own classes, not copies in __main__, so snapshots name the real module
    from rdagent_loop._demo import main as _main

    sys.exit(_main(prog="python -m rdagent_loop._demo"))
