"""The "LLM" of the example: it proposes experiments and writes their code.

A real RD-Agent app asks a language model; this one is a seeded stand-in that behaves like
one in the ways the loop engine cares about:

* it proposes a model configuration with a hypothesis, a baseline first, then exploring
  new models and refining earlier proposals, never the same one twice;
* what it proposes for a loop is a function of the seed and the loop index only, like a
  model called with a fixed seed at temperature 0: two runs with the same ``--seed``
  propose the same experiments, whatever order their parallel loops finish in (which
  loops a withdraw rolls back and asks again depends on timing, so the proposals cannot
  depend on results);
* now and then it proposes something the policy forbids (training on the validation split),
  which the loop treats as a *withdraw* error: roll back and ask again. Asked again, it
  proposes the same experiment within the rules, because every call is logged to
  ``llm_calls.jsonl`` beside the session (like a real model's call log, that log is not part
  of the loop's state and survives a roll-back; each line names its ``call``: ``propose``,
  ``critique`` or ``code``);
* now and then the code it writes does not compile, or it picks hyper-parameters that make
  the training script crash (an unregularised linear fit on collinear columns): the loop's
  *skip* errors.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODELS = ("mean", "linear", "knn", "tree", "boost")


@dataclass(frozen=True, slots=True)
class Proposal:
    """An experiment: a model configuration and why it should beat the best so far."""

    config: dict[str, Any]
    hypothesis: str

    def __str__(self) -> str:
        return describe(self.config)


@dataclass(frozen=True, slots=True)
class CodeArtifact:
    """The files the coder wrote for one loop, kept with the loop's state.

    The files travel with the snapshot, so a resumed (or forked) session can write them
    again into its own workspace.
    """

    loop_idx: int
    files: dict[str, str] = field(default_factory=dict)
    entry: str = "main.py"

    def materialize(self, folder: Path) -> Path:
        """Write the files into ``folder`` (if they differ); return the entry script's path."""
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            path = folder / name
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
        return folder / self.entry

    def __str__(self) -> str:
        lines = sum(text.count("\n") for text in self.files.values())
        return f"{self.entry} ({lines} lines)"


def describe(config: dict[str, Any]) -> str:
    """``knn k=7 weights=distance``: a configuration in one short line."""
    knobs = " ".join(f"{k}={v}" for k, v in config.items() if k not in ("model", "seed"))
    return f"{config['model']} {knobs}".strip()


