"""The built-in table tasks: classification and regression on a parquet/CSV file or a built-in set.

    task.name: classification   # label column of classes; cross-entropy; accuracy (max)
    task.name: regression       # numeric target; MSE on the standardized target; rmse (min), mae, r2

Both read the table with shipyard.data.tables.load_table and bake the train split's preprocessing into the model
(`TabularEncoder`): numbers standardized by their train mean and deviation, each text column one-hot encoded
over its train categories (a value not seen in training encodes as all zeros, an "other" category). Regression
adds a decoder that turns the network's standardized output back into the target's units. So the registered
model takes raw values, and the endpoint takes a row as the file's values in column order or by name.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from shipyard.tasks.base import RequestError, Splits, Task


class TabularEncoder(nn.Module):
    """Raw table rows (numbers, and text columns as category indices) -> the network's input: standardized
    numbers, then a one-hot block per text column. Statistics are buffers: saved in checkpoints, exported."""

    def __init__(self, preprocessing: dict[str, Any], feature_names: list[str]):
        super().__init__()
        numeric, categorical = preprocessing.get("numeric", {}), preprocessing.get("categorical", {})
        mean = [numeric[f]["mean"] if f in numeric else 0.0 for f in feature_names]
        std = [numeric[f]["std"] if f in numeric else 1.0 for f in feature_names]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.only_numbers = not categorical
        self.register_buffer(
            "numeric_index",
            torch.tensor([j for j, f in enumerate(feature_names) if f not in categorical], dtype=torch.long),
        )
        self.categorical = [(j, len(categorical[f])) for j, f in enumerate(feature_names) if f in categorical]
        for n, (_, k) in enumerate(self.categorical):
            self.register_buffer(f"codes_{n}", torch.arange(k, dtype=torch.float32))

    @property
    def out_features(self) -> int:
        return len(self.numeric_index) + sum(k for _, k in self.categorical)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.std
        if self.only_numbers:
            return z
        parts = [z.index_select(1, self.numeric_index)]
        for n, (j, _) in enumerate(self.categorical):  # index -1 (unseen) matches no code: all zeros
            parts.append((x[:, j : j + 1] == getattr(self, f"codes_{n}")).to(x.dtype))
        return torch.cat(parts, dim=1)


class TargetScale(nn.Module):
    """The network's standardized output (N, 1) -> the target in its own units (N,)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, 0].float() * self.std + self.mean  # fp32 under autocast too: bf16 keeps ~3 digits


