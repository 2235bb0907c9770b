"""``python -m rdagent_loop``: the ``rdagent-loop`` command line (see ``rdagent_loop.cli``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
