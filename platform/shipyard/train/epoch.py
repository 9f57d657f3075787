"""One epoch of training and validation on one worker, in plain torch: no Ray inside (Ray Train runs it per worker,
shipyard.train.loop; a single-process trial runs it directly, shipyard.tune.trials)."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from shipyard.config import Config
from shipyard.tasks import Task
from shipyard.train.step import StepOptions, training_step

SHUFFLE_BUFFER_ROWS = 10_000


IN_MEMORY_BYTES = 256 * 2**20
"""A worker's rows of a split up to this size are read once and held (HeldRows); larger ones stream every epoch."""
VAL_BATCH = 512
"""Validation's batch (evaluate: forward only); shipyard.perf prices validation with it."""


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def evaluate(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task: Task, gather: bool = False
) -> dict[str, float]:
    """The task's metrics over all batches' outputs at once (a split's outputs are small: rows x outputs), and
    `rows`, how many this process evaluated.

    `gather`: each rank holds only its share of the split (HeldRows with world > 1): every rank's outputs and
    targets are gathered first, so every rank computes the metrics of the whole split, as one process would."""
    model.eval()
    outputs, targets = [], []
    with torch.no_grad():
        for b in batches:
            outputs.append(model(b["x"]).float().cpu())
            targets.append(b["y"].cpu())
    rows = sum(len(t) for t in targets)
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, (outputs, targets))  # our own ranks' tensors, not user files
        outputs = [o for rank_outputs, _ in everyone for o in rank_outputs]
        targets = [t for _, rank_targets in everyone for t in rank_targets]
    if not outputs:
        return {}
    return {**task.metrics(torch.cat(outputs), torch.cat(targets)), "rows": rows}


