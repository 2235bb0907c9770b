"""The competition's data: a small tabular regression task, generated, never downloaded.

Six features, one of them an exact copy of another (a leaky duplicate column, as real
Kaggle data has), and a target with a non-linear part, an interaction and noise. A model
has to find the non-linearity to beat a linear fit, and an unregularised linear fit on the
raw columns fails outright (the duplicate makes its normal equations singular).
"""

from __future__ import annotations

import csv
import math
import os
import random
import tempfile
from pathlib import Path

FEATURES = ("x0", "x1", "x2", "x3", "x4", "x0_copy")
TARGET = "y"


def make_rows(seed: int, n: int) -> list[list[float]]:
    """``n`` rows of features and target, the same for the same seed."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = [rng.uniform(-2.0, 2.0) for _ in range(5)]
        y = 2.0 * math.sin(1.5 * x[0]) + 0.8 * x[1] ** 2 - 0.6 * x[2] * x[3] + 0.3 * x[4]
        y += rng.gauss(0.0, 0.3)
        rows.append([*(round(v, 5) for v in x), round(x[0], 5), round(y, 5)])
    return rows


def write_dataset(folder: Path, seed: int = 0, n_rows: int = 400) -> Path:
    """Write ``train.csv`` (75 %) and ``valid.csv`` (25 %) into ``folder``; return it.

    Idempotent and safe with parallel callers: each file is written to a temporary name and
    renamed into place, so a reader never sees half a file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "train.csv").exists() and (folder / "valid.csv").exists():
        return folder
    rows = make_rows(seed, n_rows)
    cut = n_rows * 3 // 4
    for name, part in (("train", rows[:cut]), ("valid", rows[cut:])):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".csv", dir=folder)
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*FEATURES, TARGET])
            writer.writerows(part)
        os.replace(tmp, folder / f"{name}.csv")
    return folder
