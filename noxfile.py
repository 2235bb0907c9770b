"""Sessions: ``nox -s tests ray browser lint typecheck`` is the whole suite (what CI runs).

* ``tests``: the suite on asyncio and trio (AnyIO's pytest plugin parametrizes every async
  test over both), except what needs Ray or a browser;
* ``ray``: tests against a real local Ray cluster (``-m ray``);
* ``browser``: the gateway seen by a headless Chromium (``-m browser``; needs Debian's
  ``chromium``, which ``.ci/run`` installs);
* ``lint``: ruff check and ruff format --check;
* ``typecheck``: mypy strict on the package;
* ``bench``: ``python -m benchmarks``, the table docs/benchmarks.md explains (not part of
  the suite).

Extra arguments go to the tool: ``nox -s tests -- -k resume -x``.
Every session uses the interpreter nox runs on; pytest's "no tests ran" (exit 5) fails.
"""

from __future__ import annotations

import shutil

import nox

nox.options.default_venv_backend = "uv" if shutil.which("uv") else "venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests", "lint", "typecheck"]

# ruff and mypy read their settings from pyproject.toml
TYPECHECK_DEPS = ["mypy>=1.10", "types-tqdm", "types-psutil", "exceptiongroup>=1.2"]


@nox.session
def tests(session: nox.Session) -> None:
    """The suite on asyncio and trio, without the Ray and browser tests."""
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "not ray and not browser", *session.posargs)


@nox.session
def ray(session: nox.Session) -> None:
    """Tests that start a real local Ray cluster (on 127.0.0.1 only)."""
    session.install("-e", ".[test,ray]")
    session.run(
        "pytest",
        "-m",
        "ray",
        *session.posargs,
        env={"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"},
    )


@nox.session
def browser(session: nox.Session) -> None:
    """End-to-end tests of the gateway in headless Chromium, driven by Playwright."""
    if shutil.which("chromium") is None:
        session.error("the browser tests need Debian's chromium: apt-get install chromium")
    session.install("-e", ".[test,gateway]", "playwright")
    session.run("pytest", "-m", "browser", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", *session.posargs)
    session.run("ruff", "format", "--check", *session.posargs)


@nox.session
def typecheck(session: nox.Session) -> None:
    # exceptiongroup: mypy checks for Python 3.10 (pyproject), where the package needs it
    session.install("-e", ".[test]", *TYPECHECK_DEPS)
    session.run("mypy", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark table; a few minutes at most on two cores."""
    session.install("-e", ".[trio,otel]", "opentelemetry-sdk")  # the SDK: bench_otel.py
    session.run("python", "-m", "benchmarks", *session.posargs)