class HeldRows:
    """A worker's rows of one split: read from Ray Data once, when the first epoch asks for them, and held in
    memory when they fit (`keep`); every epoch, the first included, takes them in the order of
    torch.randperm seeded by its own seed, so an epoch's order depends only on train.seed + epoch (a resumed
    run or a restored trial goes on with the order an uninterrupted one has). Rows that do not fit stream from
    Ray Data every epoch (its local shuffle buffer, seeded the same).

    Why: each pass over a Ray Data shard starts a streaming execution (coordinator actor, read tasks, iterator
    threads) that competes with the training step for the CPUs, and an iterator formatting the next batch slows
    every step (MLP on digits, one process on a busy 2-core machine: 0.83-1.46 ms a step streaming, 0.73-0.80
    ms from memory). Held, an epoch after the first costs its steps: BENCHMARKS.md, "a shard read once".

    `world` > 1 (validation): each rank keeps only rows rank, rank + world, ... of the split (every rank reads
    the same whole split, so all agree), evaluate(..., gather=True) puts the shares together; `shared` says
    whether that happened (not when the split has fewer rows than ranks: every rank must run a forward, DDP's
    first one after training is a collective).
    """

    def __init__(self, ds, batch_size: int, device: torch.device | str = "cpu", keep: bool = True, rank=0, world=1):
        self.ds, self.batch_size, self.device, self.keep = ds, batch_size, device, keep
        self.rank, self.world = rank, world
        self.rows: dict[str, torch.Tensor] | None = None
        self.shared = False

    def load(self) -> None:
        """Read the rows (in Ray Data's order) and hold them, or this rank's share of them."""
        if self.rows is not None or not self.keep:
            return
        batches = list(iter_batches(self.ds, self.batch_size, device=self.device))
        rows = {k: torch.cat([b[k] for b in batches]) for k in batches[0]} if batches else {}
        self.rows, self.shared = share_of(rows, self.rank, self.world)

    def epoch(self, seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """This epoch's batches; `seed` None: in the order read. Loading and shuffling happen at the first
        batch, so they count as waiting for it (run_epoch's data_time_s)."""
        if not self.keep:
            yield from iter_batches(self.ds, self.batch_size, seed, self.device)
            return
        self.load()
        if not self.rows:
            return
        first = next(iter(self.rows.values()))
        n = len(first)
        order = None if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        order = order.to(first.device) if order is not None else None  # where the rows are (a GPU worker's)
        for i in range(0, n, self.batch_size):
            at = slice(i, i + self.batch_size) if order is None else order[i : i + self.batch_size]
            yield {k: v[at] for k, v in self.rows.items()}


def share_of(rows: dict[str, torch.Tensor], rank: int, world: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Rank `rank`'s validation rows: every world-th row from its own, and whether they are a share. Not when the
    split has fewer rows than ranks: every rank must run a forward (DDP's first after training syncs buffers,
    a collective), so each keeps all of them."""
    n = len(next(iter(rows.values()))) if rows else 0
    if world > 1 and n >= world:
        return {k: v[rank::world] for k, v in rows.items()}, True
    return rows, False


def fits_in_memory(rows: int, in_features: int) -> bool:
    """Whether an epoch's batches (float32 features, int64 labels) fit under IN_MEMORY_BYTES."""
    return rows * (4 * in_features + 8) <= IN_MEMORY_BYTES


def run_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches,
    val_batches,
    task: Task,
    world_size: int = 1,
    options: StepOptions = StepOptions(),
    gather_val: bool = False,
) -> dict[str, float]:
    """One pass over this worker's training batches, then validation. Pure torch: no Ray inside.

    `step_time_ms` is the median time of one training step (forward, backward with DDP's all-reduce,
    optimizer), what shipyard.perf predicts; `data_time_s` the epoch's time spent getting batches (HeldRows
    loads the first epoch's at its first batch); `val_rows` how many validation rows this rank evaluated.
    `gather_val`: `val_batches` are this rank's share of the split (HeldRows.shared), evaluate gathers them.
    """
    start = time.perf_counter()
    model.train()
    loss_sum, n = 0.0, 0
    step_s: list[float] = []
    wait_s: list[float] = []
    batches = iter(train_batches)
    while True:
        t0 = time.perf_counter()
        b = next(batches, None)
        t1 = time.perf_counter()
        if b is None:
            break
        loss_sum += training_step(model, optimizer, b, task.loss, options) * len(b["y"])
        n += len(b["y"])
        step_s.append(time.perf_counter() - t1)
        wait_s.append(t1 - t0)
    train_time_s = time.perf_counter() - start
    val = {f"val_{k}": v for k, v in evaluate(model, val_batches, task, gather_val).items()}
    val_rows = val.pop("val_rows", 0)
    return {
        "train_loss": loss_sum / max(n, 1),
        **val,
        "epoch_time_s": time.perf_counter() - start,
        "train_time_s": train_time_s,
        "step_time_ms": statistics.median(step_s) * 1e3 if step_s else 0.0,
        "data_wait_ms": statistics.median(wait_s) * 1e3 if wait_s else 0.0,
        "steps": len(step_s),
        "data_time_s": sum(wait_s),
        "val_rows": val_rows,
        # all workers process similar shards in lockstep (DDP), so global throughput ~ world_size x local
        "samples_per_s": n * world_size / max(train_time_s, 1e-9),
    }


def iter_batches(ds, batch_size: int, seed: int | None = None, device: torch.device | str = "cpu"):
    kwargs = {"local_shuffle_buffer_size": SHUFFLE_BUFFER_ROWS, "local_shuffle_seed": seed} if seed is not None else {}
    return ds.iter_torch_batches(batch_size=batch_size, device=device, collate_fn=_tensor_collate(), **kwargs)


def _tensor_collate():
    """Ray Data's blocks are read-only memory; torch warns (once per process) that a tensor wrapping one must not
    be written, and the training step never writes its inputs. Silenced here, for this call only: a copy of
    every batch would cost a large image batch milliseconds, and a process-wide filter would hide it for
    everyone."""
    import numpy as np
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Tensors(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return {k: torch.as_tensor(v) for k, v in batch.items()}

    return Tensors()
