"""A generated stock market: daily prices and volumes with a few real, weak effects in them.

Returns follow a one-factor model (a market return every stock shares, times its beta) plus
noise, plus three small effects a factor can find:

* short-term reversal: last week's winners do slightly worse tomorrow;
* low volatility: calm stocks earn a little more;
* volume: after a volume spike, tomorrow tends to continue today's move.

The panel is a function of the seed, cached per process, never stored in a snapshot.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

Series = list[list[float]]  # [day][stock]


@dataclass(frozen=True)
class Market:
    """A panel of ``days`` x ``stocks``; ``fields`` maps a name to its [day][stock] values."""

    days: int
    stocks: int
    fields: dict[str, Series]

    @property
    def forward_return(self) -> Series:
        """Tomorrow's return, the target of every factor (the last day has none: nan)."""
        ret = self.fields["ret"]
        return [*ret[1:], [math.nan] * self.stocks]


@functools.lru_cache(maxsize=8)
def generate(seed: int = 0, stocks: int = 40, days: int = 300) -> Market:
    """The same market for the same arguments."""
    rng = random.Random(seed)
    beta = [rng.uniform(0.5, 1.5) for _ in range(stocks)]
    vol = [rng.uniform(0.01, 0.035) for _ in range(stocks)]
    base_volume = [rng.uniform(1e5, 1e6) for _ in range(stocks)]
    close = [[rng.uniform(10.0, 100.0) for _ in range(stocks)]]
    ret: Series = [[0.0] * stocks]
    volume: Series = [[v * rng.uniform(0.8, 1.2) for v in base_volume]]
    spiked = [False] * stocks
    for t in range(1, days):
        market = rng.gauss(0.0003, 0.01)
        week = [sum(ret[max(0, t - k)][s] for k in range(1, 6)) for s in range(stocks)]
        mean_week = sum(week) / stocks
        day_ret, day_vol = [], []
        for s in range(stocks):
            r = beta[s] * market + rng.gauss(0.0, vol[s])
            r += -0.025 * (week[s] - mean_week)  # reversal
            r += 0.05 * (0.022 - vol[s])  # low volatility premium
            if spiked[s]:
                r += 0.5 * ret[t - 1][s]  # yesterday's volume spike confirms its move
            day_ret.append(r)
            day_vol.append(base_volume[s] * rng.lognormvariate(0.0, 0.35))
        spiked = [v > 1.6 * b for v, b in zip(day_vol, base_volume, strict=False)]
        ret.append(day_ret)
        volume.append(day_vol)
        close.append([c * math.exp(r) for c, r in zip(close[-1], day_ret, strict=False)])
    return Market(days, stocks, {"close": close, "ret": ret, "volume": volume})
