"""Factor expressions, as qlib's alpha formulas: parsed safely, computed on the whole panel.

The language is a small subset of Python's expression syntax, checked against a whitelist
before anything is computed (``eval`` is never called)::

    -ts_mean(ret, 5)
    rank(volume / ts_mean(volume, 20)) * sign(ret)
    (close - ts_mean(close, 10)) / ts_std(close, 10)

Fields: ``close``, ``ret``, ``volume``. Time-series functions take a window in days:
``ts_mean``, ``ts_std``, ``ts_sum``, ``ts_max``, ``ts_min``, ``delta``, ``delay``,
``ts_corr(x, y, n)``. Cross-sectional functions: ``rank``, ``zscore``. Element-wise: ``abs``,
``log``, ``sign``. Missing values (the warm-up of a window, a division by zero) are ``nan``.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable

from .market import Market, Series

NAN = math.nan
FIELDS = ("close", "ret", "volume")
MAX_WINDOW = 120


class FactorSyntaxError(ValueError):
    """The expression is not a valid factor (unknown name, bad window, not an expression)."""


# -- element-wise helpers -----------------------------------------------------------------


def _map2(a: Series, b: Series, op: Callable[[float, float], float]) -> Series:
    return [[op(x, y) for x, y in zip(ra, rb, strict=False)] for ra, rb in zip(a, b, strict=False)]


def _div(x: float, y: float) -> float:
    return x / y if y != 0 and not math.isnan(y) else NAN


def _log(x: float) -> float:
    return math.log(x) if x > 0 else NAN


def _sign(x: float) -> float:
    return NAN if math.isnan(x) else float((x > 0) - (x < 0))


# -- time series ----------------------------------------------------------------------------


def _window(x: Series, n: int, reduce: Callable[[list[float]], float]) -> Series:
    days, stocks = len(x), len(x[0])
    out = [[NAN] * stocks for _ in range(days)]
    for t in range(n - 1, days):
        for s in range(stocks):
            values = [x[k][s] for k in range(t - n + 1, t + 1)]
            if not any(math.isnan(v) for v in values):
                out[t][s] = reduce(values)
    return out


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _std(v: list[float]) -> float:
    m = _mean(v)
    return math.sqrt(sum((a - m) ** 2 for a in v) / len(v))


def ts_mean(x: Series, n: int) -> Series:
    return _window(x, n, _mean)


def ts_std(x: Series, n: int) -> Series:
    return _window(x, n, _std)


def ts_sum(x: Series, n: int) -> Series:
    return _window(x, n, sum)


def ts_max(x: Series, n: int) -> Series:
    return _window(x, n, max)


def ts_min(x: Series, n: int) -> Series:
    return _window(x, n, min)


def delay(x: Series, n: int) -> Series:
    return [[NAN] * len(x[0]) for _ in range(min(n, len(x)))] + x[: max(0, len(x) - n)]


def delta(x: Series, n: int) -> Series:
    return _map2(x, delay(x, n), lambda a, b: a - b)


def ts_corr(x: Series, y: Series, n: int) -> Series:
    days, stocks = len(x), len(x[0])
    out = [[NAN] * stocks for _ in range(days)]
    for t in range(n - 1, days):
        for s in range(stocks):
            a = [x[k][s] for k in range(t - n + 1, t + 1)]
            b = [y[k][s] for k in range(t - n + 1, t + 1)]
            out[t][s] = pearson(a, b)
    return out


# -- cross section ----------------------------------------------------------------------------


def ranks(row: list[float]) -> list[float]:
    """Ranks in [0, 1] (ties share their mean rank); nan stays nan."""
    present = sorted((v, i) for i, v in enumerate(row) if not math.isnan(v))
    out = [NAN] * len(row)
    if len(present) < 2:
        return out
    i = 0
    while i < len(present):
        j = i
        while j + 1 < len(present) and present[j + 1][0] == present[i][0]:
            j += 1
        for k in range(i, j + 1):
            out[present[k][1]] = (i + j) / 2 / (len(present) - 1)
        i = j + 1
    return out


def rank(x: Series) -> Series:
    return [ranks(row) for row in x]


def zscore(x: Series) -> Series:
    out = []
    for row in x:
        present = [v for v in row if not math.isnan(v)]
        if len(present) < 2:
            out.append([NAN] * len(row))
            continue
        m, sd = _mean(present), _std(present)
        out.append([(v - m) / sd if sd > 0 else NAN for v in row])
    return out


def pearson(a: list[float], b: list[float]) -> float:
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if not (math.isnan(x) or math.isnan(y))]
    if len(pairs) < 3:
        return NAN
    ma = sum(x for x, _ in pairs) / len(pairs)
    mb = sum(y for _, y in pairs) / len(pairs)
    cov = sum((x - ma) * (y - mb) for x, y in pairs)
    va = sum((x - ma) ** 2 for x, _ in pairs)
    vb = sum((y - mb) ** 2 for _, y in pairs)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else NAN


# -- the language -----------------------------------------------------------------------------

_WINDOWED: dict[str, Callable[..., Series]] = {
    "ts_mean": ts_mean,
    "ts_std": ts_std,
    "ts_sum": ts_sum,
    "ts_max": ts_max,
    "ts_min": ts_min,
    "delta": delta,
    "delay": delay,
}
_UNARY: dict[str, Callable[[Series], Series]] = {
    "rank": rank,
    "zscore": zscore,
    "abs": lambda x: [[abs(v) for v in row] for row in x],
    "log": lambda x: [[_log(v) for v in row] for row in x],
    "sign": lambda x: [[_sign(v) for v in row] for row in x],
}
_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: _div,
}
FUNCTIONS = (*_WINDOWED, "ts_corr", *_UNARY)


def parse(expression: str) -> ast.expr:
    """Parse and check ``expression``; a :class:`FactorSyntaxError` says what is wrong."""
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError as exc:
        raise FactorSyntaxError(f"{expression!r} is not an expression: {exc.msg}") from None
    _check(tree, expression)
    return tree


def _window_arg(node: ast.expr, expression: str) -> int:
    if not (isinstance(node, ast.Constant) and type(node.value) is int):
        raise FactorSyntaxError(f"{expression!r}: a window must be a whole number of days")
    if not 1 <= node.value <= MAX_WINDOW:
        raise FactorSyntaxError(
            f"{expression!r}: window {node.value} is outside 1..{MAX_WINDOW} days"
        )
    return node.value


def _check(node: ast.expr, expression: str) -> None:
    if isinstance(node, ast.Name):
        if node.id not in FIELDS:
            raise FactorSyntaxError(f"{expression!r}: unknown field {node.id!r}; use {FIELDS}")
    elif isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise FactorSyntaxError(f"{expression!r}: only numbers may be constants")
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        _check(node.operand, expression)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, expression)
        _check(node.right, expression)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        name, args = node.func.id, node.args
        arity = 2 if name in _WINDOWED else 3 if name == "ts_corr" else 1
        if name not in FUNCTIONS:
            raise FactorSyntaxError(f"{expression!r}: unknown function {name!r}")
        if len(args) != arity:
            raise FactorSyntaxError(f"{expression!r}: {name} takes {arity} arguments")
        if arity > 1:
            _window_arg(args[-1], expression)
        for arg in args[: arity - 1 if arity > 1 else 1]:
            _check(arg, expression)
    else:
        raise FactorSyntaxError(f"{expression!r}: {ast.unparse(node)!r} is not allowed")


def evaluate(expression: str, market: Market) -> Series:
    """The factor's value for every day and stock."""
    tree = parse(expression)
    shape = (market.days, market.stocks)

    def constant(value: float) -> Series:
        return [[float(value)] * shape[1] for _ in range(shape[0])]

    def walk(node: ast.expr) -> Series:
        if isinstance(node, ast.Name):
            return market.fields[node.id]
        if isinstance(node, ast.Constant):
            return constant(float(node.value))  # type: ignore[arg-type]  # checked: a number
        if isinstance(node, ast.UnaryOp):
            x = walk(node.operand)
            return [[-v for v in row] for row in x] if isinstance(node.op, ast.USub) else x
        if isinstance(node, ast.BinOp):
            return _map2(walk(node.left), walk(node.right), _BINARY[type(node.op)])
        assert isinstance(node, ast.Call)
        assert isinstance(node.func, ast.Name)
        name, args = node.func.id, node.args
        if name in _WINDOWED:
            return _WINDOWED[name](walk(args[0]), _window_arg(args[1], expression))
        if name == "ts_corr":
            return ts_corr(walk(args[0]), walk(args[1]), _window_arg(args[2], expression))
        return _UNARY[name](walk(args[0]))

    return walk(tree)


def complexity(expression: str) -> int:
    """How many operations the expression has (shorter factors are preferred on a tie)."""
    return sum(
        isinstance(n, (ast.Call, ast.BinOp, ast.UnaryOp)) for n in ast.walk(parse(expression))
    )
