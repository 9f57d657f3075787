"""A test-only model factory that records what each Ray Train worker trains on (tests/ray/test_data_parallel.py).

`recording_mlp` is an MLP without dropout whose forward, in training mode, saves its input batch to
`<record_dir>/rank<r>-step<nnnnn>.npy`: the rows each rank saw, step by step, to be replayed in one process
(which sets `record_dir` to None: it records nothing).
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from shipyard.tasks.models import mlp


class RecordingMLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, record_dir: str, hidden: int = 32, depth: int = 1):
        super().__init__()
        self.net = mlp(in_features, num_classes, hidden, depth, dropout=0.0)
        self.record_dir = Path(record_dir)
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.record_dir is not None:
            import ray.train

            rank = ray.train.get_context().get_world_rank()
            np.save(self.record_dir / f"rank{rank}-step{self.steps:05d}.npy", x.detach().cpu().numpy())
            self.steps += 1
        return self.net(x)


def recording_mlp(in_features: int, num_classes: int, record_dir: str, hidden: int = 32, depth: int = 1) -> nn.Module:
    return RecordingMLP(in_features, num_classes, record_dir, hidden, depth)
