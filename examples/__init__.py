"""Example applications of rdagent_loop: real R&D loops that need no LLM and no network.

* ``examples.data_science`` — RD-Agent's data-science loop on a generated tabular data set;
* ``examples.quant_factor`` — a qlib-style factor-mining loop on generated prices;
* ``examples.gateway`` — a Starlette app that streams a run's steps to a browser.

Run them from the repository root (``python -m rdagent_loop demo``, ``rdagent-loop run
examples.quant_factor:FactorLoop``), so that ``examples`` is importable.
"""
