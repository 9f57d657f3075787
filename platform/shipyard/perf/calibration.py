"""`shipyard calibrate`: measure every Ray node and the all-reduce between Ray workers; write the profile.

    profile = calibrate(".shipyard/hardware.json")      # after cluster.init_ray(); ~35 s on 2 cores

Compute is measured by shipyard.perf.probes in a Ray task on each node, with the CPUs a Train worker gets
(threads = scaling.cpus_per_worker). The all-reduce is timed between the two workers of a Ray Train job (gloo, as
Ray Train's CPU workers are joined), at sizes from 4 B to 16 MiB; a least-squares line through
(bytes, time) gives the alpha-beta interconnect (comm.ring_allreduce_s with N = 2: time = 2 alpha + bytes / bw).
The same two workers then train two probe models in DDP at once, which prices what data parallelism costs
beyond the all-reduce on this host (Interconnect.ddp_overhead_us, compute_slowdown).
"""

from __future__ import annotations

import json
import logging
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shipyard.perf.devices import Interconnect, Profile

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ALLREDUCE_BYTES = tuple(4 * 4**k for k in range(0, 12))  # 4 B .. 16 MiB
PROBE_FEATURES = 64


def _tiny() -> torch.nn.Module:
    from torch import nn

    return nn.Sequential(nn.Linear(PROBE_FEATURES, 4), nn.ReLU(), nn.Linear(4, 10))


def _heavy() -> torch.nn.Module:
    from torch import nn

    class Convs(nn.Module):  # compute-heavy, few parameters: its all-reduce is small beside its compute
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
                nn.Linear(128, 10),
            )

        def forward(self, x):
            return self.body(x.view(-1, 1, 8, 8))

    return Convs()


# DDP probes: `tiny` (no op does real work: what data parallelism costs per step beyond the all-reduce) and
# `heavy` (convolutions, ~0.2 GFLOP a step at batch 64, 30 KB of gradients: how much slower a worker computes
# while its peers compute too)
PROBE_MODELS = {"tiny": _tiny, "heavy": _heavy}
PROBE_BATCH = {"tiny": 2, "heavy": 64}


def _measure_node(threads: int, budget_s: float) -> dict:
    import ray

    from shipyard.perf.probes import measure_device

    return {
        "node": ray.get_runtime_context().get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "device": asdict(measure_device(threads, budget_s)),
    }


def _peer_loop(config: dict) -> None:
    """Each Ray Train worker: time gloo all-reduces, then DDP training steps of the probe models, all ranks at
    once; rank 0 reports the medians. Ray Train joins the workers in its gloo process group and wraps the
    probes as it wraps a real model (prepare_model), so this is exactly the training path's environment."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.nn.functional import cross_entropy

    from shipyard.train.loop import _log_to_driver
    from shipyard.train.step import training_step

    _log_to_driver()  # quiets Ray Train's per-report INFO lines, as in a training run

    def median_s(fn, calls: int) -> float:
        reps = []
        for _ in range(5):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            reps.append((time.perf_counter() - start) / calls)
        return statistics.median(reps)

    out: dict[str, float] = {}
    for nbytes in ALLREDUCE_BYTES:
        t = torch.ones(max(1, nbytes // 4))
        for _ in range(3):
            dist.all_reduce(t)
        # every rank runs the same fixed number of calls: a count decided by a rank's own clock could hang
        out[f"allreduce_{nbytes}"] = median_s(lambda t=t: dist.all_reduce(t), config["calls"])

    def step_s(model, batch: int) -> float:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = torch.randn(batch, PROBE_FEATURES), torch.randint(0, 10, (batch,))
        for _ in range(5):
            training_step(model, opt, {"x": x, "y": y}, cross_entropy)
        times = []
        for _ in range(100):
            start = time.perf_counter()
            training_step(model, opt, {"x": x, "y": y}, cross_entropy)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    rank = dist.get_rank()
    for probe, batch in PROBE_BATCH.items():
        torch.manual_seed(0)
        if rank == 0:  # alone: the other ranks wait at the barrier
            out[f"single_{probe}"] = step_s(PROBE_MODELS[probe](), batch)
        dist.barrier()
        out[f"ddp_{probe}"] = step_s(ray.train.torch.prepare_model(PROBE_MODELS[probe]()), batch)  # DDP, all ranks
    slowest = [None] * dist.get_world_size()
    dist.all_gather_object(slowest, out)
    worst = {k: max(o[k] for o in slowest if k in o) for k in out}  # the slowest rank sets every step
    with tempfile.TemporaryDirectory() as tmp:  # Train V2 keeps a report's metrics only with a checkpoint
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            (Path(tmp) / "calibration.json").write_text(json.dumps(worst))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(worst, checkpoint=checkpoint)


def measure_peers(threads: float = 1.0, calls: int = 20, spread: bool = False) -> Interconnect:
    """Two Ray Train workers (on two nodes when `spread`): fit alpha and bandwidth to their gloo all-reduce
    times, then price data parallelism's other costs with DDP probes (each also timed alone)."""
    import shutil

    import ray.train
    from ray.train.torch import TorchTrainer

    storage = tempfile.mkdtemp(prefix="shipyard-calibrate-")
    try:
        result = TorchTrainer(
            _peer_loop,
            train_loop_config={"calls": calls},
            scaling_config=ray.train.ScalingConfig(
                num_workers=2,
                resources_per_worker={"CPU": threads},
                placement_strategy="STRICT_SPREAD" if spread else "PACK",
            ),
            run_config=ray.train.RunConfig(
                name="calibrate", storage_path=storage, logging_config=ray.train.LoggingConfig(log_level="WARNING")
            ),
        ).fit()
        with result.checkpoint.as_directory() as d:
            m = json.loads((Path(d) / "calibration.json").read_text())
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    times = [m[f"allreduce_{b}"] for b in ALLREDUCE_BYTES]
    x = np.array([[1.0, b] for b in ALLREDUCE_BYTES])
    (intercept_s, s_per_byte), *_ = np.linalg.lstsq(x / np.array(times)[:, None], np.ones(len(times)), rcond=None)
    # ring all-reduce over N = 2: 2 alpha + 2 (N-1)/N bytes / bw = 2 alpha + bytes / bw
    latency_us = max(intercept_s, 1e-7) / 2 * 1e6
    bandwidth_gbps = 1 / max(s_per_byte, 1e-15) / 1e9
    log.info(
        "gloo all-reduce between 2 Ray Train workers%s: %s",
        " on 2 nodes" if spread else "",
        ", ".join(f"{b} B {t * 1e6:.0f} us" for b, t in zip(ALLREDUCE_BYTES[::3], times[::3])),
    )
    # overlap 0: on a CPU host the all-reduce runs on the cores the workers compute on; nothing hides
    link = Interconnect(
        "gloo" + ("-network" if spread else "-loopback"),
        round(float(bandwidth_gbps), 3),
        round(float(latency_us), 2),
        f"measured by shipyard calibrate ({datetime.now(timezone.utc):%Y-%m-%d})",
        overlap=0.0,
    )
    grads = {probe: sum(p.numel() * 4 for p in PROBE_MODELS[probe]().parameters()) for probe in PROBE_MODELS}
    return _price_ddp(link, m, grads)


