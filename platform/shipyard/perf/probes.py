"""Measure this machine's CPU for the performance model: achieved rate per op class, per-op overhead.

    device = measure_device(threads=1)     # ~15 s, torch only
    shipyard calibrate                     # this on every Ray node, plus gloo all-reduce between workers

Each op class is timed with a probe (a small forward and backward of the ops of that class, e.g. a batch norm)
at sizes from cache-resident to DRAM-sized. The probe's ops are counted with the same counter that counts a
model's step, so a rate is (FLOPs or bytes of the class's ops) / (probe time - the per-op overhead of every op -
the time of its ops of other classes, from the classes measured before it). The per-op overhead is the time of
a whole training step of a model too small for any op to do real work, divided by its ops: autograd
bookkeeping and the optimizer's Python loop are in it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.functional import cross_entropy

from shipyard.perf.devices import Device
from shipyard.perf.estimate import op_time_s
from shipyard.perf.layers import COMPUTE_CLASSES, count_ops, count_step_work
from shipyard.perf.measure import relative_range
from shipyard.train.step import training_step


def cpu_model_name() -> str:
    """The CPU's model name as the kernel reports it (`AMD EPYC 7B13`); the architecture where it does not say."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_per_call_s(
    fn: Callable[[], object], min_time_s: float = 0.2, repeats: int = 5, spreads: list[float] | None = None
) -> float:
    """Median over `repeats` of the mean time per call, in loops that together take about min_time_s; while the
    repeats lie more than 10 % apart (relative_range), up to 3x as many repeats (another process taking the core
    for a moment). The final spread is appended to `spreads` when given."""
    for _ in range(3):
        fn()
    n = 1
    while True:  # a loop length that takes min_time_s / repeats
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start >= min_time_s / repeats:
            break
        n *= 2
    samples: list[float] = []
    while len(samples) < repeats or (relative_range(samples[-repeats:]) > 0.1 and len(samples) < 3 * repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n)
    if spreads is not None:
        spreads.append(relative_range(samples[-repeats:]))
    return statistics.median(samples[-repeats:])


def _fwd_bwd(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of `module` on `x`, gradients reset each call (no accumulation ops)."""
    x.requires_grad_(True)
    params = list(module.parameters())
    grad = torch.ones_like(module(x))

    def fn() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(grad)

    return fn


class _Reductions(nn.Module):
    """The reductions of typical small models: attention softmax, classifier log-softmax, pooling."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        attn = torch.softmax(x.view(b, 4, 8, 8), dim=-1).view(b, -1)
        pooled = nn.functional.adaptive_avg_pool2d(x.view(b, 4, 4, 16), 2).view(b, -1)
        return torch.cat([attn, pooled, torch.log_softmax(x[:, :10], dim=1)], dim=1)


class _Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.ln = nn.BatchNorm2d(16), nn.LayerNorm(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return torch.cat([self.bn(x.view(b, 16, 4, 4)).view(b, -1), self.ln(x.view(b * 4, 64)).view(b, -1)], 1)


# (class, sizes, probe for a size): sizes span cache-resident to DRAM-sized ops on a current server CPU
PROBES: tuple[tuple[str, tuple[int, ...], Callable[[int], Callable[[], object]]], ...] = (
    (
        "elementwise",
        (1 << 8, 1 << 11, 1 << 14, 1 << 17, 1 << 20, 1 << 23),
        lambda n: (lambda a, b: lambda: torch.add(a, b))(torch.randn(n), torch.randn(n)),
    ),
    (
        "matmul",
        (8, 16, 32, 64, 128, 256, 512, 1024),
        lambda n: (lambda a, b: lambda: torch.mm(a, b))(torch.randn(n, n), torch.randn(n, n)),
    ),
    ("conv", (2, 4, 8, 16, 32, 64, 128), lambda c: _fwd_bwd(nn.Conv2d(c, c, 3, padding=1), torch.randn(32, c, 8, 8))),
    ("norm", (1, 4, 16, 64, 256, 1024), lambda b: _fwd_bwd(_Norms(), torch.randn(b, 256))),
    ("reduction", (1, 4, 16, 64, 256, 1024), lambda b: _fwd_bwd(_Reductions(), torch.randn(b, 256))),
    ("random", (4, 16, 64, 256, 1024, 4096), lambda b: _fwd_bwd(nn.Dropout(0.1), torch.randn(b, 256))),
)


def op_overhead_us(budget_s: float = 0.5, spreads: list[float] | None = None) -> float:
    """Mean time per op of a training step of a model too small for any op to do real work."""

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 2)
        )

    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x, y = torch.randn(2, 4), torch.randint(0, 2, (2,))
    t = _time_per_call_s(lambda: training_step(model, opt, {"x": x, "y": y}, cross_entropy), budget_s, spreads=spreads)
    return t / len(count_step_work(build, 2, 4, 2).ops) * 1e6


