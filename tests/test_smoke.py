import pytest

from rdagent_loop import LoopBase

pytestmark = pytest.mark.anyio


class Tiny(LoopBase):
    async def s0(self, prev_out):
        return 0

    def s1(self, prev_out):
        assert "s0" in prev_out
        return 1


async def test_runs_two_loops(settings):
    summary = await Tiny(settings).run(loop_n=2)
    assert (summary.steps, summary.loops, summary.reason) == (4, 2, "loop_n")
