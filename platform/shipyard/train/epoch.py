"""One epoch of training and validation on one worker, in plain torch: no Ray inside (Ray Train runs it per worker,
shipyard.train.loop; a single-process trial runs it directly, shipyard.tune.trials)."""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from shipyard.config import Config
from shipyard.tasks import Task
from shipyard.train.step import StepOptions, training_step

SHUFFLE_BUFFER_ROWS = 10_000


IN_MEMORY_BYTES = 256 * 2**20
"""A worker's epoch of training batches up to this size is loaded before its first step (run_epoch)."""


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def evaluate(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], task: Task, gather: bool = False
) -> dict[str, float]:
    """The task's metrics over all batches' outputs at once (a split's outputs are small: rows x outputs).

    `gather`: each rank saw only its share of the split (HeldRows.share): every rank's outputs and targets are
    gathered first, so every rank computes the metrics of the whole split, as one process would."""
    model.eval()
    outputs, targets = [], []
    with torch.no_grad():
        for b in batches:
            outputs.append(model(b["x"]).float().cpu())
            targets.append(b["y"].cpu())
    if gather and torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, (outputs, targets))  # our own ranks' tensors, not user files
        outputs = [o for rank_outputs, _ in everyone for o in rank_outputs]
        targets = [t for _, rank_targets in everyone for t in rank_targets]
    if not outputs:
        return {}
    return task.metrics(torch.cat(outputs), torch.cat(targets))


class HeldRows:
    """A worker's rows of one split, streamed from Ray Data on the first pass and, when they fit in memory,
    kept: every later epoch reshuffles them in this process instead of running Ray Data again.

    Why: each pass over a Ray Data shard starts a streaming execution (coordinator actor, read tasks, iterator
    threads) that competes with the training step for a 2-core machine's CPUs; once the rows are held an epoch
    costs only its steps. The rows a worker holds stay its own (like torch's DistributedSampler without a
    global reshuffle); their order changes every epoch (torch.randperm seeded by the epoch's seed).
    """

    def __init__(self, ds, batch_size: int, device: torch.device | str = "cpu", keep: bool = True):
        self.ds, self.batch_size, self.device, self.keep = ds, batch_size, device, keep
        self.rows: dict[str, torch.Tensor] | None = None

    @property
    def held(self) -> bool:
        return self.rows is not None

    def epoch(self, seed: int | None = None):
        """This epoch's batches: the first pass streams (Ray Data's local shuffle, seeded), later ones reshuffle
        the held rows (in the order they were read when `seed` is None)."""
        if self.rows is None:
            return self._stream(seed)
        n = len(next(iter(self.rows.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if seed is not None else None
        rows = {k: v[order.to(v.device)] if order is not None else v for k, v in self.rows.items()}
        return ({k: v[i : i + self.batch_size] for k, v in rows.items()} for i in range(0, n, self.batch_size))

    def share(self, rank: int, world: int):
        """For validation: once the rows are held, rank r evaluates rows r, r + world, ... (evaluate(...,
        gather=True) puts the shares together); before that, every rank streams all of them."""
        if self.rows is None or world == 1:
            return self.epoch()
        mine = {k: v[rank::world] for k, v in self.rows.items()}
        n = len(next(iter(mine.values())))
        return ({k: v[i : i + self.batch_size] for k, v in mine.items()} for i in range(0, n, self.batch_size))

    def _stream(self, seed: int | None):
        kept: list[dict[str, torch.Tensor]] = []
        for b in iter_batches(self.ds, self.batch_size, seed, self.device):
            if self.keep:
                kept.append(b)
            yield b
        if self.keep and kept:  # only a whole pass is held: torch.cat copies out of Ray Data's blocks
            self.rows = {k: torch.cat([b[k] for b in kept]) for k in kept[0]}


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
    in_memory: bool = False,
    options: StepOptions = StepOptions(),
    gather_val: bool = False,
) -> dict[str, float]:
    """One pass over this worker's training batches, then validation. Pure torch: no Ray inside.

    `in_memory`: take all of the epoch's batches first, then train: a streaming iterator's threads formatting
    the next batch slow every step (MLP on digits, one process on a busy 2-core machine: 0.83-1.46 ms a
    step streaming, 0.73-0.80 ms in memory, and the epoch faster too). `step_time_ms` is the median time of one
    training step (forward, backward with DDP's all-reduce, optimizer), what shipyard.perf predicts;
    `data_time_s` the epoch's time spent getting batches (loading them all, or waiting for each).
    `gather_val`: `val_batches` are this rank's share of the split (HeldRows.share), evaluate gathers them.
    """
    start = time.perf_counter()
    load_s = 0.0
    if in_memory:
        train_batches = list(train_batches)
        load_s = time.perf_counter() - start
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
    return {
        "train_loss": loss_sum / max(n, 1),
        **val,
        "epoch_time_s": time.perf_counter() - start,
        "train_time_s": train_time_s,
        "step_time_ms": statistics.median(step_s) * 1e3 if step_s else 0.0,
        "data_wait_ms": statistics.median(wait_s) * 1e3 if wait_s else 0.0,
        "steps": len(step_s),
        "data_time_s": load_s + sum(wait_s),
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
