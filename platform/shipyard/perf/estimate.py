"""Step time, epoch time and data-parallel scaling from counted work, a device and an interconnect.

    step = estimate_step(work, device)                            # one worker
    step = estimate_step(work_half_batch, device, 2, link)        # one of 2 DDP workers
    rows = scaling_table(count_for_batch, device, [1, 2, 4, 8], links, global_batch=64, rows_per_epoch=1257)

Each op takes the roofline max(compute, memory) plus the device's per-op overhead (Paleo, Qi et al. ICLR 2017,
Sec. 3.1; Williams, Waterman and Patterson, "Roofline", CACM 2009); ops run one after another, as eager
PyTorch issues them. The all-reduce of the gradients overlaps backward as DDP buckets it (comm.exposed_comm_s).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shipyard.perf.comm import Algorithm, exposed_comm_s
from shipyard.perf.devices import Device, Interconnect
from shipyard.perf.layers import OpWork, StepWork


def op_time_s(op: OpWork, device: Device, dtype: str = "fp32") -> float:
    """Roofline time of one op plus the device's per-op overhead."""
    memory_s = op.bytes_moved / (device.memory_gbps(op.op_class, op.bytes_moved) * 1e9) if op.bytes_moved else 0.0
    compute_s = op.flops / (device.compute_tflops(op.op_class, op.flops, dtype) * 1e12) if op.flops else 0.0
    return max(compute_s, memory_s) + (device.op_overhead_us + device.op_extra_us.get(op.op_class, 0.0)) * 1e-6


@dataclass(frozen=True)
class LayerTime:
    layer: str
    kind: str
    time_ms: float
    flops: int
    bytes_moved: int
    bound: str
    """`compute`, `memory` or `overhead`: what dominates this layer's time on this device."""


@dataclass(frozen=True)
class StepEstimate:
    workers: int
    batch_per_worker: int
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    comm_ms: float
    """All-reduce time of one step's gradients, hidden or not."""
    exposed_comm_ms: float
    """The part of comm_ms that adds to the step (not hidden behind backward)."""
    layers: tuple[LayerTime, ...]
    ddp_overhead_ms: float = 0.0
    """Data parallelism's cost beyond the all-reduce (Interconnect.ddp_overhead_us)."""

    @property
    def compute_ms(self) -> float:
        return self.forward_ms + self.backward_ms + self.optimizer_ms

    @property
    def step_time_ms(self) -> float:
        return self.compute_ms + self.exposed_comm_ms + self.ddp_overhead_ms

    @property
    def samples_per_s(self) -> float:
        return self.workers * self.batch_per_worker / (self.step_time_ms / 1e3)

    def top_layers(self, n: int = 5) -> list[LayerTime]:
        return sorted(self.layers, key=lambda lt: -lt.time_ms)[:n]


def estimate_step(
    work: StepWork,
    device: Device,
    workers: int = 1,
    link: Interconnect | None = None,
    algorithm: Algorithm = "ring",
    dtype: str = "fp32",
) -> StepEstimate:
    """One training step of one worker whose batch `work` counts, with `workers` data-parallel peers."""
    phase_s = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    per_layer: dict[str, list[float]] = {}
    last_backward: dict[str, float] = {}
    for op in work.ops:
        t = op_time_s(op, device, dtype)
        phase_s[op.phase] += t
        if op.phase == "backward":
            last_backward[op.layer] = phase_s["backward"]
        acc = per_layer.setdefault(op.layer, [0.0, 0, 0, 0.0, 0.0])
        acc[0] += t
        acc[1] += op.flops
        acc[2] += op.bytes_moved
        overhead = device.op_overhead_us * 1e-6
        compute = op.flops / (device.compute_tflops(op.op_class, op.flops, dtype) * 1e12) if op.flops else 0.0
        acc[3] += overhead
        acc[4] += compute
    comm_s = exposed_s = ddp_s = 0.0
    if workers > 1:
        if link is None:
            raise ValueError("estimate_step: workers > 1 needs an interconnect")
        # every peer computing at once on a shared host runs slower (calibrated; 1 for catalog links)
        phase_s = {k: v * link.compute_slowdown for k, v in phase_s.items()}
        last_backward = {k: v * link.compute_slowdown for k, v in last_backward.items()}
        ddp_s = link.ddp_overhead_us * 1e-6
        backward_s = phase_s["backward"]
        ready = [last_backward.get(layer, backward_s) for layer in work.param_layers] or [backward_s]
        sizes = list(work.param_sizes_bytes) or [0]
        comm_s, exposed_s = exposed_comm_s(backward_s, ready, sizes, workers, link, algorithm)
    layers = []
    for name, (t, flops, moved, overhead, compute) in per_layer.items():
        bound = "overhead" if overhead >= t / 2 else ("compute" if compute >= (t - overhead) / 2 else "memory")
        layers.append(LayerTime(name, work.layer_kinds.get(name, name), t * 1e3, flops, moved, bound))
    return StepEstimate(
        workers,
        work.batch_size,
        phase_s["forward"] * 1e3,
        phase_s["backward"] * 1e3,
        phase_s["optimizer"] * 1e3,
        comm_s * 1e3,
        exposed_s * 1e3,
        tuple(layers),
        ddp_s * 1e3,
    )


