"""Plain PyTorch DDP, the baseline bench/perfmodel.py holds Shipyard's Ray Train path against.

    torchrun --nproc_per_node=2 bench/torchrun_ddp.py --model mlp --batch 32 --rows 1312 --epochs 6

Each rank: gloo process group, the same built-in model Shipyard trains on digits (64 features, 10 classes; with
`--model name@images` the image task's model on 1x8x8 images),
AdamW, Shipyard's own training step, one torch thread, in-memory random tensors of the same per-worker batch,
`rows` training rows an epoch split over the ranks. No Ray, no Ray Data, no checkpoint, no MLflow. Rank 0 prints
one JSON line: {"samples_per_s": median over the epochs after the first, "step_time_ms": median step}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp")
    p.add_argument("--batch", type=int, default=32, help="rows per worker per step")
    p.add_argument("--rows", type=int, default=1312, help="training rows per epoch, all ranks together")
    p.add_argument("--epochs", type=int, default=6)
    args = p.parse_args()

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from shipyard import load_config
    from shipyard.data.splits import DataInfo
    from shipyard.tasks import make_task
    from shipyard.train.epoch import make_optimizer
    from shipyard.train.step import training_step

    torch.set_num_threads(1)  # as a Ray Train worker with 1 CPU
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    name, _, data = args.model.partition("@")
    if data == "images":  # the image task's model on 8x8 grayscale digits, as bench/perfmodel.py's name@images
        overrides = {"task.name": "image_classification", "data.builtin": None, "data.path": "unused"}
        info = DataInfo(
            "image_classification",
            [1, 8, 8],
            10,
            "class folder",
            classes=list(range(10)),
            preprocessing={"mean": [0.5], "std": [0.25]},
        )
    else:
        overrides = {}
        info = DataInfo("classification", [64], 10, "label", [f"x{i}" for i in range(64)], list(range(10)))
    cfg = load_config(None, {**overrides, "model.name": name, "train.batch_size": args.batch * world})
    task = make_task(cfg.task, info)
    torch.manual_seed(cfg.train.seed)
    model = DistributedDataParallel(task.build_model(cfg.model))
    opt = make_optimizer(cfg, model)
    steps = math.ceil(args.rows / world / args.batch)
    x = torch.randn(steps * args.batch, *info.input_shape)
    y = torch.randint(0, 10, (steps * args.batch,))
    rates, step_s = [], []
    for _ in range(args.epochs):
        dist.barrier()
        start = time.perf_counter()
        for i in range(steps):
            t = time.perf_counter()
            sl = slice(i * args.batch, (i + 1) * args.batch)
            training_step(model, opt, {"x": x[sl], "y": y[sl]}, task.loss)
            step_s.append(time.perf_counter() - t)
        rates.append(steps * args.batch * world / (time.perf_counter() - start))
    if rank == 0:
        steady = rates[1:] or rates
        print(json.dumps({"samples_per_s": statistics.median(steady), "step_time_ms": statistics.median(step_s) * 1e3}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # this script's start-up, before torch starts its pools
    main()
