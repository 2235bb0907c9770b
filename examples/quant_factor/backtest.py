"""Back-test a factor: its daily rank IC and a top-minus-bottom quintile long-short portfolio."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .expr import pearson, ranks
from .market import Market, Series

TRADING_DAYS = 252


class FactorEmptyError(ValueError):
    """The factor has (almost) no values: nothing to back-test."""


@dataclass(frozen=True, slots=True)
class BacktestResult:
    """How well a factor predicts tomorrow's returns."""

    ic: float  # mean daily rank IC (Spearman correlation with tomorrow's return)
    icir: float  # ic / its standard deviation: how steady it is
    long_short: float  # annualised return of long top quintile, short bottom quintile
    sharpe: float  # annualised Sharpe ratio of that portfolio
    coverage: float  # share of (day, stock) cells with a value
    days: int

    def __str__(self) -> str:
        return (
            f"IC {self.ic:+.4f} ICIR {self.icir:+.2f} long-short {self.long_short:+.1%} "
            f"Sharpe {self.sharpe:+.2f}"
        )


def backtest(factor: Series, market: Market, min_coverage: float = 0.3) -> BacktestResult:
    target = market.forward_return
    cells = market.days * market.stocks
    present = sum(1 for row in factor for v in row if not math.isnan(v))
    coverage = present / cells
    if coverage < min_coverage:
        raise FactorEmptyError(f"the factor has values in only {coverage:.0%} of the cells")
    ics: list[float] = []
    spreads: list[float] = []
    for row, fwd in zip(factor, target, strict=False):
        pairs = [
            (f, r) for f, r in zip(row, fwd, strict=False) if not (math.isnan(f) or math.isnan(r))
        ]
        if len(pairs) < 10:
            continue
        fr = ranks([f for f, _ in pairs])
        rr = ranks([r for _, r in pairs])
        ic = pearson(fr, rr)
        if math.isnan(ic):
            continue
        ics.append(ic)
        ordered = sorted(pairs)
        q = max(1, len(ordered) // 5)
        spreads.append(sum(r for _, r in ordered[-q:]) / q - sum(r for _, r in ordered[:q]) / q)
    if len(ics) < 20:
        raise FactorEmptyError(f"the factor is usable on only {len(ics)} days")
    mean_ic = sum(ics) / len(ics)
    sd_ic = math.sqrt(sum((v - mean_ic) ** 2 for v in ics) / len(ics))
    mean_spread = sum(spreads) / len(spreads)
    sd_spread = math.sqrt(sum((v - mean_spread) ** 2 for v in spreads) / len(spreads))
    return BacktestResult(
        ic=mean_ic,
        icir=mean_ic / sd_ic if sd_ic > 0 else 0.0,
        long_short=mean_spread * TRADING_DAYS,
        sharpe=mean_spread / sd_spread * math.sqrt(TRADING_DAYS) if sd_spread > 0 else 0.0,
        coverage=coverage,
        days=len(ics),
    )