class FakeLLM:
    """Seeded proposals and code; its call log lives in ``log_path``, outside the loop state."""

    def __init__(
        self, log_path: Path, seed: int, bad_proposal_rate: float, bug_rate: float
    ) -> None:
        self.log_path = log_path
        self.seed = seed
        self.bad_proposal_rate = bad_proposal_rate
        self.bug_rate = bug_rate

    def _attempt(self, loop_idx: int) -> int:
        """How often this loop has asked for a proposal already (a withdrawn loop asks again)."""
        if not self.log_path.exists():
            return 0
        with self.log_path.open() as f:
            calls = [json.loads(line) for line in f if line.strip()]
        return sum(
            1 for c in calls if c["loop"] == loop_idx and c.get("call", "propose") == "propose"
        )

    def _log(self, entry: dict[str, Any]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")

    def propose(self, loop_idx: int) -> Proposal:
        attempt = self._attempt(loop_idx)
        config, why = planned(self.seed, loop_idx)
        rng = random.Random(f"{self.seed}/policy/{loop_idx}")
        if attempt == 0 and rng.random() < self.bad_proposal_rate:
            # the model "helpfully" trains on the validation split too: a policy violation
            config = {**config, "train_on": "train+valid"}
            why += ", using every labelled row"
        config["seed"] = loop_idx
        self._log({"call": "propose", "loop": loop_idx, "attempt": attempt, "config": config})
        return Proposal(config, why)

    def critique(self, loop_idx: int, proposal: Proposal) -> Proposal:
        """The model reviews its own proposal and states what the experiment will show (as
        RD-Agent's proposal stage critiques and rewrites a hypothesis): same settings."""
        self._log({"call": "critique", "loop": loop_idx})
        model = proposal.config["model"]
        if model == "mean":
            check = "every later model must beat it"
        else:
            check = f"a {model} model should lower the validation rmse"
        return Proposal(proposal.config, f"{proposal.hypothesis}; expected: {check}")

    def write_code(self, loop_idx: int, proposal: Proposal) -> CodeArtifact:
        self._log({"call": "code", "loop": loop_idx})
        rng = random.Random(f"{self.seed}/code/{loop_idx}/{describe(proposal.config)}")
        code = render_script(proposal)
        if rng.random() < self.bug_rate:
            code = code.replace("    return predict\n", "    return predict(\n", 1)
        return CodeArtifact(loop_idx, {"main.py": code})


# what the simulated model bills, like a hosted model's list prices (US dollars)
PRICE_PER_PROMPT_TOKEN = 3.0 / 1_000_000
PRICE_PER_COMPLETION_TOKEN = 15.0 / 1_000_000
INSTRUCTION_TOKENS = 1500  # the competition, the data's description, the answer's format


def model_bill(args: tuple[Any, ...], answer: Any) -> tuple[float, int]:
    """What one model call costs, and its tokens: about four characters a token, the prompt
    (the instructions and the call's arguments) and the answer (a proposal, or the code of a
    training script), plus the model's reasoning."""
    prompt = INSTRUCTION_TOKENS + len(repr(args)) // 4
    completion = 200 + len(repr(answer)) // 4
    cost = prompt * PRICE_PER_PROMPT_TOKEN + completion * PRICE_PER_COMPLETION_TOKEN
    return cost, prompt + completion


_PLANS: dict[int, list[tuple[dict[str, Any], str]]] = {}  # seed -> loop -> (config, why)


def planned(seed: int, loop_idx: int) -> tuple[dict[str, Any], str]:
    """The experiment proposed for loop ``loop_idx``: a configuration and why.

    A function of ``seed`` and ``loop_idx`` alone (computed once per seed and loop: the plan
    of a loop avoids the configurations planned for the loops before it).
    """
    plans = _PLANS.setdefault(seed, [])
    while len(plans) <= loop_idx:
        plans.append(_plan(seed, len(plans), plans))
    config, why = plans[loop_idx]
    return dict(config), why


def _plan(
    seed: int, loop_idx: int, earlier: list[tuple[dict[str, Any], str]]
) -> tuple[dict[str, Any], str]:
    if loop_idx == 0:
        return {"model": "mean"}, "a baseline first: predict the training mean"
    rng = random.Random(f"{seed}/{loop_idx}")
    seen = {describe(config) for config, _ in earlier}
    config: dict[str, Any] = {}
    why = ""
    for _ in range(20):  # a model asked to avoid repeats mostly does
        if loop_idx > 1 and rng.random() < 0.5:
            base = rng.randrange(1, loop_idx)  # an earlier proposal, not the baseline
            config = _neighbour(rng, earlier[base][0])
            why = f"refine loop {base}'s {describe(earlier[base][0])} by moving one knob"
        else:
            config = _sample(rng)
            why = f"explore a {config['model']} model, not tried in this form yet"
        if describe(config) not in seen:
            break
    return config, why


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("seed", "train_on")}


def _sample(rng: random.Random) -> dict[str, Any]:
    model = rng.choice(MODELS[1:])
    if model == "linear":
        return {
            "model": model,
            "degree": rng.choice((1, 2)),
            "l2": rng.choice((0.0, 0.1, 1.0, 10.0)),
        }
    if model == "knn":
        return {
            "model": model,
            "k": rng.choice((1, 3, 5, 8, 12, 20, 40)),
            "weights": rng.choice(("uniform", "distance")),
        }
    if model == "tree":
        return {
            "model": model,
            "max_depth": rng.randint(2, 7),
            "min_leaf": rng.choice((2, 5, 10, 20)),
        }
    return {
        "model": model,
        "rounds": rng.choice((10, 20, 40)),
        "lr": rng.choice((0.1, 0.2, 0.4)),
        "max_depth": rng.choice((1, 2, 3)),
    }