def forward_time_ms(work: StepWork, device: Device, dtype: str = "fp32") -> float:
    """An evaluation pass counted with `count_step_work(..., forward_only=True)`."""
    return sum(op_time_s(op, device, dtype) for op in work.ops) * 1e3


@dataclass(frozen=True)
class ScalingRow:
    workers: int
    nodes: int
    batch_per_worker: int
    step_time_ms: float
    exposed_comm_ms: float
    samples_per_s: float
    speedup: float
    efficiency: float
    """speedup / workers."""
    epoch_time_s: float


def scaling_table(
    work_for_batch: Callable[[int], StepWork],
    device: Device,
    workers: Sequence[int],
    placement: Callable[[int], tuple[int, Interconnect | None]],
    global_batch: int,
    rows_per_epoch: int,
    weak: bool = False,
    algorithm: Algorithm = "ring",
    dtype: str = "fp32",
    estimate: Callable[..., StepEstimate] = estimate_step,
) -> list[ScalingRow]:
    """Speed-up and efficiency for each worker count, against one worker with the same global batch.

    Strong scaling (default): the global batch stays `global_batch`, each worker takes global_batch // N
    (as Shipyard's Train workers do). Weak scaling: each worker keeps `global_batch`; the global batch grows.
    `placement(n)` gives the nodes n workers span and the (slowest) link their all-reduce crosses. `estimate`
    prices one step (estimate_step's arguments): the analytical model, or the measured mode's.
    """
    base = estimate(work_for_batch(global_batch), device, 1, None, algorithm, dtype).samples_per_s
    rows: list[ScalingRow] = []
    for n in workers:
        b = global_batch if weak else max(1, global_batch // n)
        nodes, link = placement(n)
        step = estimate(work_for_batch(b), device, n, link, algorithm, dtype)
        speedup = step.samples_per_s / base
        steps = math.ceil(rows_per_epoch / (b * n))
        rows.append(
            ScalingRow(
                n,
                nodes,
                b,
                step.step_time_ms,
                step.exposed_comm_ms,
                step.samples_per_s,
                speedup,
                speedup / n,
                steps * step.step_time_ms / 1e3,
            )
        )
    return rows


def recommend_workers(rows: Sequence[ScalingRow], min_efficiency: float = 0.7) -> ScalingRow:
    """The most workers whose parallel efficiency stays at or above `min_efficiency` (70 %: past it, each
    added worker buys less than 0.7 of itself), and whose throughput still grows."""
    best = rows[0]
    for row in rows[1:]:
        if row.efficiency >= min_efficiency and row.samples_per_s > best.samples_per_s:
            best = row
    return best


def choose_workers(rows: Sequence[ScalingRow], fit_workers: int, min_efficiency: float = 0.7) -> ScalingRow:
    """`scaling.num_workers: auto`: of the worker counts that fit the cluster (`fit_workers`), the one
    recommend_workers picks (the most workers whose efficiency stays >= `min_efficiency` while throughput grows);
    one worker when nothing else fits."""
    fitting = [r for r in rows if r.workers <= max(1, fit_workers)]
    return recommend_workers(fitting or rows[:1], min_efficiency)


def trials_to_fill(cluster_cpus: float, cpus_per_trial: float, num_samples: int) -> int:
    """`tune.max_concurrent_trials: auto`: as many trials as fit the cluster's CPUs at once, up to the number of
    trials."""
    return max(1, min(num_samples, int(cluster_cpus // cpus_per_trial)))