def _price_ddp(link: Interconnect, measured_s: dict[str, float], grad_bytes: dict[str, int]) -> Interconnect:
    """All measured, nothing predicted: the tiny probe's DDP step minus its step alone and its all-reduce is
    the fixed cost per step; the heavy probe's DDP step, minus that and its all-reduce, over its step alone is
    the slowdown of computing while the peers compute too."""
    from shipyard.perf.comm import ring_allreduce_s

    def comm_s(probe: str) -> float:
        return ring_allreduce_s(grad_bytes[probe], 2, link)

    fixed_s = max(0.0, measured_s["ddp_tiny"] - measured_s["single_tiny"] - comm_s("tiny"))
    slowdown = max(1.0, (measured_s["ddp_heavy"] - fixed_s - comm_s("heavy")) / measured_s["single_heavy"])
    log.info(
        "DDP probes on 2 workers: tiny %.3f ms a step (%.3f alone), heavy %.3f ms (%.3f alone) -> %.0f us per "
        "step beyond the all-reduce, compute x%.2f while both compute",
        measured_s["ddp_tiny"] * 1e3,
        measured_s["single_tiny"] * 1e3,
        measured_s["ddp_heavy"] * 1e3,
        measured_s["single_heavy"] * 1e3,
        fixed_s * 1e6,
        slowdown,
    )
    return replace(link, ddp_overhead_us=round(float(fixed_s) * 1e6, 1), compute_slowdown=round(float(slowdown), 3))


def calibrate(out: str | Path, threads: int = 1, budget_s: float = 0.15) -> Profile:
    """Measure every alive Ray node and the all-reduce between workers; write and return the profile."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from shipyard.perf.devices import _device

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= threads]
    if sum(n["Resources"]["CPU"] // threads for n in nodes) < 2:
        raise RuntimeError(
            f"calibration needs two Ray workers of {threads} CPU(s) (for the all-reduce between "
            f"them); the cluster has {sum(n['Resources'].get('CPU', 0) for n in nodes):g} CPUs on "
            "nodes that fit one"
        )
    if not nodes:
        raise RuntimeError(
            f"no Ray node has {threads} CPUs free for calibration (--threads, which the pipeline "
            "takes from scaling.cpus_per_worker); lower it or add CPUs"
        )
    task = ray.remote(num_cpus=threads)(_measure_node)
    started = time.perf_counter()
    results = ray.get(
        [
            task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                threads, budget_s
            )
            for n in nodes
        ]
    )
    per_node = {r["ip"] + ":" + r["node"][:8]: r["device"] for r in results}
    slowest = min(results, key=lambda r: max(p[1] for p in r["device"]["curves"]["matmul"]))
    device = _device(slowest["device"])
    link = measure_peers(threads, spread=len({n["NodeManagerAddress"] for n in nodes}) > 1)
    profile = Profile(
        replace(device, name=f"cpu:{slowest['ip']}"),
        link,
        socket.gethostname(),
        datetime.now(timezone.utc).isoformat(timespec="seconds"),
        per_node,
    )
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)  # never a half-written profile
    log.info(
        "calibrated %d node(s) in %.1f s: matmul up to %.3f TFLOP/s, element-wise %.1f GB/s at 100 MB, %.2f us "
        "per op; gloo all-reduce %.1f us + bytes / %.2f GB/s -> %s",
        len(nodes),
        time.perf_counter() - started,
        device.peak_tflops["fp32"],
        device.mem_bandwidth_gbps,
        device.op_overhead_us,
        link.latency_us,
        link.bandwidth_gbps,
        path,
    )
    return profile
