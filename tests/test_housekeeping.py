"""The repository's housekeeping: what git ignores, what pytest collects, the gateway's favicon."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout"
)
def test_git_ignores_what_the_readme_tour_writes() -> None:
    tour = ["demo-session/__session__/0/0_propose", "fork/__session__/0/0_propose", "timeline.svg"]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *tour], cwd=REPO, capture_output=True, text=True
    )
    assert done.stdout.split() == tour, done.stderr


def test_pytest_does_not_collect_the_ray_tests_without_ray() -> None:
    command = ["pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider", "tests/executors"]
    done = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    if importlib.util.find_spec("ray") is None:
        assert "test_ray.py" not in done.stdout, done.stdout
        assert "SKIPPED" not in done.stdout and " skipped" not in done.stdout, done.stdout
    else:  # the nox session "ray"
        assert "test_ray.py::" in done.stdout


@pytest.mark.anyio
async def test_the_gateway_serves_a_favicon(tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    from examples.gateway.app import create_app

    transport = httpx.ASGITransport(app=create_app(tmp_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/favicon.ico")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")
    assert response.content.startswith(b"<svg")
