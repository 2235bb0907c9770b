"""Code that changed since a session was saved (DESIGN.md §3.4).

"Saved code" and "today's code" are two real versions of one class: the module
``evolving`` (class ``Evolving``) is written to a folder per version and imported afresh, so
both have the qualified name ``evolving:Evolving``. A session is saved by running the saved
code; it is then loaded, checked (``rdagent-loop check``, a child process run in today's
folder) and resumed with today's code.

* A step inserted: a saved loop at ``coding`` continues at ``coding`` though its index
  moved; finished loops (sealed pages among them) stay finished, and stay so once the
  resumed run has saved them again.
* A step removed: a loop standing at it is a ``SnapshotError`` naming the loop, the step
  and today's steps; a loop at a step that is left continues there.
* A step renamed through ``migrate``: its loops continue at the new name, their outputs
  moved with them.
* ``migrate`` is called with (state, saved version, saved steps), only for an older
  version; a newer saved version is refused; a step file without ``session_version`` is
  version 0.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from rdagent_loop import LoopBase, LoopSettings, SnapshotError
from rdagent_loop._inspect import read_session
from rdagent_loop._session._format import encode_tail, read_manifest

pytestmark = pytest.mark.anyio

MODULE = "evolving"
REPO = Path(__file__).resolve().parents[2]

HEADER = """\
from typing import Any

from rdagent_loop import LoopBase

CALLS: list[Any] = []  # what migrate was called with


class Base(LoopBase):
    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.ran: list[tuple[int, str]] = []

    def _did(self, prev_out: dict[str, Any], name: str) -> int:
        li = prev_out[self.LOOP_IDX_KEY]
        self.ran.append((li, name))
        return li
"""

SAVED = """
class Evolving(Base):
    session_version = {version}

    async def propose(self, prev_out):
        return f"idea-{{self._did(prev_out, 'propose')}}"

    async def coding(self, prev_out):
        self._did(prev_out, "coding")
        return f"code for {{prev_out['propose']}}"

    async def running(self, prev_out):
        self._did(prev_out, "running")
        return f"ran {{prev_out['coding']}}"
"""

INSERTED = """
class Evolving(Base):
    async def propose(self, prev_out):
        return f"idea-{self._did(prev_out, 'propose')}"

    async def lint(self, prev_out):
        self._did(prev_out, "lint")
        return "clean"

    async def coding(self, prev_out):
        self._did(prev_out, "coding")
        return f"code for {prev_out['propose']}"

    async def running(self, prev_out):
        self._did(prev_out, "running")
        return f"ran {prev_out['coding']}"
"""

REMOVED = """
class Evolving(Base):
    async def propose(self, prev_out):
        return f"idea-{self._did(prev_out, 'propose')}"

    async def running(self, prev_out):
        self._did(prev_out, "running")
        return f"ran {prev_out.get('coding', 'nothing')}"
"""

RENAMED = """
class Evolving(Base):
    session_version = 1

    async def propose(self, prev_out):
        return f"idea-{self._did(prev_out, 'propose')}"

    async def code(self, prev_out):  # was "coding"
        self._did(prev_out, "code")
        return f"code for {prev_out['propose']}"

    async def running(self, prev_out):
        self._did(prev_out, "running")
        return f"ran {prev_out['code']}"

    @classmethod
    def migrate(cls, state, saved_version, saved_steps):
        CALLS.append((saved_version, saved_steps))
        if saved_version < 1:  # version 1 renamed "coding" to "code"
            old = saved_steps.index("coding")
            for li, at in list(state["step_idx"].items()):
                if at == old:
                    state["step_idx"][li] = "code"
            for out in state["loop_prev_out"].values():
                if "coding" in out:
                    out["code"] = out.pop("coding")
        return state
"""

RECORDS_CALLS = """
class Evolving(Base):
    session_version = {version}

    async def propose(self, prev_out):
        return f"idea-{{self._did(prev_out, 'propose')}}"

    async def coding(self, prev_out):
        self._did(prev_out, "coding")
        return f"code for {{prev_out['propose']}}"

    async def running(self, prev_out):
        self._did(prev_out, "running")
        return f"ran {{prev_out['coding']}}"

    @classmethod
    def migrate(cls, state, saved_version, saved_steps):
        CALLS.append((state, saved_version, saved_steps))
        return state
