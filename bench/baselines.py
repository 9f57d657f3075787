"""What bench/perfmodel.py holds the Ray Train path against: the same training step in a plain process (timed
phase by phase, and as a loop over in-memory tensors) and plain `torchrun` DDP on 2 processes; and which part of
a case's step holds the plan's error."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plain_phases_ms(cfg, info, batch: int, budget_s: float = 1.5) -> dict:
    """The training step of one worker's batch in this process (1 thread, in-memory tensors, no Ray), timed
    phase by phase with the step's own marks: forward (with the loss), backward, optimizer; and the whole step."""
    import torch

    from shipyard.tasks import make_task
    from shipyard.train.epoch import make_optimizer
    from shipyard.train.step import training_step

    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    task = make_task(cfg.task, info)
    model = task.build_model(cfg.model)
    opt = make_optimizer(cfg, model)
    b = task.example_batch(batch)
    b["x"] = torch.randn_like(b["x"])
    stamps: dict[str, float] = {}
    parts: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}

    def mark(phase: str) -> None:
        stamps[phase] = time.perf_counter()

    for _ in range(5):
        training_step(model, opt, b, task.loss, mark=mark)
    end = time.perf_counter() + budget_s
    while time.perf_counter() < end or len(parts["step"]) < 20:
        start = time.perf_counter()
        training_step(model, opt, b, task.loss, mark=mark)
        done = time.perf_counter()
        parts["forward"].append(stamps["backward"] - stamps["forward"])
        parts["backward"].append(stamps["optimizer"] - stamps["backward"])
        parts["optimizer"].append(done - stamps["optimizer"])
        parts["step"].append(done - start)
    return {k: statistics.median(v) * 1e3 for k, v in parts.items()}


def torchrun_samples_per_s(model: str, per_worker_batch: int, rows: int, epochs: int) -> float:
    """Plain DDP on 2 processes (bench/torchrun_ddp.py under torchrun, gloo, rendezvous on this host)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "bench" / "torchrun_ddp.py"),
            f"--model={model}",
            f"--batch={per_worker_batch}",
            f"--rows={rows}",
            f"--epochs={epochs}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"torchrun baseline failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["samples_per_s"]


def reference_rate(seconds: float = 0.3) -> float:
    """This machine's speed now: 256x256 fp32 matmuls a second on 1 torch thread. bench/perfmodel.py times it
    before every case: its range over a run is how far the machine itself drifted (a 2-vCPU VM's rate moved
    2054-2595 a second over 20 s with nothing else running), the floor under any prediction's error."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(256, 256)
        for _ in range(10):
            a @ a
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            a @ a
            n += 1
        return n / seconds
    finally:
        torch.set_num_threads(before)


def attribute(case: dict, plain: dict) -> tuple[str, float, dict]:
    """Which part of the step holds the prediction's error: forward, backward and optimizer against the plain
    process's phases; `comm_and_overheads` (the exposed all-reduce, DDP's other costs, and whatever the Ray Train
    worker adds per step) against the Ray step minus the plain step. (part, its error in ms, every part's)."""
    measured = {
        "forward": plain["forward"],
        "backward": plain["backward"],
        "optimizer": plain["optimizer"],
        "comm_and_overheads": case["step_time_ms"] - plain["step"],
    }
    errors = {k: case["predicted_parts_ms"][k] - v for k, v in measured.items()}
    part = max(errors, key=lambda k: abs(errors[k]))
    return part, errors[part], errors


def plain_loop_samples_per_s(cfg, train_xy, info, epochs: int) -> float:
    """The same training step over in-memory tensors, 1 thread, no Ray: the ceiling for the Ray Train path."""
    import torch

    from shipyard.tasks import make_task
    from shipyard.train.epoch import make_optimizer
    from shipyard.train.step import training_step

    torch.set_num_threads(1)
    torch.manual_seed(cfg.train.seed)
    x, y = (torch.from_numpy(a) for a in train_xy)
    task = make_task(cfg.task, info)
    model = task.build_model(cfg.model)
    opt = make_optimizer(cfg, model)
    b = cfg.train.batch_size
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), b):
            idx = perm[i : i + b]
            training_step(model, opt, {"x": x[idx], "y": y[idx]}, task.loss)
        rates.append(len(y) / (time.perf_counter() - start))
    return statistics.median(rates[1:])
