"""``rdagent-loop``: run, watch, stop, inspect, resume and chart R&D loops from a shell.

    rdagent-loop run examples.data_science.loop:DataScienceLoop --loop-n 8 --parallel 3
    rdagent-loop inspect log/2025-01-01_12-00-00-000000
    rdagent-loop resume log/2025-01-01_12-00-00-000000 [--checkout forked/]
    rdagent-loop timeline log/2025-01-01_12-00-00-000000 -o timeline.svg
    rdagent-loop questions log/2025-01-01_12-00-00-000000   (what waiting steps ask)
    rdagent-loop answer log/2025-01-01_12-00-00-000000 3.0.0-ab12 '"yes"'   (VALUE is JSON)
    rdagent-loop upgrade log/2025-01-01_12-00-00-000000   (a session of rdagent_loop 0.1)
    rdagent-loop check log/2025-01-01_12-00-00-000000   (would a resume load it with today's code?)
    rdagent-loop demo

Ctrl-C stops a run cleanly (in-flight steps are cancelled, their child processes killed,
every completed step is already saved) and says how to resume. Errors are one line on
standard error and a non-zero exit status; ``--debug`` (before or after the command's name)
adds the traceback.

A step that asks (``loop.ask``) waits, its loop only, until someone answers: the run shows
the question and the command that answers it, from any shell.

Modules: ``_commands`` (the click commands and ``main``), ``_start`` (a loop ready to run, in
a new session or resumed), ``_driver`` (the run under a backend: signals, live display, the
end-of-run lines), ``_render`` (the ``inspect`` table, the open questions, the timeline as
a PNG), ``_check`` (what a resume would do with today's code), ``_demo`` (the example the
demo runs), ``_messages`` (one-line errors, paths to paste back).
"""

from ._commands import main as main

__all__ = ("main",)