"""

Define = Callable[[str, str], type[LoopBase]]


@pytest.fixture
def code(tmp_path: Path) -> Iterator[Define]:
    """``code("saved", SOURCE)``: class ``Evolving`` as SOURCE defines it, in module
    ``evolving`` written to ``tmp_path / "saved"`` and imported afresh (the version imported
    before is forgotten): two versions of a class under one qualified name."""
    folders: list[str] = []

    def forget() -> None:
        sys.modules.pop(MODULE, None)
        sys.path[:] = [p for p in sys.path if p not in folders]

    def define(version: str, source: str) -> type[LoopBase]:
        folder = tmp_path / version
        folder.mkdir()
        (folder / f"{MODULE}.py").write_text(HEADER + textwrap.dedent(source))
        forget()
        folders.append(str(folder))
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
        cls: type[LoopBase] = importlib.import_module(MODULE).Evolving
        return cls

    yield define
    forget()


async def save(cls: type[LoopBase], settings: LoopSettings, **budgets: Any) -> LoopBase:
    loop = cls(settings)
    await loop.run(**budgets)
    return loop


def ran(loop: LoopBase, since: int) -> list[tuple[int, str]]:
    executed: list[tuple[int, str]] = loop.ran  # type: ignore[attr-defined]
    return executed[since:]


def newest_manifest(loop: LoopBase) -> dict[str, Any]:
    newest = max(
        (p for p in loop.session_folder.glob("*/*_*") if p.is_file()),
        key=lambda p: p.stat().st_mtime_ns,
    )
    with newest.open("rb") as f:
        fields: dict[str, Any] = read_manifest(f, newest, None).fields
    return fields


# -- a step inserted -------------------------------------------------------------------------


async def test_a_loop_continues_at_its_step_when_a_step_is_inserted_before_it(
    code: Define, settings: LoopSettings
) -> None:
    saved = code("saved", SAVED.format(version=0))
    # 17 loops finished (a sealed page of 16 and one more), loop 17 at "coding"
    before = await save(saved, settings, step_n=17 * 3 + 1)
    assert before.step_idx[17] == 1 and before.steps[1] == "coding"
    assert newest_manifest(before)["steps"] == ["propose", "coding", "running"]

    today = code("today", INSERTED)
    loop = today.load(settings.trace_path)
    assert loop.steps == ["propose", "lint", "coding", "running"]
    assert loop.step_idx[17] == 2  # "coding", not "lint", though its index moved
    assert all(loop.step_idx[li] == 4 for li in range(17))  # finished, and still finished
    assert loop.get_unfinished_loop_cnt(loop.loop_idx) == 1
    # inspect puts each finished step under its name, not its old position
    report, _ = read_session(settings.trace_path, f"{MODULE}:Evolving")
    assert [(s.step_name, s.status) for s in report.loops[0].steps] == [
        ("propose", "done"),
        ("lint", "skipped"),
        ("coding", "done"),
        ("running", "done"),
    ]
    mark = len(loop.ran)  # type: ignore[attr-defined]
    await loop.run(loop_n=2)
    assert ran(loop, mark) == [
        (17, "coding"),
        (17, "running"),
        (18, "propose"),
        (18, "lint"),
        (18, "coding"),
        (18, "running"),
    ]
    assert loop.loop_prev_out[17]["running"] == "ran code for idea-17"
    fields = newest_manifest(loop)
    assert fields["steps"] == loop.steps
    # loops 0-15 saved again (their step_idx changed) and sealed again: no page overrides
    assert fields["loops"]["sealed"] == 1
    assert [page for page, *_ in fields["loops"]["open"]] == [1]

    # what the resumed run saved holds every loop at today's indices, finished ones too
    again = today.load(settings.trace_path)
    assert {li: again.step_idx[li] for li in range(19)} == dict.fromkeys(range(19), 4)
    assert again.__dict__["_placement"].moved == ()


# -- a step removed --------------------------------------------------------------------------


async def test_a_loop_at_a_removed_step_is_refused_and_one_after_it_continues(
    code: Define, settings: LoopSettings
) -> None:
    saved = code("saved", SAVED.format(version=0))
    await save(saved, settings, step_n=5)  # loop 0 finished, loop 1 at "running"
    folder = settings.trace_path / "__session__"
    at_coding = folder / "1" / "0_propose"  # loop 1 at "coding"

    today = code("today", REMOVED)
    with pytest.raises(SnapshotError) as caught:
        today.load(at_coding)
    message = str(caught.value)
    assert "loop 1 stands at step 'coding'" in message
    assert "its steps are ['propose', 'running']" in message
    assert "migrate" in message and "session_version" in message

    loop = today.load(settings.trace_path)  # 1/1_coding: loop 1 at "running"
    assert loop.step_idx[1] == 1 and loop.steps[1] == "running"
    assert loop.step_idx[0] == 2  # finished
    mark = len(loop.ran)  # type: ignore[attr-defined]
    await loop.run(loop_n=1)
    assert ran(loop, mark) == [(1, "running")]
    assert loop.loop_prev_out[1]["running"] == "ran code for idea-1"


# -- a step renamed through migrate ----------------------------------------------------------


async def test_a_step_renamed_through_migrate(
    code: Define, settings: LoopSettings, tmp_path: Path
) -> None:
    saved = code("saved", SAVED.format(version=0))
    await save(saved, settings, step_n=4)  # loop 0 finished, loop 1 at "coding"
    folder = settings.trace_path / "__session__"
    at_running = folder / "0" / "1_coding"  # loop 0 at "running", its output "coding"

    today = code("today", RENAMED)
    module = sys.modules[MODULE]
    loop = today.load(settings.trace_path)
    assert module.CALLS == [(0, ("propose", "coding", "running"))]
    assert loop.step_idx[1] == 1 and loop.steps[1] == "code"
    assert loop.loop_prev_out[0]["code"] == "code for idea-0"
    assert "coding" not in loop.loop_prev_out[0]
    mark = len(loop.ran)  # type: ignore[attr-defined]
    await loop.run(loop_n=1)
    assert ran(loop, mark) == [(1, "code"), (1, "running")]
    assert loop.loop_prev_out[1]["running"] == "ran code for idea-1"
    fields = newest_manifest(loop)
    assert (fields["steps"], fields["session_version"]) == (["propose", "code", "running"], 1)

    # a loop after the renamed step reads its output under the new name
    fork = today.load(at_running, checkout=tmp_path / "fork")
    assert fork.step_idx[0] == 2 and fork.loop_prev_out[0]["code"] == "code for idea-0"
    mark = len(fork.ran)  # type: ignore[attr-defined]
    await fork.run(loop_n=1)
    assert ran(fork, mark) == [(0, "running")]
    assert fork.loop_prev_out[0]["running"] == "ran code for idea-0"

    # saved by today's code: no migration any more
    module.CALLS.clear()
    assert today.load(settings.trace_path).step_idx[1] == 3
    assert module.CALLS == []


# -- session_version and migrate -------------------------------------------------------------


async def test_migrate_is_called_only_for_an_older_saved_version(
    code: Define, settings: LoopSettings
) -> None:
    saved = code("saved", SAVED.format(version=0))
    await save(saved, settings, step_n=4)
    today = code("today", RECORDS_CALLS.format(version=3))
    calls = sys.modules[MODULE].CALLS

    loop = today.load(settings.trace_path)
    ((state, saved_version, saved_steps),) = calls
    assert (saved_version, saved_steps) == (0, ("propose", "coding", "running"))
    assert isinstance(state, dict)
    assert {"step_idx", "loop_prev_out", "loop_trace", "settings", "ran"} <= set(state)
    assert dict(state["step_idx"]) == {0: 3, 1: 1}  # as saved
    assert loop.step_idx == {0: 3, 1: 1}

    await loop.run(loop_n=1)
    assert newest_manifest(loop)["session_version"] == 3
    calls.clear()
    today.load(settings.trace_path)
    assert calls == []  # saved by version 3: nothing to migrate


async def test_a_newer_saved_version_is_refused(code: Define, settings: LoopSettings) -> None:
    saved = code("saved", SAVED.format(version=2))
    before = await save(saved, settings, step_n=2)
    assert newest_manifest(before)["session_version"] == 2
    today = code("today", RECORDS_CALLS.format(version=1))
    with pytest.raises(SnapshotError) as caught:
        today.load(settings.trace_path)
    assert "session_version 2" in str(caught.value)
    assert "session_version 1" in str(caught.value)
    assert sys.modules[MODULE].CALLS == []


async def test_a_step_file_without_session_version_is_version_0(
    code: Define, settings: LoopSettings
) -> None:
    saved = code("saved", SAVED.format(version=0))
    await save(saved, settings, step_n=2)
    file = settings.trace_path / "__session__" / "0" / "1_coding"
    strip_session_version(file)
    today = code("today", RECORDS_CALLS.format(version=1))
    loop = today.load(file)
    [(_, saved_version, _)] = sys.modules[MODULE].CALLS
    assert saved_version == 0
    assert loop.step_idx[0] == 2


def strip_session_version(file: Path) -> None:
    """Rewrite ``file`` as an engine without ``session_version`` wrote it."""
    data = file.read_bytes()
    with file.open("rb") as f:
        manifest = read_manifest(f, file, None)
    fields = {k: v for k, v in manifest.fields.items() if k != "session_version"}
    assert len(fields) == len(manifest.fields) - 1
    file.write_bytes(data[: manifest.body_end] + encode_tail(fields, None))
    with file.open("rb") as f:
        assert "session_version" not in read_manifest(f, file, None).fields


async def test_what_migrate_gets_wrong_is_said(code: Define, settings: LoopSettings) -> None:
    saved = code("saved", SAVED.format(version=0))
    await save(saved, settings, step_n=4)  # loop 1 at "coding"

    nowhere = code("nowhere", RENAMED.replace('[li] = "code"', '[li] = "kode"'))
    with pytest.raises(SnapshotError) as caught:
        nowhere.load(settings.trace_path)
    assert "placed loop 1 at step 'kode'" in str(caught.value)
    assert "its steps are ['propose', 'code', 'running']" in str(caught.value)

    forgot = code("forgot", RENAMED.replace('state["step_idx"][li] = "code"', "pass"))
    with pytest.raises(SnapshotError, match="loop 1 stands at step 'coding'"):
        forgot.load(settings.trace_path)

    returns = code("returns", RECORDS_CALLS.format(version=1).replace("return state", "return"))
    with pytest.raises(TypeError, match=r"migrate must return the state \(a dict\), got NoneType"):
        returns.load(settings.trace_path)

    fails = code("fails", RECORDS_CALLS.format(version=1).replace("return state", "1 / 0"))
    with pytest.raises(ZeroDivisionError) as raised:
        fails.load(settings.trace_path)
    assert "evolving:Evolving.migrate" in " ".join(getattr(raised.value, "__notes__", []))


def test_session_version_must_be_a_whole_number() -> None:
    with pytest.raises(TypeError, match=r"Bad.session_version must be an int, got '2'"):
        type("Bad", (LoopBase,), {"session_version": "2"})
    with pytest.raises(ValueError, match=r"Bad.session_version must be 0 or more, got -1"):
        type("Bad", (LoopBase,), {"session_version": -1})


# -- rdagent-loop check ----------------------------------------------------------------------


def check(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m rdagent_loop check ...`` in ``cwd`` (today's code), as a user runs it."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "rdagent_loop", "check", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def saved_session(code: Define, settings: LoopSettings, version: int = 0, **budgets: Any) -> Path:
    saved = code("saved", SAVED.format(version=version))
    anyio.run(lambda: save(saved, settings, **budgets))
    return settings.trace_path


def test_check_says_where_each_loop_continues(
    code: Define, settings: LoopSettings, tmp_path: Path
) -> None:
    trace = saved_session(code, settings, step_n=4)  # loop 0 finished, loop 1 at "coding"
    code("today", INSERTED)
    done = check(str(trace), cwd=tmp_path / "today")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "snapshot 1/0_propose loads with today's evolving:Evolving"
    assert "  session_version 0, as saved: no migration" in lines
    assert "  steps saved: propose, coding, running" in lines
    assert "  steps today: propose, lint, coding, running" in lines
    assert "  changed: inserted 'lint'" in lines
    assert "  1 loop finished, 1 unfinished: a resume continues them" in lines
    assert "    loop 1 continues at 'coding' (step 2); saved at 'coding' (step 1)" in lines

    # the class can be named; and check changes nothing on disk
    files = contents(trace)
    again = check(
        str(trace / "__session__"), "--class", "evolving:Evolving", cwd=tmp_path / "today"
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout == done.stdout
    assert contents(trace) == files


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_check_accounts_for_a_migration(
    code: Define, settings: LoopSettings, tmp_path: Path
) -> None:
    trace = saved_session(code, settings, step_n=4)
    code("today", RENAMED)
    done = check(str(trace), cwd=tmp_path / "today")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "  migration: session_version 0 to 1 (Evolving.migrate runs)" in lines
    assert "  changed: renamed 'coding' to 'code' (by migrate)" in lines
    assert (
        "    loop 1 continues at 'code' (step 1); saved at 'coding' (step 1), placed by migrate"
        in lines
    )

    # no loop stands at "coding" in 0/1_coding: migrate moved the outputs, a rename still
    one = check(str(trace / "__session__" / "0" / "1_coding"), cwd=tmp_path / "today")
    assert one.returncode == 0, one.stderr
    lines = one.stdout.splitlines()
    assert lines[0] == "snapshot 0/1_coding loads with today's evolving:Evolving"
    assert "  changed: renamed 'coding' to 'code' (by migrate)" in lines
    assert "    loop 0 continues at 'running' (step 2)" in lines
    assert lines[-1] == (
        "  note: a resume from this file deletes the 2 snapshots written after it "
        "(resume --checkout PATH forks instead)"
    )


def test_check_fails_when_a_resume_would(
    code: Define, settings: LoopSettings, tmp_path: Path
) -> None:
    trace = saved_session(code, settings, step_n=4)  # loop 1 at "coding"
    code("today", REMOVED)
    done = check(str(trace), cwd=tmp_path / "today")
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "snapshot 1/0_propose would not load with today's code",
        "  saved by evolving:Evolving: session_version 0, steps propose, coding, running",
        "  today's steps: propose, running",
    ]
    assert "would fail" in done.stderr
    assert "loop 1 stands at step 'coding'" in done.stderr
    assert "its steps are ['propose', 'running']" in done.stderr

    # --all: the snapshots where no loop stands at "coding" would load, the others not
    every = check(str(trace), "--all", cwd=tmp_path / "today")
    assert every.returncode == 1
    assert "ok    0/2_running: every loop finished" in every.stdout
    assert "FAIL  1/0_propose: loop 1 stands at step 'coding'" in every.stdout
    assert "FAIL  0/0_propose: loop 0 stands at step 'coding'" in every.stdout
    assert "2 of 4 snapshots" in every.stderr


def test_check_all_passes(code: Define, settings: LoopSettings, tmp_path: Path) -> None:
    trace = saved_session(code, settings, step_n=4)
    code("today", INSERTED)
    every = check(str(trace), "--all", cwd=tmp_path / "today")
    assert every.returncode == 0, every.stderr
    lines = every.stdout.splitlines()
    assert lines[0] == (
        f"4 snapshots of {trace}, with today's evolving:Evolving "
        "(steps propose, lint, coding, running)"
    )
    assert lines[1] == (
        "  4 snapshots saved with session_version 0, steps propose, coding, running: "
        "session_version 0, as saved: no migration; inserted 'lint'"
    )
    assert "  ok    0/0_propose: loop 0 at 'coding'" in lines
    assert "  ok    1/0_propose: loop 1 at 'coding'" in lines
    assert lines[-1] == "all 4 snapshots load with today's code"


def test_check_refuses_a_newer_saved_version(
    code: Define, settings: LoopSettings, tmp_path: Path
) -> None:
    trace = saved_session(code, settings, version=2, step_n=4)
    code("today", RECORDS_CALLS.format(version=1))
    done = check(str(trace), cwd=tmp_path / "today")
    assert done.returncode == 1
    assert "session_version 2" in done.stderr and "session_version 1" in done.stderr
    assert done.stdout.splitlines()[1] == (
        "  saved by evolving:Evolving: session_version 2, steps propose, coding, running"
    )


# -- the step journal follows the step's name ------------------------------------------------

MEMO_SAVED = """
from pathlib import Path

