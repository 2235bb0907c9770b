"""A qlib-style factor-mining R&D loop on generated prices: see :mod:`.loop`."""

from .backtest import BacktestResult as BacktestResult
from .backtest import FactorEmptyError as FactorEmptyError
from .loop import FactorCodeError as FactorCodeError
from .loop import FactorLoop as FactorLoop
from .loop import FactorRecord as FactorRecord

__all__ = ("BacktestResult", "FactorCodeError", "FactorEmptyError", "FactorLoop", "FactorRecord")
