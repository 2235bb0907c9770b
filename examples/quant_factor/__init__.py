"""A qlib-style factor-mining R&D loop on generated prices: see :mod:`.loop`.

``python -m examples.quant_factor`` runs it at a terminal; with ``--ask`` a person approves,
edits or rejects every proposed factor (see :mod:`.terminal`).
"""

from .backtest import BacktestResult as BacktestResult
from .backtest import FactorEmptyError as FactorEmptyError
from .loop import FactorCodeError as FactorCodeError
from .loop import FactorLoop as FactorLoop
from .loop import FactorProposal as FactorProposal
from .loop import FactorRecord as FactorRecord
from .loop import FactorRejectedError as FactorRejectedError
from .loop import model_bill as model_bill
from .loop import model_calls as model_calls
from .loop import read_review as read_review

__all__ = (
    "BacktestResult",
    "FactorCodeError",
    "FactorEmptyError",
    "FactorLoop",
    "FactorProposal",
    "FactorRecord",
    "FactorRejectedError",
    "model_bill",
    "model_calls",
    "read_review",
)
