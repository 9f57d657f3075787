"""The training step: the one function every Ray Train worker and Tune trial calls per batch, and the one the
performance model counts (shipyard.perf.layers.count_step_work runs it on the meta device). Pure torch.

    loss = training_step(model, optimizer, batch, task.loss, StepOptions.of(cfg.train))

What is configurable on every task: `train.precision` (bf16-mixed: the forward under torch.autocast, the loss in fp32),
`train.grad_accum_steps` (micro-batches per optimizer step) and `train.grad_clip_norm`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepOptions:
    precision: str = "fp32"
    grad_accum_steps: int = 1
    grad_clip_norm: float | None = None

    @classmethod
    def of(cls, train_cfg: Any) -> StepOptions:
        """From the config's `train` section (shipyard.config.TrainConfig)."""
        return cls(train_cfg.precision, train_cfg.grad_accum_steps, train_cfg.grad_clip_norm)


def _no_mark(phase: str) -> None:
    return None


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    loss_fn: LossFn,
    options: StepOptions = StepOptions(),
    mark: Callable[[str], None] = _no_mark,
) -> float:
    """One optimizer step on `batch` ({"x", "y"}); returns the batch's mean loss.

    The batch is split in `grad_accum_steps` micro-batches; each one's loss is weighted by its share of the
    rows, so the summed gradients equal those of the whole batch at once (for a loss that is a mean over rows,
    as every built-in task's is). Under DDP, only the last micro-batch's backward all-reduces (`no_sync` on the
    others: PyTorch's documented pattern for accumulation). `mark(phase)` tells a counter which phase runs next
    ("forward", "loss", "backward", "optimizer"); the training loop passes nothing.
    """
    x, y = batch["x"], batch["y"]
    rows = len(y)
    parts = max(1, min(options.grad_accum_steps, rows))
    xs, ys = (x.tensor_split(parts), y.tensor_split(parts)) if parts > 1 else ((x,), (y,))
    autocast = options.precision == "bf16-mixed" and x.device.type in ("cpu", "cuda")
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for i in range(parts):
        last = i == parts - 1
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            mark("forward")
            with torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                out = model(xs[i])
            mark("loss")
            # the loss in fp32 (autocast's own advice for reductions), weighted by the micro-batch's rows
            loss = loss_fn(out.float(), ys[i])
            if parts > 1:
                loss = loss * (len(ys[i]) / rows)
            mark("backward")
            loss.backward()
        losses.append(loss)
    mark("optimizer")
    if options.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), options.grad_clip_norm)
    optimizer.step()
    total = losses[0] if parts == 1 else torch.stack([t.detach() for t in losses]).sum()
    if total.device.type == "meta":  # counted, not computed: there is no value to read
        mark("item")
        return float("nan")
    return total.item()
