"""A table's train-split statistics, fitted with Ray Data: a text column's categories (or the DataError that it
is not categorical) and the numeric columns' means and deviations. The tabular tasks bake both into the model."""

from __future__ import annotations

from typing import Any

import numpy as np

from shipyard.errors import DataError


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def categories(train, column: str, rows: int, max_categories: int, source: str) -> list[Any]:
    """The distinct values of a text column in the train split, or a DataError when it is not categorical."""
    values = sorted(str(v) for v in train.unique(column) if not is_missing(v))
    if len(values) > max_categories or (rows >= 20 and len(values) > rows / 2):
        kind = "free text or an identifier" if len(values) > rows / 2 else "too many categories to one-hot encode"
        raise DataError(
            f"{source}: text column '{column}' has {len(values)} distinct values in {rows} training "
            f"rows: {kind} (data.max_categories={max_categories}). Drop the column, encode it "
            "yourself, or raise data.max_categories"
        )
    return values


def mean_std(train, columns: list[str]) -> dict[str, dict[str, float]]:
    """Per column, the train split's mean and standard deviation (population), in one Ray Data pass. A constant
    column gets std 1: standardizing it must not divide by zero."""
    from ray.data.aggregate import Mean, Std

    if not columns:
        return {}
    found = train.aggregate(*[Mean(c) for c in columns], *[Std(c, ddof=0) for c in columns])
    out = {}
    for c in columns:
        mean, std = found[f"mean({c})"], found[f"std({c})"]
        out[c] = {"mean": float(mean), "std": float(std) if std and np.isfinite(std) and std > 1e-12 else 1.0}
    return out