def _curve(
    op_class: str, sizes, make, device: Device, budget_s: float, spreads: list[float] | None = None
) -> tuple[tuple[tuple[float, float], ...], float]:
    """(rate points, fixed cost per op in us) of one class from its probe at each size.

    Per size, the probe's time is n_ops * c + work / rate + (work of its other-class ops at their rates); a
    least-squares line over the sizes gives the probe's cost per op c and the rate. The rate at each size is
    the marginal rate from the size below it (work added / time added), which keeps cache effects (a rate
    that falls once ops no longer fit in cache) without counting the fixed cost as slowness.
    """
    scale = 1e12 if op_class in COMPUTE_CLASSES else 1e9
    rows = []  # (ops in the probe, work of the class's ops, time left for the class's work and all dispatch)
    for size in sizes:
        fn = make(size)
        ops = count_ops(fn)
        t = _time_per_call_s(fn, budget_s, spreads=spreads)
        own = [o for o in ops if o.op_class == op_class]
        rest_s = sum(op_time_s(o, device) - device.op_overhead_us * 1e-6 for o in ops if o.op_class != op_class)
        work = sum(o.flops if op_class in COMPUTE_CLASSES else o.bytes_moved for o in own)
        rows.append((len(ops), len(own), work, t - rest_s))
    x = np.array([[n, w] for n, _, w, _ in rows], dtype=float)
    y = np.array([t for *_, t in rows])
    weights = 1 / y  # relative errors: small probes count as much as large ones
    (per_op_s, s_per_unit), *_ = np.linalg.lstsq(x * weights[:, None], y * weights, rcond=None)
    fit_rate = 1 / s_per_unit / scale if s_per_unit > 0 else float("inf")
    points = []
    prev_w, prev_t = 0.0, 0.0
    for _n_ops, n_own, w, t in rows:
        marginal = (w - prev_w) / (t - prev_t) / scale if t > prev_t and prev_w else fit_rate
        rate = marginal if 0.2 * fit_rate < marginal < 5 * fit_rate else fit_rate  # noise guard
        points.append((w / n_own, rate))
        prev_w, prev_t = w, t
    return tuple(sorted(points)), float(per_op_s) * 1e6


def measure_device(threads: int = 1, budget_s: float = 0.15) -> Device:
    """This host's CPU as the model sees it, with `threads` torch threads (a Ray worker with N CPUs gets N)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spreads: list[float] = []
    try:
        device = Device(
            name=f"cpu:{platform.node()}",
            kind="cpu",
            peak_tflops={"fp32": 0.0},
            mem_bandwidth_gbps=0.0,
            matmul_fraction=1.0,
            elementwise_fraction=1.0,
            op_overhead_us=round(op_overhead_us(budget_s * 4, spreads), 3),
            threads=threads,
            source=f"measured by shipyard calibrate on {platform.node()} ({os.cpu_count()} cores, "
            f"{cpu_model_name()}), torch {torch.__version__}, {threads} thread(s)",
            model_name=cpu_model_name(),
        )
        per_op_us: dict[str, float] = {}
        for op_class, sizes, make in PROBES:  # each class after those its probe also runs (element-wise first)
            curve, per_op_us[op_class] = _curve(op_class, sizes, make, device, budget_s, spreads)
            device = replace(device, curves={**device.curves, op_class: curve})
        # a class whose ops cost more per op than a plain element-wise op (e.g. a conv's setup) pays the difference
        base = per_op_us["elementwise"]
        device = replace(device, op_extra_us={c: round(max(0.0, v - base), 3) for c, v in per_op_us.items()})
    finally:
        torch.set_num_threads(before)
    return replace(
        device,
        peak_tflops={"fp32": max(r for _, r in device.curves["matmul"])},
        mem_bandwidth_gbps=device.curves["elementwise"][-1][1],
        spread=round(statistics.median(spreads), 4),
    )
