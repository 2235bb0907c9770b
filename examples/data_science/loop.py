"""RD-Agent's data-science loop, on a generated regression task, with real code and processes.

Every loop is RD-Agent's cycle:

* ``direct_exp_gen`` asks the "LLM" (:mod:`.coder`) for an experiment, then for a critique
  of it (two model calls, as RD-Agent's proposal stage makes several), and checks it against
  the policy: a proposal that trains on the validation split is a :class:`PolicyError`,
  which *withdraws* the loop (the engine rolls back and asks again);
* ``coding`` has the "LLM" write a real training script into the loop's workspace and
  checks that it compiles (a :class:`CoderError` skips to ``record``);
* ``running`` runs the script as a child process (``anyio.run_process``: cancelling the step
  kills it) and reads its validation RMSE (a crash is a :class:`RunnerError`, skips to
  ``record``);
* ``feedback`` compares the RMSE with the best so far;
* ``record`` keeps the result in ``self.trace`` and ``self.best`` — the only step that
  changes ``self`` (it runs one loop at a time, and last, so always on the event loop).

Every model call is memoized (``memo`` / ``memo_blocking``): a step run again before it
completed (after Ctrl-C, a crash, the deadline) gets the answers it already paid for from the
session's journal, and ``llm_calls.jsonl`` shows only the calls really made. After a resume
the demo says how many calls the run replayed (:func:`watch_runs`). Each call charges what a
real model would bill for its tokens (``self.charge`` inside the memoized call, so a replayed
answer is not billed again; :func:`.coder.model_bill`), in US dollars: ``--cost`` caps it.

Run it with ``python -m rdagent_loop demo`` or ``rdagent-loop run
examples.data_science.loop:DataScienceLoop --loop-n 8 --parallel 3 --cost 0.5``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio

from rdagent_loop import LoopBase, LoopRun, LoopSettings

from .coder import CodeArtifact, FakeLLM, Proposal, describe, model_bill
from .dataset import write_dataset


class CoderError(Exception):
    """The generated code is broken before it runs (it does not compile)."""


class RunnerError(Exception):
    """The training script failed: crashed, timed out, or printed no metric."""


class PolicyError(Exception):
    """The proposal breaks a rule of the competition (it would train on validation data)."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """What the training script reported."""

    rmse: float
    seconds: float

    def __str__(self) -> str:
        return f"rmse {self.rmse:.4f} in {self.seconds:.2f}s"


@dataclass(frozen=True, slots=True)
class Feedback:
    """The judgement of one experiment against the best so far."""

    decision: bool
    reason: str
    rmse: float | None

    def __str__(self) -> str:
        return ("accept: " if self.decision else "reject: ") + self.reason


@dataclass(frozen=True, slots=True)
class Record:
    """One finished loop, as kept in ``DataScienceLoop.trace``."""

    loop_idx: int
    config: dict[str, Any]
    rmse: float | None
    error: str | None
    new_best: bool

    def __str__(self) -> str:
        if self.rmse is None:
            return f"loop {self.loop_idx}: {describe(self.config)} failed ({self.error})"
        mark = " * new best" if self.new_best else ""
        return f"loop {self.loop_idx}: {describe(self.config)} rmse {self.rmse:.4f}{mark}"


_watchers: ContextVar[list[LoopRun] | None] = ContextVar("data_science_runs", default=None)


@contextmanager
def watch_runs() -> Iterator[list[LoopRun]]:
    """Collect the runs a :class:`DataScienceLoop` starts in this context (and the tasks and
    event loops started from it): the demo command reads their statistics when they are
    over, to say what a resume replayed from the journal."""
    runs: list[LoopRun] = []
    token = _watchers.set(runs)
    try:
        yield runs
    finally:
        _watchers.reset(token)


class DataScienceLoop(LoopBase):
    """direct_exp_gen → coding → running → feedback → record."""

    skip_loop_error = (CoderError, RunnerError)
    skip_loop_error_stepname = "record"
    withdraw_loop_error = (PolicyError,)

    def __init__(
        self,
        settings: LoopSettings | None = None,
        *,
        seed: int = 0,
        n_rows: int = 400,
        bad_proposal_rate: float = 0.1,
        bug_rate: float = 0.1,
        llm_latency: float = 0.05,
        run_timeout: float = 120.0,
    ) -> None:
        super().__init__(settings)
        self.seed = seed
        self.n_rows = n_rows
        self.bad_proposal_rate = bad_proposal_rate
        self.bug_rate = bug_rate
        self.llm_latency = llm_latency
        self.run_timeout = run_timeout
        self.trace: list[Record] = []
        self.best: Record | None = None

    # paths follow the session when it is loaded from, or checked out to, another folder
    @property
    def trace_folder(self) -> Path:
        # absolute: the training script runs in the workspace, not where we were started
        return Path(self.settings.trace_path).absolute()

    @property
    def data_dir(self) -> Path:
        return self.trace_folder / "data"

    def _workspace(self, loop_idx: int) -> Path:
        return self.trace_folder / "workspace" / f"loop_{loop_idx}"

    def _llm(self) -> FakeLLM:
        return FakeLLM(
            self.trace_folder / "llm_calls.jsonl", self.seed, self.bad_proposal_rate, self.bug_rate
        )

    def run(
        self,
        step_n: int | None = None,
        loop_n: int | None = None,
        all_duration: str | float | timedelta | None = None,
        all_cost: float | None = None,
    ) -> LoopRun:
        """``LoopBase.run``; the handle also goes to the :func:`watch_runs` block around it."""
        handle = super().run(
            step_n=step_n, loop_n=loop_n, all_duration=all_duration, all_cost=all_cost
        )
        watchers = _watchers.get()
        if watchers is not None:
            watchers.append(handle)
        return handle

    async def _think(self, call: Callable[..., Any], *args: Any) -> Any:
        """A model call: the model thinks for ``llm_latency`` seconds, then answers (and
        bills it)."""
        await anyio.sleep(self.llm_latency)
        return self._answer(call, *args)

    def _answer(self, call: Callable[..., Any], *args: Any) -> Any:
        """The model answers ``call(*args)``, and the step is charged for its tokens."""
        answer = call(*args)
        cost, tokens = model_bill(args, answer)
        self.charge(cost, tokens=tokens)
        return answer

    # -- the steps ------------------------------------------------------------------------

    async def direct_exp_gen(self, prev_out: dict[str, Any]) -> Proposal:
        """Propose the next experiment; a proposal against the rules withdraws the loop."""
        li = prev_out[self.LOOP_IDX_KEY]
        llm = self._llm()
        # memoized: stopped during the critique, the step run again pays only for that
        proposal = await self.memo("propose", self._think, llm.propose, li)
        proposal = await self.memo("critique", self._think, llm.critique, li, proposal)
        if proposal.config.get("train_on", "train") != "train":
            raise PolicyError(
                f"loop {li}: the proposal trains on {proposal.config['train_on']!r}; "
                "only the training split may be used"
            )
        return proposal

    def coding(self, prev_out: dict[str, Any]) -> CodeArtifact:
        """Write the training script into the loop's workspace; it must compile."""
        li = prev_out[self.LOOP_IDX_KEY]
        proposal: Proposal = prev_out["direct_exp_gen"]
        artifact: CodeArtifact = self.memo_blocking(
            "code", self._answer, self._llm().write_code, li, proposal
        )
        script = artifact.materialize(self._workspace(li))
        try:
            compile(script.read_text(), str(script), "exec")
        except SyntaxError as exc:
            raise CoderError(
                f"{script.name} does not compile: line {exc.lineno}: {exc.msg}"
            ) from None
        return artifact

    async def running(self, prev_out: dict[str, Any]) -> RunResult:
        """Run the script as a child process and read its metric."""
        li = prev_out[self.LOOP_IDX_KEY]
        artifact: CodeArtifact = prev_out["coding"]
        script = artifact.materialize(self._workspace(li))
        data = write_dataset(self.data_dir, self.seed, self.n_rows)
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.run_timeout):
                done = await anyio.run_process(
                    [sys.executable, "-I", script.name, str(data)],
                    cwd=script.parent,
                    check=False,
                    # its own session: a Ctrl-C in the terminal stops the run, and the run
                    # kills the script; the script never sees the signal first
                    start_new_session=True,
                )
        except TimeoutError:
            raise RunnerError(f"{script} ran longer than {self.run_timeout:g}s") from None
        seconds = time.perf_counter() - started
        out, err = done.stdout.decode(), done.stderr.decode()
        (script.parent / "run.log").write_text(out + err)
        if done.returncode != 0:
            last = err.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
            raise RunnerError(last[0])
        try:
            scores = json.loads(out.strip().splitlines()[-1])
            return RunResult(float(scores["rmse"]), seconds)
        except (IndexError, KeyError, TypeError, ValueError):
            raise RunnerError(f"{script} printed no metric") from None

    async def feedback(self, prev_out: dict[str, Any]) -> Feedback:
        """Compare with the best so far (reads ``self``, changes nothing)."""
        result: RunResult = prev_out["running"]
        best = self.best
        if best is None or best.rmse is None:
            return Feedback(True, f"first result: rmse {result.rmse:.4f}", result.rmse)
        if result.rmse < best.rmse:
            return Feedback(True, f"rmse {result.rmse:.4f} beats {best.rmse:.4f}", result.rmse)
        return Feedback(False, f"rmse {result.rmse:.4f} does not beat {best.rmse:.4f}", result.rmse)

    def record(self, prev_out: dict[str, Any]) -> Record:
        """Keep the loop's result; the one step that changes ``self``."""
        li = prev_out[self.LOOP_IDX_KEY]
        proposal: Proposal = prev_out["direct_exp_gen"]
        error = prev_out.get(self.EXCEPTION_KEY)
        feedback: Feedback | None = prev_out.get("feedback")
        rmse = feedback.rmse if feedback is not None and error is None else None
        # feedback ran beside other loops; the best may have moved since: check again
        new_best = rmse is not None and (
            self.best is None or self.best.rmse is None or rmse < self.best.rmse
        )
        record = Record(
            li,
            {k: v for k, v in proposal.config.items() if k != "seed"},
            rmse,
            None if error is None else f"{type(error).__name__}: {error}",
            new_best,
        )
        self.trace.append(record)
        if new_best:
            self.best = record
        return record
