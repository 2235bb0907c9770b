"""``rdagent-loop upgrade``: sessions written by rdagent_loop 0.1 (format 2), converted in place.

The old sessions are real: a child process runs release 0.1 (a git worktree of commit
5193743, on ``PYTHONPATH``) with ``upgrade_loops.Upgraded`` (4 loops, 3 finished and loop 3
with 2 of its 3 steps, a 300 KB ``bytes`` attribute, a 70 KB output), and reports what 0.1
loads back from the session and from each step file. Today's engine must then refuse the
session until it is upgraded, and after ``upgrade`` load the same state from the session and
from every step file (``Cls.load`` and plain ``pickle.load``), keep the old files in
``__session__/.format2`` (still a session 0.1 loads), and resume it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr
from upgrade_loops import BIG, Upgraded, describe

from rdagent_loop import LoopSettings, SessionBusyError, SnapshotError
from rdagent_loop._session._format import OLD_MAGIC, read_manifest
from rdagent_loop._session._legacy import KEPT_NAME, is_format2, load_format2, upgrade_session
from rdagent_loop._session._lock import SessionLock

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
RELEASE_0_1 = "5193743"
KEY = "upgrade-test-key"
CHILD_TIMEOUT = 300.0  # seconds: only a hang reaches it

Report = dict[str, Any]


# -- old sessions, written by rdagent_loop 0.1 -----------------------------------------------


@pytest.fixture(scope="module")
def release_0_1(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A worktree of release 0.1, removed at the end."""
    git = shutil.which("git")
    if git is None:
        pytest.skip("needs git, to check out rdagent_loop 0.1 (commit 5193743)")
    found = subprocess.run(
        [git, "-C", str(REPO), "cat-file", "-e", f"{RELEASE_0_1}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    if found.returncode != 0:
        pytest.skip(f"needs the repository's git history with commit {RELEASE_0_1} (0.1)")
    worktree = tmp_path_factory.mktemp("release-0.1") / "rdagent_loop-0.1"
    added = subprocess.run(
        [git, "-C", str(REPO), "worktree", "add", "--detach", str(worktree), RELEASE_0_1],
        capture_output=True,
        text=True,
        check=False,
    )
    if added.returncode != 0:
        pytest.skip(f"cannot check out 0.1 with git worktree: {added.stderr.strip()}")
    try:
        yield worktree
    finally:
        subprocess.run(
            [git, "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
            capture_output=True,
            check=False,
        )


def _env(*paths: Path, key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RDAGENT_LOOP_")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in paths)
    if key is not None:
        env["RDAGENT_LOOP_SIGNING_KEY"] = key
    return env


def _old_engine(release: Path, code: str, *args: str, key: str | None = None) -> Report:
    """Run ``code`` under rdagent_loop 0.1; it writes a report to its second argument."""
    report = Path(args[1])
    subprocess.run(
        [sys.executable, "-c", code, *args],
        env=_env(release, HERE, key=key),
        cwd=report.parent,
        check=True,
        timeout=CHILD_TIMEOUT,
    )
    data: Report = pickle.loads(report.read_bytes())
    assert data["engine"].startswith(str(release)), data["engine"]
    return data


_MAKE = "import sys, upgrade_loops; upgrade_loops.make_old_session(*sys.argv[1:])"
_REPORT = "import sys, upgrade_loops; upgrade_loops.report_session(*sys.argv[1:])"


@pytest.fixture(scope="module")
def pristine(
    release_0_1: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, Report]]:
    """A format-2 session and 0.1's report, made once: ``"plain"``, ``"signed"`` (with
    ``KEY``), ``"edited"`` or ``"parallel"`` (see ``upgrade_loops.make_old_session``)."""
    made: dict[str, tuple[Path, Report]] = {}

    def get(kind: str) -> tuple[Path, Report]:
        if kind not in made:
            base = tmp_path_factory.mktemp(kind)
            args = [str(base / "trace"), str(base / "report.pkl")]
            if kind in ("parallel", "edited"):
                args.append(kind)
            key = KEY if kind == "signed" else None
            made[kind] = base / "trace", _old_engine(release_0_1, _MAKE, *args, key=key)
        return made[kind]

    return get


def _copy(
    pristine: Callable[[str], tuple[Path, Report]], kind: str, to: Path
) -> tuple[Path, Report]:
    trace, report = pristine(kind)
    shutil.copytree(trace, to / "trace")
    return to / "trace", report


@pytest.fixture
def old_session(
    pristine: Callable[[str], tuple[Path, Report]], tmp_path: Path
) -> tuple[Path, Report]:
    """A copy of the plain format-2 session, this test's own."""
    return _copy(pristine, "plain", tmp_path)


@pytest.fixture(autouse=True)
def _no_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RDAGENT_LOOP_SIGNING_KEY", raising=False)


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m rdagent_loop ARGS`` with today's engine (and ``upgrade_loops``)."""
    return subprocess.run(
        [sys.executable, "-m", "rdagent_loop", *map(str, args)],
        env=_env(REPO, HERE),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


def _loop_files(session: Path) -> list[Path]:
    return sorted(p for p in session.glob("[0-9]*/*") if p.is_file())


def _steps(session: Path) -> list[Path]:
    return [p for p in _loop_files(session) if p.name.partition("_")[0].isdigit()]


# -- the tests ---------------------------------------------------------------------------------


def test_old_session_is_refused_with_how_to_upgrade(old_session: tuple[Path, Report]) -> None:
    trace, report = old_session
    session = trace / "__session__"
    assert report["loaded"]["step_idx"] == {0: 3, 1: 3, 2: 3, 3: 2}
    assert any(f.startswith(".chunks/") for f in report["files"]), "0.1 stored no chunks"
    assert sum(f.split("/")[-1].startswith("outputs-") for f in report["files"]) == 3
    for target in (trace, session, session / "3" / "1_coding"):
        with pytest.raises(SnapshotError, match="rdagent-loop upgrade"):
            Upgraded.load(target)


def test_upgrade_command_converts_the_session_in_place(
    old_session: tuple[Path, Report], release_0_1: Path
) -> None:
    trace, report = old_session
    session = trace / "__session__"
    old_files = {p.relative_to(session): p.read_bytes() for p in _loop_files(session)}

    done = _cli("upgrade", trace, cwd=trace.parent)
    assert done.returncode == 0, done.stderr
    assert "converted 11 step files" in done.stdout
    assert "3 finished-loop outputs files merged" in done.stdout
    assert ".format2" in done.stdout

    # the session, and every step file, as 0.1 loaded them
    loaded = Upgraded.load(trace)
    assert describe(loaded) == report["loaded"]
    assert len(loaded.big) == BIG
    steps = _steps(session)
    assert sorted(str(p.relative_to(session)) for p in steps) == sorted(report["steps"])
    for path in steps:
        expected = report["steps"][str(path.relative_to(session))]
        assert not is_format2(path)
        assert describe(Upgraded.load(path)) == expected, path
        with path.open("rb") as f:
            assert describe(pickle.load(f)) == expected, path
    # nothing but step files in the loop folders; the old files kept, byte for byte
    assert _loop_files(session) == steps
    kept = session / KEPT_NAME
    for name, data in old_files.items():
        assert (kept / name).read_bytes() == data, name
        assert data.startswith(OLD_MAGIC)
    assert any((kept / ".chunks").iterdir())
    # ... and .format2 is still a session that 0.1 loads
    again = _old_engine(release_0_1, _REPORT, str(kept), str(trace.parent / "format2.pkl"))
    assert again["loaded"] == report["loaded"]
    assert again["steps"] == report["steps"]

    # idempotent: a second upgrade finds nothing to do
    second = _cli("upgrade", session, cwd=trace.parent)
    assert second.returncode == 0, second.stderr
    assert "today's format already" in second.stdout
    assert describe(Upgraded.load(trace)) == report["loaded"]


@pytest.mark.parametrize("then", ["delete it", "mend it", "run, then mend it"])
def test_a_broken_old_file_is_named_and_the_others_converted(
    old_session: tuple[Path, Report], then: str
) -> None:
    trace, report = old_session
    session = trace / "__session__"
    broken = session / "1" / "1_coding"
    original = broken.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF
    broken.write_bytes(bytes(data))

    done = _cli("upgrade", trace, cwd=trace.parent)
    assert done.returncode == 1
    assert "converted 10 step files" in done.stdout
    error = done.stderr.strip()
    assert "\n" not in error
    assert "1 step file" in error and "1/1_coding" in error and "SHA-256" in error
    assert is_format2(broken)  # left as it was, and kept
    assert (session / KEPT_NAME / "1" / "1_coding").read_bytes() == bytes(data)
    assert sum(p.name.startswith("outputs-") for p in _loop_files(session)) == 3
    assert describe(Upgraded.load(trace)) == report["loaded"]
    for path in _steps(session):
        if path != broken:
            assert describe(Upgraded.load(path)) == report["steps"][str(path.relative_to(session))]

    if then == "delete it":  # the user gives up on it: the next upgrade finishes the job
        broken.unlink()
        again = _cli("upgrade", trace, cwd=trace.parent)
        assert again.returncode == 0, again.stderr
        assert "nothing left to convert" in again.stdout
        assert not any(p.name.startswith("outputs-") for p in _loop_files(session))
        return
    if then == "run, then mend it":
        loop = Upgraded.load(trace)
        anyio.run(lambda: loop.run(step_n=1))  # loop 3's last step
        ran = describe(Upgraded.load(trace))
        assert ran["step_idx"][3] == 3
    # the file comes back whole (a new file: the kept one is a link to the broken one)
    broken.unlink()
    broken.write_bytes(original)
    again = _cli("upgrade", trace, cwd=trace.parent)
    if then == "mend it":  # all converted again, in the old order: the newest is the newest
        assert again.returncode == 0, again.stderr
        assert "converted 11 step files" in again.stdout
        assert (session / KEPT_NAME / "1" / "1_coding~2").read_bytes() == original
        assert describe(Upgraded.load(trace)) == report["loaded"]
        for path in _steps(session):
            assert describe(Upgraded.load(path)) == report["steps"][str(path.relative_to(session))]
        assert not any(p.name.startswith("outputs-") for p in _loop_files(session))
    else:  # converted now, it would come after the run's step files: refused
        assert again.returncode == 1
        assert "run after an earlier upgrade" in again.stderr and "1/1_coding" in again.stderr
        assert is_format2(broken)
        with pytest.raises(SnapshotError, match="rdagent-loop upgrade"):
            Upgraded.load(trace)  # the newest file is an old one
        broken.unlink()
        assert describe(Upgraded.load(trace)) == ran
        last = _cli("upgrade", trace, cwd=trace.parent)
        assert last.returncode == 0, last.stderr
        assert "nothing left to convert" in last.stdout
        assert describe(Upgraded.load(trace)) == ran


def test_upgrade_refuses_while_a_run_holds_the_session(old_session: tuple[Path, Report]) -> None:
    trace, _ = old_session
    session = trace / "__session__"
    lock = SessionLock(session)
    lock.acquire()
    try:
        with pytest.raises(SessionBusyError):
            upgrade_session(session)
        done = _cli("upgrade", trace, cwd=trace.parent)
    finally:
        lock.release()
    assert done.returncode == 1
    assert "in use by another run" in done.stderr
    assert not (session / KEPT_NAME).exists()
    assert all(is_format2(p) for p in _steps(session))


def test_signed_session_is_converted_with_its_key(
    pristine: Callable[[str], tuple[Path, Report]], tmp_path: Path
) -> None:
    trace, report = _copy(pristine, "signed", tmp_path)
    session = trace / "__session__"
    signed = LoopSettings(trace_path=trace, signing_key=KEY, progress=False)
    with pytest.raises(SnapshotError, match="wrong signature"):
        load_format2(session / "0" / "0_propose", key=b"another key")

    refused = upgrade_session(session, settings_key="another key")
    assert not refused.converted and len(refused.failed) == 11
    assert all("wrong signature" in why for _, why in refused.failed)
    assert all(is_format2(p) for p in _steps(session))

    upgraded = upgrade_session(session, settings_key=KEY)
    assert upgraded.ok and len(upgraded.converted) == 11 and upgraded.outputs_merged == 3
    assert describe(Upgraded.load(trace, settings=signed)) == report["loaded"]
    for path in _steps(session):
        with path.open("rb") as f:
            assert read_manifest(f, path, KEY.encode()).signed, path
    wrong = signed.model_copy(update={"signing_key": SecretStr("another key")})
    with pytest.raises(SnapshotError, match="wrong signature"):
        Upgraded.load(session / "3" / "1_coding", settings=wrong)


def test_parallel_session_with_two_runs(
    pristine: Callable[[str], tuple[Path, Report]], tmp_path: Path
) -> None:
    trace, report = _copy(pristine, "parallel", tmp_path)
    session = trace / "__session__"
    assert sum(report["loaded"]["step_idx"].values()) == 21  # 16 steps, then 5 more

    upgraded = upgrade_session(session)
    assert upgraded.ok and len(upgraded.converted) == 21
    assert describe(Upgraded.load(trace)) == report["loaded"]
    for path in _steps(session):
        expected = report["steps"][str(path.relative_to(session))]
        assert describe(Upgraded.load(path)) == expected, path
    assert not any(p.name.startswith("outputs-") for p in _loop_files(session))


def test_finished_loops_deleted_or_archived_again(
    pristine: Callable[[str], tuple[Path, Report]], tmp_path: Path
) -> None:
    trace, report = _copy(pristine, "edited", tmp_path)
    session = trace / "__session__"
    newest = report["loaded"]
    assert 1 not in newest["loop_prev_out"] and 1 in newest["loop_trace"]
    assert newest["loop_trace"][0] == [(0, "propose", None)]
    assert len(list((session / "0").glob("outputs-*"))) == 2

    upgraded = upgrade_session(session)
    assert upgraded.ok and len(upgraded.converted) == 11 and upgraded.outputs_merged == 4
    assert describe(Upgraded.load(trace)) == newest
    for path in _steps(session):
        expected = report["steps"][str(path.relative_to(session))]
        assert describe(Upgraded.load(path)) == expected, path


@pytest.fixture
def upgraded(old_session: tuple[Path, Report]) -> tuple[Path, Report]:
    trace, report = old_session
    assert upgrade_session(trace / "__session__").ok
    return trace, report


@pytest.mark.anyio
async def test_upgraded_session_resumes(upgraded: tuple[Path, Report]) -> None:
    trace, report = upgraded
    loop = Upgraded.load(trace)
    summary = await loop.run(loop_n=2)  # the unfinished loop 3, then loop 4
    assert summary.loops == 2
    for loaded in (loop, Upgraded.load(trace)):
        state = describe(loaded)
        assert state["step_idx"] == {0: 3, 1: 3, 2: 3, 3: 3, 4: 3}
        assert state["loop_prev_out"][3]["feedback"] == "ok-3"
        assert state["loop_prev_out"][4]["feedback"] == "ok-4"
        assert state["notes"] == [*report["loaded"]["notes"], "feedback-3", "feedback-4"]
        for li in range(3):
            assert state["loop_prev_out"][li] == report["loaded"]["loop_prev_out"][li]
            assert state["loop_trace"][li] == report["loaded"]["loop_trace"][li]
        assert [name for _, name, _ in state["loop_trace"][3]] == ["propose", "coding", "feedback"]
        assert state["big_sha256"] == report["loaded"]["big_sha256"]
