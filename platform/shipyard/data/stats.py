"""A table's train-split statistics, fitted with Ray Data: a text column's categories (or the DataError that it
is not categorical) and the numeric columns' means and deviations. The tabular tasks bake both into the model.

Each is one map over the dataset's blocks, in parallel Ray tasks, whose small per-block results the driver
combines. Not Ray Data's `unique()`/`aggregate()`: in Ray 2.60 they run a hash shuffle through aggregator
actors, which cost 9 s each on the digits' 1,312 training rows on 2 cores (measured: the data stage went from
~5 s to ~25 s when they came in), for what one pass over the blocks gives.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from shipyard.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def per_block(ds, fn: Callable[[pd.DataFrame], Any]) -> list[Any]:
    """`fn(block)` for every block of `ds` (a pandas frame), as JSON-able values, without a shuffle."""
    import pandas as pd

    def one(block: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"v": [json.dumps(fn(block))]})

    return [json.loads(row["v"]) for row in ds.map_batches(one, batch_format="pandas", batch_size=None).take_all()]


def distinct(ds, column: str) -> list[Any]:
    """The distinct values of a column (missing ones left out), in no particular order."""
    found: dict[str, Any] = {}
    for values in per_block(ds, lambda b: b[column].dropna().unique().tolist()):
        found.update((json.dumps(v), v) for v in values)
    return list(found.values())


def categories(train, column: str, rows: int, max_categories: int, source: str) -> list[Any]:
    """The distinct values of a text column in the train split, or a DataError when it is not categorical."""
    values = sorted({str(v) for v in distinct(train, column) if not is_missing(v)})
    if len(values) > max_categories or (rows >= 20 and len(values) > rows / 2):
        kind = "free text or an identifier" if len(values) > rows / 2 else "too many categories to one-hot encode"
        raise DataError(
            f"{source}: text column '{column}' has {len(values)} distinct values in {rows} training "
            f"rows: {kind} (data.max_categories={max_categories}). Drop the column, encode it "
            "yourself, or raise data.max_categories"
        )
    return values


def mean_std(train, columns: list[str]) -> dict[str, dict[str, float]]:
    """Per column, the train split's mean and standard deviation (population; missing values left out), in one
    pass. A constant column gets std 1: standardizing it must not divide by zero."""
    if not columns:
        return {}
    parts = per_block(train, lambda b: {c: _moments(b[c].to_numpy(dtype=float)) for c in columns})
    out = {}
    for c in columns:
        n, mean, m2 = 0, 0.0, 0.0
        for part in parts:
            n, mean, m2 = combine_moments((n, mean, m2), tuple(part[c]))
        std = float(np.sqrt(m2 / n)) if n else 0.0
        out[c] = {"mean": float(mean), "std": std if np.isfinite(std) and std > 1e-12 else 1.0}
    return out


def _moments(x: np.ndarray) -> list[float]:
    x = x[~np.isnan(x)]
    if not len(x):
        return [0, 0.0, 0.0]
    mean = float(x.mean())
    return [len(x), mean, float(((x - mean) ** 2).sum())]


def combine_moments(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations) of two parts joined: the pairwise update of Chan, Golub and
    LeVeque ("Updating formulae and a pairwise algorithm for computing sample variances", 1979), stable where
    sum(x^2)/n - mean^2 cancels catastrophically."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if not n:
        return 0, 0.0, 0.0
    delta = mb - ma
    return n, ma + delta * nb / n, m2a + m2b + delta * delta * na * nb / n
