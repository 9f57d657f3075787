"""A test-only model whose training waits where a test says, so that a fault lands at a known point of a run
instead of racing the machine's speed (a digits epoch takes 0.1-0.2 s on some 2-vCPU machines: a test that
reads "epoch 4/8" and then acts finds epochs 5-7 already done).

    model.name=tests.fault_hooks:gated_mlp model.options='{gate_dir: /tmp/gate}'

The model is the built-in MLP plus a counter of the training epochs it has begun, kept as a buffer so that it is
saved in every checkpoint and a resumed or restarted run goes on counting where its checkpoint left off. At the
first training step of epoch k (1-based), the process that decides (rank 0 of a Ray Train group, or a Tune
trial's process) writes an arrival file `at-<k>-...` into gate_dir, then:

- passes on if there is no `hold-<k>` file, or the hold names another worker-group size (`{"world": 2}`);
- passes on if it can take a `pass-<k>-<i>` token (by deleting it: only one process can);
- otherwise waits until the test deletes `hold-<k>`.

The other ranks of a group go on into the step and wait in DDP's all-reduce: the whole group stands still. Ray's
workers import this module because a driver started from the repository root puts it on their sys.path. `Gate`
is the test's side of it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from shipyard.tasks.models import mlp

POLL_S = 0.05


class GatedMLP(nn.Module):
    def __init__(
        self, in_features: int, num_classes: int, gate_dir: str, hidden: int = 128, depth: int = 2, dropout: float = 0.1
    ):
        super().__init__()
        self.net = mlp(in_features, num_classes, hidden, depth, dropout)
        self.gate_dir = Path(gate_dir)
        self.register_buffer("epochs_begun", torch.zeros((), dtype=torch.int64))
        self._gated_at = -1

    def train(self, mode: bool = True):
        if mode and not self.epochs_begun.is_meta:  # every epoch of the loop starts with model.train()
            self.epochs_begun += 1
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not x.is_meta and self._gated_at != int(self.epochs_begun):
            self._gated_at = int(self.epochs_begun)
            _gate(self.gate_dir, self._gated_at)
        return self.net(x)


def gated_mlp(
    in_features: int, num_classes: int, gate_dir: str, hidden: int = 128, depth: int = 2, dropout: float = 0.1
) -> nn.Module:
    return GatedMLP(in_features, num_classes, gate_dir, hidden, depth, dropout)


def _gate(gate_dir: Path, epoch: int) -> None:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        return
    world = torch.distributed.get_world_size() if distributed else 1
    gate_dir.mkdir(parents=True, exist_ok=True)
    arrival = {"epoch": epoch, "world": world, "pid": os.getpid(), "at": time.time()}
    name = f"at-{epoch}-{os.getpid()}-{time.time_ns()}"
    (gate_dir / f".{name}").write_text(json.dumps(arrival))
    os.replace(gate_dir / f".{name}", gate_dir / name)  # whole or not at all, for the test reading it
    hold = gate_dir / f"hold-{epoch}"
    while True:
        try:
            only = json.loads(hold.read_text() or "{}")
        except FileNotFoundError:
            return
        if "world" in only and only["world"] != world:
            return
        for token in sorted(gate_dir.glob(f"pass-{epoch}-*")):
            try:
                token.unlink()
                return
            except FileNotFoundError:  # another process took it first
                continue
        time.sleep(POLL_S)


class Gate:
    """The test's side: hold epochs, wait for arrivals, release."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def options(self) -> str:
        """The overrides that put the gated model into a pipeline run."""
        return json.dumps({"gate_dir": str(self.dir)})

    def hold(self, epoch: int, world: int | None = None, passes: int = 0) -> None:
        for i in range(passes):
            (self.dir / f"pass-{epoch}-{i}").touch()
        (self.dir / f"hold-{epoch}").write_text(json.dumps({} if world is None else {"world": world}))

    def release(self, epoch: int) -> None:
        (self.dir / f"hold-{epoch}").unlink(missing_ok=True)

    def arrivals(self, epoch: int | None = None) -> list[dict]:
        found = [json.loads(p.read_text()) for p in self.dir.glob("at-*")]
        return sorted((a for a in found if epoch is None or a["epoch"] == epoch), key=lambda a: a["at"])

    def latest_epoch(self, world: int | None = None) -> int:
        return max((a["epoch"] for a in self.arrivals() if world is None or a["world"] == world), default=0)

    def wait(
        self,
        epoch: int,
        alive: Callable[[], bool],
        timeout_s: float = 300,
        world: int | None = None,
        exclude_pids: set[int] = frozenset(),
        what: Callable[[], str] = lambda: "",
    ) -> dict:
        """The first arrival at `epoch` (of a group of `world` workers, not from `exclude_pids`); fails at once
        when `alive()` turns false, with `what()` (e.g. the run's log) in the message."""
        deadline = time.monotonic() + timeout_s
        while True:
            for a in self.arrivals(epoch):
                if (world is None or a["world"] == world) and a["pid"] not in exclude_pids:
                    return a
            assert alive(), f"the run ended before reaching epoch {epoch}:\n{what()[-4000:]}"
            assert time.monotonic() < deadline, f"nothing reached epoch {epoch} in {timeout_s} s:\n{what()[-4000:]}"
            time.sleep(0.1)
