"""StepIndex: still a defaultdict(int), but finished loops pickle as packed pages."""

from __future__ import annotations

import copy
import pickle
from collections import defaultdict
from typing import Any

import pytest
from looplib import Chain

from rdagent_loop._step_index import PAGE, StepIndex

N_STEPS = 3


def finished_run(loops: int, in_flight: int = 2) -> StepIndex:
    index = StepIndex()
    for li in range(loops):
        index[li] = N_STEPS
    for li in range(loops, loops + in_flight):
        index[li] = 1
    index.seal(N_STEPS)
    return index


def roundtrip(index: StepIndex) -> StepIndex:
    restored = pickle.loads(pickle.dumps(index, protocol=5))
    assert isinstance(restored, StepIndex)
    assert dict(restored) == dict(index)
    assert list(restored)[: restored.sealed] == list(range(restored.sealed))
    return restored


def test_it_is_a_defaultdict_of_int() -> None:
    index = StepIndex()
    assert isinstance(index, defaultdict)
    assert index.default_factory is int
    assert index[7] == 0
    assert 7 in index
    assert index == {7: 0}
    assert StepIndex({1: 2}) == {1: 2}
    assert StepIndex(int, [(1, 2)]) == {1: 2}
    with pytest.raises(TypeError, match="at most one mapping"):
        StepIndex({1: 2}, {3: 4})


def test_only_finished_leading_loops_are_sealed() -> None:
    index = finished_run(loops=2 * PAGE + 5)
    assert index.sealed == 2 * PAGE + 5
    func, (pages, _page, loose) = index.__reduce__()
    assert func is not None
    assert len(pages) == 2 and all(isinstance(p, bytes) for p in pages)
    assert loose == {2 * PAGE + 5: 1, 2 * PAGE + 6: 1}  # the loops in flight, nothing else
    roundtrip(index)


def test_full_pages_pickle_to_the_same_objects_as_loops_finish() -> None:
    index = finished_run(loops=PAGE + 1)
    first = index.__reduce__()[1][0]
    index[PAGE + 1] = N_STEPS
    index.seal(N_STEPS)
    assert index.__reduce__()[1][0][0] is first[0]


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.__setitem__(3, 1),  # a finished loop made live again
        lambda d: d.__delitem__(3),
        lambda d: d.pop(3),
        lambda d: d.pop(10_000, None),
        lambda d: d.popitem(),
        lambda d: d.update({2: 0, 99_999: 4}),
        lambda d: d.__ior__({5: 1}),
        lambda d: d.setdefault(4, 9),
        lambda d: d.setdefault(77_777, 2),
        lambda d: d.__getitem__(55_555),  # a missing key is created, as in a defaultdict
        lambda d: d.clear(),
        lambda d: d.__setitem__(5, "not a step"),  # odd values stay loose, never sealed
        lambda d: d.__setitem__(6, 2**70),
        lambda d: dict.__setitem__(d, 88_888, 0),  # behind the subclass's back
        lambda d: dict.__delitem__(d, 1),
    ],
)
def test_every_write_survives_a_pickle(change: Any) -> None:
    index = finished_run(loops=PAGE + 10)
    change(index)
    restored = roundtrip(index)
    restored.seal(N_STEPS)
    roundtrip(restored)


def test_copies_and_union_stay_step_indexes() -> None:
    index = finished_run(loops=20)
    for other in (index.copy(), copy.copy(index), copy.deepcopy(index), index | {99: 1}):
        assert isinstance(other, StepIndex)
        assert other.items() >= index.items()
        roundtrip(other)


def test_a_loop_keeps_a_step_index_through_dump_and_load(tmp_path: Any) -> None:
    from rdagent_loop import LoopSettings

    loop = Chain(LoopSettings(trace_path=tmp_path, progress=False))
    for li in range(5):
        loop.step_idx[li] = len(loop.steps)
    loop.step_idx[5] = 1
    loop.dump(loop.session_folder / "5" / "0_s0")
    restored = Chain.load(loop.session_folder / "5" / "0_s0")
    assert isinstance(restored.step_idx, StepIndex)
    assert dict(restored.step_idx) == dict(loop.step_idx)
    assert restored.step_idx.sealed == 5


def test_a_plain_defaultdict_set_by_the_user_still_round_trips(tmp_path: Any) -> None:
    from rdagent_loop import LoopSettings

    loop = Chain(LoopSettings(trace_path=tmp_path, progress=False))
    loop.step_idx = defaultdict(int, {0: 3, 1: 1})
    loop.dump(loop.session_folder / "1" / "0_s0")
    restored = Chain.load(loop.session_folder / "1" / "0_s0")
    assert isinstance(restored.step_idx, StepIndex)
    assert dict(restored.step_idx) == {0: 3, 1: 1}
