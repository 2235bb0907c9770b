"""Bad input is refused where it is given, naming it: here the CLI's ``--timeout``.

``loop.run(all_duration=...)`` and ``parse_duration`` are in tests/test_loop.py and
tests/test_budget.py; the CLI reads ``--timeout`` with the same parser.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rdagent_loop.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (" 2h", "must look like '90s'"),
        ("\u0663s", "must look like '90s'"),  # an Arabic-Indic three
        ("99999999999d", "must be at most 999999999 days"),
        ("1" * 400, "must be at most 999999999 days"),
    ],
    ids=["leading-space", "non-ascii-digit", "beyond-timedelta", "400-digits"],
)
@pytest.mark.parametrize("command", ["run", "resume"])
def test_cli_timeout_goes_through_the_duration_grammar(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    value: str,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    target = "examples.quant_factor:FactorLoop" if command == "run" else "missing"
    # --step-n 0: were the value accepted, nothing would run long
    status = main([command, target, "--step-n", "0", "--timeout", value])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Invalid value for '--timeout'" in err and message in err and repr(value) in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was created
