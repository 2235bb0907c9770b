"""The Ray executor against real clusters on this machine (nox session ``ray``).

Every Ray process listens on the loopback address only: with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (set before Ray is imported) Ray 2.60 binds the local
node and ``ray.cluster_utils.Cluster`` to 127.0.0.1, which the tests assert.

Ray workers do not share the test's ``sys.path``, so this module's loop classes travel by
value (cloudpickle), as classes of an application's main script do.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import psutil
import pytest

ray = pytest.importorskip("ray")

from executor_helpers import run_until_written, settings_for, wait_gone  # noqa: E402
from ray import cloudpickle  # noqa: E402
from ray._private import ray_constants  # noqa: E402

from rdagent_loop import LoopBase, step  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.ray]

cloudpickle.register_pickle_by_value(sys.modules[__name__])

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


class RayStepFailed(Exception):
    pass


class OnRay(LoopBase):
    """``work`` is a Ray task; it logs when it starts and ends, and can fail or block."""

    def __init__(self, settings, folder: Path, *, fail_loop: int = -1, seconds: float = 0.0):
        super().__init__(settings)
        self.folder = folder
        self.fail_loop = fail_loop
        self.seconds = seconds

    def s0(self, prev_out):
        return os.getpid()

    @step(executor="ray", num_cpus=1)
    def work(self, prev_out):
        assert "s0" in prev_out
        li = prev_out[self.LOOP_IDX_KEY]
        with (self.folder / "work.log").open("a") as log:
            log.write(f"{li} {os.getpid()} {time.time()} start\n")
        if li == self.fail_loop:
            raise RayStepFailed("on ray", li)
        time.sleep(self.seconds)
        with (self.folder / "work.log").open("a") as log:
            log.write(f"{li} {os.getpid()} {time.time()} end\n")
        return os.getpid()

    def s2(self, prev_out):
        return prev_out["work"]


class Placed(LoopBase):
    """``special`` asks for a custom resource that only one node of the cluster has."""

    def s0(self, prev_out):
        return 0

    @step(executor="ray", num_cpus=0.5, resources={"special": 1})
    def special(self, prev_out):
        import ray

        return ray.get_runtime_context().get_node_id()

    def s2(self, prev_out):
        return prev_out["special"]


def assert_loopback_only() -> None:
    assert not ray_constants.ENABLE_RAY_CLUSTER, "Ray was imported before the env var was set"
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert nodes
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
    for proc in psutil.Process().children(recursive=True):
        try:
            listening = [c for c in proc.net_connections("inet") if c.status == "LISTEN"]
        except psutil.Error:
            continue
        for conn in listening:
            assert conn.laddr.ip in LOOPBACK, (proc.name(), conn.laddr)


def log_lines(folder: Path) -> list[list[str]]:
    return [line.split() for line in (folder / "work.log").read_text().splitlines()]


# -- the engine's own session ---------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["trio"])  # one cluster start; the rest run on both
async def test_engine_starts_and_stops_its_own_local_cluster(tmp_path):
    assert not ray.is_initialized()
    loop = OnRay(settings_for(tmp_path), tmp_path)
    async with loop.run(loop_n=1) as results:
        outputs = {r.step_name: r.output async for r in results}
    assert outputs["work"] != os.getpid()
    assert outputs["s2"] == outputs["work"]
    assert not ray.is_initialized()  # it shut down what it started


@pytest.fixture
def two_nodes() -> Iterator[tuple[str, str]]:
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        special = cluster.add_node(num_cpus=1, resources={"special": 1})
        cluster.wait_for_nodes()
        yield cluster.address, special.node_id
    finally:
        cluster.shutdown()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_steps_run_on_the_node_that_has_their_resource(tmp_path, two_nodes):
    address, special_node = two_nodes
    loop = Placed(settings_for(tmp_path, ray_address=address, step_semaphore=2))
    ray.init(address=address)  # the application's session; the engine joins it
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        assert_loopback_only()
        async with loop.run(loop_n=3) as results:
            placed = {r.output async for r in results if r.step_name == "special"}
        assert placed == {special_node}
    finally:
        ray.shutdown()


# -- a local cluster shared by the remaining tests ----------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


async def test_ray_listens_on_loopback_only(local_ray):
    assert_loopback_only()


async def test_ray_step_results_come_back(tmp_path, local_ray):
    loop = OnRay(settings_for(tmp_path, step_semaphore=2), tmp_path)
    async with loop.run(loop_n=2) as results:
        outputs = {(r.loop_idx, r.step_name): r.output async for r in results}
    assert outputs[(0, "s0")] == outputs[(1, "s0")] == os.getpid()
    assert os.getpid() not in {outputs[(0, "work")], outputs[(1, "work")]}
    assert ray.is_initialized()  # the application's session is left alone


async def test_ray_step_error_comes_back_as_itself(tmp_path, local_ray):
    loop = OnRay(settings_for(tmp_path), tmp_path, fail_loop=0)
    with pytest.raises(RayStepFailed) as info:
        await loop.run(loop_n=1)
    assert info.value.args == ("on ray", 0)
    assert "raise RayStepFailed" in str(info.value.__cause__)


class LimitedOnRay(OnRay):
    @step(executor="ray", num_cpus=0.5, limit=1)
    def work(self, prev_out):
        return super().work(prev_out)


async def test_ray_step_limit_is_respected(tmp_path, local_ray):
    loop = LimitedOnRay(settings_for(tmp_path, step_semaphore=2), tmp_path, seconds=0.3)
    await loop.run(loop_n=3)
    lines = log_lines(tmp_path)
    spans = sorted(
        (float(s[2]), float(e[2]))
        for s in lines
        for e in lines
        if s[0] == e[0] and s[3] == "start" and e[3] == "end"
    )
    assert len(spans) == 3
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))


async def test_cancelled_ray_step_stops(tmp_path, local_ray):
    # the budget ends once the task has started (it logged so), however long Ray took to
    # schedule it; a task that was not stopped would hold the run for 600 s
    loop = OnRay(settings_for(tmp_path), tmp_path, seconds=600)
    summary = await run_until_written(loop, [tmp_path / "work.log"], loop_n=1)
    assert summary.reason == "all_duration"
    lines = log_lines(tmp_path)
    assert [line[3] for line in lines] == ["start"]  # it never ran to its end
    workers = [int(line[1]) for line in lines]
    assert not wait_gone(workers, timeout=10)  # ray.cancel(force=True) killed the task


class JournalOnRay(LoopBase):
    """A Ray step that memoizes a call, fails its first attempt, and asks a question."""

    def __init__(self, settings, folder: Path):
        super().__init__(settings)
        self.folder = folder

    def s0(self, prev_out):
        return prev_out[self.LOOP_IDX_KEY]

    @step(executor="ray", num_cpus=0.5, retries=1, backoff=0.01)
    def work(self, prev_out):
        def call_model():
            with (self.folder / "calls").open("a") as f:
                f.write("model\n")
            self.charge(1.5, tokens=30)  # journaled with the result: charged once
            return "drafted on ray"

        draft = self.memo_blocking("model", call_model)
        marker = self.folder / "failed-once"
        if not marker.exists():
            marker.write_text("x")
            raise ConnectionError("the first attempt fails")
        return (draft, self.ask_blocking("approve?", payload=draft))


async def test_ray_steps_journal_and_ask_through_the_engine(tmp_path, local_ray):
    from rdagent_loop import Question

    loop = JournalOnRay(settings_for(tmp_path), tmp_path)
    async with loop.run(loop_n=1) as results:
        items = []
        async for item in results:
            items.append(item)
            if isinstance(item, Question):
                assert item.payload == "drafted on ray"
                results.answer(item.id, "approved")
    assert (tmp_path / "calls").read_text() == "model\n"  # replayed on the retry
    assert loop.loop_prev_out[0]["work"] == ("drafted on ray", "approved")
    assert [type(i).__name__ for i in items] == ["StepResult", "Question", "StepResult"]
    assert results.summary is not None and results.summary.replayed == 1
    assert (items[-1].cost, items[-1].tokens) == (1.5, 30)
    assert (results.summary.cost, loop.spending.cost) == (1.5, 1.5)