def _neighbour(rng: random.Random, config: dict[str, Any]) -> dict[str, Any]:
    config = _plain(config)
    model = config["model"]
    if model == "mean":
        return _sample(rng)
    step = rng.choice((-1, 1))
    if model == "linear":
        if rng.random() < 0.5:
            config["degree"] = 3 - config["degree"]
        else:
            config["l2"] = round(max(0.0, config["l2"] * (3.0 if step > 0 else 1 / 3)), 4) or 0.1
    elif model == "knn":
        if rng.random() < 0.7:
            config["k"] = max(1, config["k"] + step * max(1, config["k"] // 3))
        else:
            config["weights"] = "distance" if config["weights"] == "uniform" else "uniform"
    elif model == "tree":
        knob = rng.choice(("max_depth", "min_leaf"))
        config[knob] = max(1, config[knob] + step * (1 if knob == "max_depth" else 3))
    else:
        knob = rng.choice(("rounds", "lr", "max_depth"))
        if knob == "rounds":
            config["rounds"] = max(5, config["rounds"] + step * 10)
        elif knob == "lr":
            config["lr"] = round(min(0.8, max(0.05, config["lr"] * (1.5 if step > 0 else 0.67))), 3)
        else:
            config["max_depth"] = min(4, max(1, config["max_depth"] + step))
    return config


# -- the code it writes -------------------------------------------------------------------

_HEADER = '''\
"""Loop {loop_idx}: {hypothesis}.

Written by the example's coder. Usage: python main.py DATA_FOLDER
Prints the validation RMSE as JSON on its last line and writes scores.json.
"""
import csv
import json
import math
import sys
import time

CONFIG = {config!r}


def load(path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        rows = [[float(v) for v in row] for row in reader]
    return [r[:-1] for r in rows], [r[-1] for r in rows]


def standardize(train, *others):
    d = len(train[0])
    means = [sum(r[j] for r in train) / len(train) for j in range(d)]
    stds = [math.sqrt(sum((r[j] - means[j]) ** 2 for r in train) / len(train)) or 1.0
            for j in range(d)]
    scale = lambda rows: [[(r[j] - means[j]) / stds[j] for j in range(d)] for r in rows]
    return [scale(train)] + [scale(rows) for rows in others]

'''

_TREE = """
def build_tree(X, Y, idx, depth, min_leaf, cuts=12):
    ys = [Y[i] for i in idx]
    mean = sum(ys) / len(ys)
    if depth == 0 or len(idx) < 2 * min_leaf:
        return mean
    base = sum((y - mean) ** 2 for y in ys)
    best = None
    for j in range(len(X[0])):
        values = sorted(X[i][j] for i in idx)
        for q in range(1, cuts):
            t = values[q * len(values) // cuts]
            left = [i for i in idx if X[i][j] < t]
            nl, nr = len(left), len(idx) - len(left)
            if nl < min_leaf or nr < min_leaf:
                continue
            sl = sum(Y[i] for i in left)
            sr = sum(ys) - sl
            gain = sl * sl / nl + sr * sr / nr - sum(ys) ** 2 / len(idx)
            if best is None or gain > best[0]:
                best = (gain, j, t)
    if best is None or best[0] <= 1e-12 * max(base, 1.0):
        return mean
    _, j, t = best
    left = [i for i in idx if X[i][j] < t]
    right = [i for i in idx if X[i][j] >= t]
    return (j, t, build_tree(X, Y, left, depth - 1, min_leaf, cuts),
            build_tree(X, Y, right, depth - 1, min_leaf, cuts))


def tree_predict(node, x):
    while isinstance(node, tuple):
        j, t, left, right = node
        node = left if x[j] < t else right
    return node
"""

_MODELS = {
    "mean": """
def fit(X, Y, config):
    mean = sum(Y) / len(Y)

    def predict(x):
        return mean

    return predict
""",
    "linear": """
def features(x, degree):
    out = [1.0, *x]
    if degree >= 2:
        out += [x[i] * x[j] for i in range(len(x)) for j in range(i, len(x))]
    return out


def solve(A, b):
    n = len(A)
    M = [row[:] + [bi] for row, bi in zip(A, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(M[r][c]))
        if abs(M[p][c]) < 1e-9:
            raise ArithmeticError(
                f"singular normal equations at column {c}: collinear features, add l2")
        M[c], M[p] = M[p], M[c]
        for r in range(n):
            f = M[r][c] / M[c][c]
            if r != c and f:
                M[r] = [a - f * b for a, b in zip(M[r], M[c])]
    return [M[i][n] / M[i][i] for i in range(n)]


def fit(X, Y, config):
    degree, l2 = config["degree"], config["l2"]
    F = [features(x, degree) for x in X]
    d = len(F[0])
    A = [[sum(f[i] * f[j] for f in F) + (l2 if i == j and i else 0.0) for j in range(d)]
         for i in range(d)]
    b = [sum(f[i] * y for f, y in zip(F, Y)) for i in range(d)]
    w = solve(A, b)

    def predict(x):
        return sum(wi * fi for wi, fi in zip(w, features(x, degree)))

    return predict
""",
    "knn": """
def fit(X, Y, config):
    k, weighted = config["k"], config["weights"] == "distance"
    if not 1 <= k <= len(X):
        raise ValueError(f"k must be between 1 and {len(X)}, got {k}")

    def predict(x):
        near = sorted((sum((a - b) ** 2 for a, b in zip(x, row)), y)
                      for row, y in zip(X, Y))[:k]
        if not weighted:
            return sum(y for _, y in near) / k
        ws = [1.0 / (math.sqrt(d) + 1e-9) for d, _ in near]
        return sum(w * y for w, (_, y) in zip(ws, near)) / sum(ws)

    return predict
""",
    "tree": _TREE
    + """

def fit(X, Y, config):
    root = build_tree(X, Y, list(range(len(X))), config["max_depth"], config["min_leaf"])

    def predict(x):
        return tree_predict(root, x)

    return predict
""",
    "boost": _TREE
    + """

def fit(X, Y, config):
    base = sum(Y) / len(Y)
    residual = [y - base for y in Y]
    trees = []
    for _ in range(config["rounds"]):
        tree = build_tree(X, residual, list(range(len(X))), config["max_depth"], 5, cuts=8)
        trees.append(tree)
        residual = [r - config["lr"] * tree_predict(tree, x) for r, x in zip(residual, X)]

    def predict(x):
        return base + config["lr"] * sum(tree_predict(t, x) for t in trees)

    return predict
""",
}

_MAIN = """

def main():
    data = sys.argv[1]
    X, Y = load(data + "/train.csv")
    VX, VY = load(data + "/valid.csv")
    X, VX = standardize(X, VX)
    started = time.perf_counter()
    predict = fit(X, Y, CONFIG)
    P = [predict(x) for x in VX]
    rmse = math.sqrt(sum((p - y) ** 2 for p, y in zip(P, VY)) / len(VY))
    scores = {"rmse": round(rmse, 6), "n_train": len(X),
              "seconds": round(time.perf_counter() - started, 4)}
    with open("scores.json", "w") as f:
        json.dump(scores, f)
    print(json.dumps(scores))


main()
"""


def render_script(proposal: Proposal) -> str:
    """The training script for ``proposal``: standalone, standard library only."""
    config = proposal.config
    header = _HEADER.format(
        loop_idx=config.get("seed", "?"),
        hypothesis=proposal.hypothesis.replace('"""', "'''"),
        config={k: v for k, v in config.items() if k != "seed"},
    )
    return header + _MODELS[config["model"]] + _MAIN
