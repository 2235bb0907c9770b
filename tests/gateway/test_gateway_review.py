"""The pieces of the gateway's questions that need no server: payloads as the browser gets
them, and what the examples' reviewers' answers mean."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import pytest

from examples.gateway.app import MAX_PAYLOAD, payload_json
from examples.gateway.review import answer_text, verdict


@dataclass(frozen=True)
class Factor:
    name: str
    ic: float
    tags: frozenset[str]


class BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr today")


def test_a_payload_goes_as_json_when_it_is_json() -> None:
    payload = {"factor": Factor("momentum", 0.03, frozenset({"b", "a"})), "n": [1, 2]}
    value, text = payload_json(payload)
    assert value == {"factor": {"name": "momentum", "ic": 0.03, "tags": ["a", "b"]}, "n": [1, 2]}
    assert json.loads(text) == value
    assert payload_json(None) == (None, "")
    assert payload_json("plain") == ("plain", '"plain"')


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (math.nan, "nan"),  # not JSON: the browser gets its repr
        ({1: object}, "{1: <class 'object'>}"),
    ],
)
def test_a_payload_that_is_not_json_goes_as_text(payload: Any, text: str) -> None:
    assert payload_json(payload) == (None, text)
    value, text = payload_json(BrokenRepr())  # whatever a step passes, the stream goes on
    assert value is None and text.startswith("<BrokenRepr instance at 0x")


def test_a_long_payload_is_cut_short() -> None:
    value, text = payload_json("x" * MAX_PAYLOAD)  # with its quotes: 2 characters too long
    assert value is None and len(text) < 1000 and "..." in text
    cycle: list[Any] = []
    cycle.append(cycle)
    assert payload_json(cycle) == (None, "[[[[[[[...]]]]]]]")  # JSON refuses a cycle


@pytest.mark.parametrize(
    ("answer", "machine", "kept"),
    [
        ("yes", False, True),
        (" Yes! ", False, True),
        (True, False, True),
        ("no", True, False),
        (False, True, False),
        ("looks odd, but fine", True, True),  # a note: the machine's verdict stands
        ("looks odd, but fine", False, False),
        ({"k": 1}, True, True),
        (None, False, False),
    ],
)
def test_what_a_reviewer_s_answer_means(answer: Any, machine: bool, kept: bool) -> None:
    assert verdict(answer, machine) is kept


def test_answers_are_shown_as_they_came() -> None:
    assert answer_text("no") == '"no"'
    assert answer_text({"k": [1, None]}) == '{"k": [1, null]}'
    assert answer_text(object) == "<class 'object'>"