import anyio


def model(calls):
    with calls.open("a") as f:
        f.write("model\\n")
    return "code"


class Evolving(Base):
    async def propose(self, prev_out):
        return "idea"

    async def coding(self, prev_out):
        calls = Path(self.settings.trace_path) / "calls"
        code = await self.memo("model", model, calls)
        if not (Path(self.settings.trace_path) / "go").exists():
            await anyio.sleep_forever()  # stopped here, its model call journaled
        return code
"""

MEMO_INSERTED = MEMO_SAVED.replace(
    "    async def coding(self, prev_out):",
    "    async def lint(self, prev_out):\n        return 'clean'\n\n"
    "    async def coding(self, prev_out):",
)


async def test_the_journal_of_a_step_whose_index_moved_is_replayed(
    code: Define, settings: LoopSettings
) -> None:
    """Loop 0 stopped in ``coding`` (index 1) with its model call journaled; today a step is
    inserted before it (``coding`` is index 2): the resumed step replays the call."""
    trace = Path(settings.trace_path)
    saved = code("saved", MEMO_SAVED)
    loop = saved(settings)
    journal = trace / "__session__" / ".journal"
    async with loop.run(loop_n=1):
        with anyio.fail_after(30):
            while not journal.exists() or not any(p.is_file() for p in journal.rglob("*")):
                await anyio.sleep(0.01)
    assert (trace / "calls").read_text() == "model\n"

    (trace / "go").write_text("go")
    today = code("today", MEMO_INSERTED)
    resumed = today.load(settings.trace_path)
    assert resumed.step_idx[0] == 2
    summary = await resumed.run(loop_n=1)
    assert summary.replayed == 1
    assert (trace / "calls").read_text() == "model\n"  # not paid for twice
    assert resumed.loop_prev_out[0]["coding"] == "code"
