"""A user's own task, outside the platform: what `task.name=tests.user_tasks:MedianRegression` trains.

It is the README's example of writing a task: it reads its own data (synthetic here, built with Ray Data),
trains with its own loss (the pinball loss of quantile regression: robust to the heavy-tailed noise that would
pull a mean-squared-error fit around) and reports its own metrics; Shipyard does the rest.
"""

import numpy as np
import torch

from shipyard import DataInfo, Splits, Task


class MedianRegression(Task):
    """Predict the `quantile` (default: the median) of y given two numbers."""

    METRICS = {"pinball": "min", "mae": "min"}

    def __init__(self, info=None, name="", quantile: float = 0.5, rows: int = 4000):
        super().__init__(info, name)
        self.quantile, self.rows = quantile, rows

    def load(self, cfg) -> Splits:
        import ray.data

        rng = np.random.default_rng(cfg.seed)
        x = rng.normal(size=(self.rows, 2)).astype(np.float32)
        noise = rng.standard_t(df=1.5, size=self.rows).astype(np.float32)  # heavy tails: outliers galore
        y = 3 * x[:, 0] - x[:, 1] + 0.3 * noise
        part = rng.random(self.rows)  # the split: fixed by data.seed
        splits = {}
        for name, keep in (
            ("train", part >= cfg.val_fraction + cfg.test_fraction),
            ("val", part < cfg.val_fraction),
            ("test", (part >= cfg.val_fraction) & (part < cfg.val_fraction + cfg.test_fraction)),
        ):
            xs, ys = x[keep], y[keep]
            splits[name] = (
                ray.data.range(len(ys))
                .map_batches(lambda b, xs=xs, ys=ys: {"x": xs[b["id"]], "y": ys[b["id"]]})
                .materialize()
            )
        info = DataInfo(
            task=self.name,
            input_shape=[2],
            output_width=1,
            target="y",
            feature_names=["a", "b"],
            data_hash=f"synthetic-seed{cfg.seed}-rows{self.rows}",
            rows={k: v.count() for k, v in splits.items()},
        )
        self.bind(info)
        return Splits(splits["train"], splits["val"], splits["test"], info)

    def loss(self, outputs, targets):
        err = targets - outputs.reshape(-1)
        return torch.maximum(self.quantile * err, (self.quantile - 1) * err).mean()

    def metrics(self, outputs, targets):
        err = targets.double() - outputs.reshape(-1).double()
        pinball = torch.maximum(self.quantile * err, (self.quantile - 1) * err).mean().item()
        return {"loss": pinball, "pinball": pinball, "mae": err.abs().mean().item()}
