"""``python -m rdagent_loop`` and the ``rdagent-loop`` command.

The full command line lives in ``rdagent_loop.cli`` when it is installed; without it, this
entry point knows one command, ``demo``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

_USAGE = """\
usage: python -m rdagent_loop demo [--loops N] [--parallel N] [--backend asyncio|trio]
                                   [--trace-path PATH] [--resume PATH] [--steps N]

  demo   a hyper-parameter search run as parallel R&D loops, saved to disk and resumable
         (python -m rdagent_loop demo --help for every option)"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the CLI if there is one, else run ``demo``; return the exit status."""
    if importlib.util.find_spec("rdagent_loop.cli") is not None:
        cli_main = importlib.import_module("rdagent_loop.cli").main
        status = cli_main(argv)
        return status if isinstance(status, int) else 0
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["demo"]:
        from ._demo import main as demo_main

        return demo_main(args[1:])
    if args[:1] in (["-h"], ["--help"]):
        print(_USAGE)
        return 0
    print(_USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
