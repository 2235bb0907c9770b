"""LoopMap: a defaultdict keyed by loop that notes which loops a snapshot must save again."""

from __future__ import annotations

import pickle
from collections import defaultdict
from typing import Any

import pytest

from rdagent_loop._loops import LoopMap, no_value, peek


def test_it_reads_and_writes_like_a_defaultdict() -> None:
    mine: LoopMap[dict[str, Any]] = LoopMap(dict)
    theirs: defaultdict[int, dict[str, Any]] = defaultdict(dict)
    for m in (mine, theirs):
        m[0]["a"] = 1  # a missing loop is created
        m[2] = {"b": 2}
        assert m.get(7) is None and 7 not in m  # get does not create
        assert m.setdefault(3, {"c": 3}) == {"c": 3}
        assert m.pop(9, "gone") == "gone"
        with pytest.raises(KeyError):
            m.pop(9)
        del m[3]
    assert dict(mine) == dict(theirs) == {0: {"a": 1}, 2: {"b": 2}}
    assert mine == dict(theirs) and mine.copy() == mine


def test_a_loop_read_or_written_counts_as_touched_and_an_int_read_does_not() -> None:
    steps: LoopMap[int] = LoopMap(int)
    outputs: LoopMap[dict[str, Any]] = LoopMap(dict)
    steps[0] = 3
    outputs[1]["x"] = 1
    assert steps.take_touched() == {0} and outputs.take_touched() == {1}
    assert steps[0] == 3 and steps.get(0) == 3  # an int cannot be changed in place
    assert steps.take_touched() == set()
    outputs.get(1)["y"] = 2  # a dict can: whoever read it may change it
    assert outputs.take_touched() == {1}
    assert peek(outputs, 1) == {"x": 1, "y": 2} and outputs.peek(5) is None  # the engine's read
    assert outputs.take_touched() == set()
    outputs.pop(1)
    assert outputs.take_touched() == {1}  # gone is a change too


def test_the_lowest_write_is_kept_until_taken() -> None:
    steps: LoopMap[int] = LoopMap(int)
    for li in (5, 2, 8):
        steps[li] = 1
    assert steps.take_lowest_write() == 2
    assert steps.take_lowest_write() is None


def test_it_pickles_by_its_values_and_comes_back_with_every_loop_touched() -> None:
    original: LoopMap[str | None] = LoopMap(no_value, {1: "a", 2: None})
    original.take_touched()
    copy = pickle.loads(pickle.dumps(original))
    assert isinstance(copy, LoopMap) and copy == original and copy[9] is None
    assert copy.take_touched() == {1, 2, 9}  # new to whatever store saves it next
    assert b"no_value" not in pickle.dumps(original)  # the usual factories go by a short name