class _Table(Task):
    REGRESSION: ClassVar[bool] = False

    def check_source(self, cfg) -> None:
        from shipyard.data.tables import check_source

        check_source(cfg)

    def load(self, cfg) -> Splits:
        from shipyard.data.tables import load_table

        splits = load_table(cfg, self.name, regression=self.REGRESSION)
        self.bind(splits.info)
        return splits

    def net_shape(self) -> tuple[int, int]:
        return self.encoder().out_features, self.info.output_width

    def encoder(self) -> TabularEncoder:
        return TabularEncoder(self.info.preprocessing, self.info.feature_names)

    # -- serving: rows by position or by name, text values by category -------------------------------------
    def parse_instances(self, instances: list[Any]) -> np.ndarray:
        names = self.info.feature_names
        categories = self.info.preprocessing.get("categorical", {})
        if not categories and all(type(r) is list for r in instances):  # the fast path: rows of numbers
            try:
                x = np.asarray(instances, dtype=np.float64)
            except (ValueError, TypeError):
                x = None
            if x is not None and x.ndim == 2 and x.shape[1] == len(names) and _all_numbers(instances):
                return _finite(x)
        lookup = {f: {v: i for i, v in enumerate(cats)} for f, cats in categories.items()}
        x = np.empty((len(instances), len(names)), dtype=np.float64)
        for i, row in enumerate(instances):
            if isinstance(row, dict):
                missing = [f for f in names if f not in row]
                extra = [k for k in row if k not in lookup and k not in names]
                if missing or extra:
                    raise RequestError(
                        f"instances[{i}]: "
                        + "; ".join(
                            ([f"missing {', '.join(missing)}"] if missing else [])
                            + ([f"unknown {', '.join(map(str, extra))}"] if extra else [])
                        )
                        + f" (the model takes {', '.join(names)})"
                    )
                values = [row[f] for f in names]
            elif isinstance(row, list):
                if len(row) != len(names):
                    raise RequestError(
                        f"instances[{i}] has {len(row)} features; the model takes {len(names)} ({', '.join(names)})"
                    )
                values = row
            else:
                raise RequestError(
                    f"instances[{i}] is {type(row).__name__}: give a list of values in column order "
                    'or an object {"column": value, ...}'
                )
            for j, (f, v) in enumerate(zip(names, values)):
                if f in lookup:
                    if not isinstance(v, str):
                        raise RequestError(
                            f"instances[{i}] column '{f}' takes one of its text categories "
                            f"({', '.join(categories[f][:10])}), got {v!r}"
                        )
                    x[i, j] = lookup[f].get(v, -1)  # unseen: the all-zero "other" encoding
                elif type(v) in (int, float):
                    x[i, j] = v
                else:
                    raise RequestError(f"instances[{i}] column '{f}': Input should be a valid number, got {v!r}")
        return _finite(x)

    def instances(self, x: np.ndarray) -> list[Any]:
        categories = self.info.preprocessing.get("categorical", {})
        rows = x.tolist()
        if not categories:
            return rows
        names = self.info.feature_names
        cats = [(j, categories[f]) for j, f in enumerate(names) if f in categories]
        for row in rows:
            for j, values in cats:
                code = int(row[j])
                row[j] = values[code] if code >= 0 else "(not seen in training)"
        return rows

    def inputs(self) -> list[dict[str, Any]]:
        """The request schema `/metadata` shows: each column, its kind, and a text column's categories."""
        categories = self.info.preprocessing.get("categorical", {})
        return [
            {"name": f, "kind": "category", "categories": categories[f]}
            if f in categories
            else {"name": f, "kind": "number"}
            for f in self.info.feature_names
        ]


def _all_numbers(rows: list[list[Any]]) -> bool:
    """True JSON numbers only: true/false and "1.5" are not (numpy would take them)."""
    return all(type(v) in (int, float) for row in rows for v in row)


def _finite(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)  # 1e39 is finite JSON but Infinity in float32
    if not np.isfinite(x32).all():
        raise RequestError(
            f"instances[{int(np.argwhere(~np.isfinite(x32))[0][0])}] holds NaN or Infinity (or a "
            "number beyond float32); send finite numbers"
        )
    return x32


class Classification(_Table):
    """A label column of classes (any values: numbers or text); the endpoint answers the class."""

    METRICS = {"accuracy": "max"}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return {
            "loss": nn.functional.cross_entropy(outputs.float(), targets).item(),
            "accuracy": (outputs.argmax(1) == targets).float().mean().item(),
        }


class Regression(_Table):
    """A numeric target; trained on the standardized target (the decoder scales back), so the learning rate
    means the same whatever the target's units. The endpoint answers numbers."""

    REGRESSION = True
    METRICS = {"rmse": "min", "mae": "min", "r2": "max"}

    def decoder(self) -> TargetScale:
        t = self.info.preprocessing["target"]
        return TargetScale(t["mean"], t["std"])

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # MSE in standardized units: the model answers in the target's units, the loss is scale-free
        std = self.info.preprocessing["target"]["std"]
        return nn.functional.mse_loss(outputs.reshape(-1) / std, targets.reshape(-1).float() / std)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        pred, y = outputs.reshape(-1).double(), targets.reshape(-1).double()
        err = pred - y
        mse = (err**2).mean().item()
        total = ((y - y.mean()) ** 2).sum().item()
        std = self.info.preprocessing["target"]["std"]
        return {
            "loss": mse / std**2,
            "rmse": math.sqrt(mse),
            "mae": err.abs().mean().item(),
            "r2": 1 - (err**2).sum().item() / total if total > 0 else float("nan"),
        }
