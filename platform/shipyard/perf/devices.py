"""Hardware the performance model knows: devices (compute and memory) and interconnects, by name.

    device = get_device("h100")           # from the catalog below (data sheets)
    device = load_profile(path).device    # this machine, measured by `shipyard calibrate`

Every figure has its unit in its name and its source beside it. A device's *achieved* fraction of peak per
operation class is what turns a data sheet into a prediction (Paleo, Qi et al. ICLR 2017, Sec. 3.1 "platform
percent of peak"); a calibrated device also carries measured curves (achieved rate against op size), because
on a CPU a small matmul or a cache-resident element-wise op runs at a very different rate from a large one
(the cache-aware roofline, Ilic, Pratas and Sousa, IEEE CAL 2014).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Device:
    name: str
    kind: str
    """`cpu` or `gpu`."""
    peak_tflops: dict[str, float]
    """Peak dense throughput per dtype (`fp32`, `tf32`, `bf16`), 10^12 FLOP/s."""
    mem_bandwidth_gbps: float
    """Peak memory bandwidth, 10^9 bytes/s."""
    matmul_fraction: float
    """Achieved fraction of peak for matmul/conv (large ops)."""
    elementwise_fraction: float
    """Achieved fraction of memory bandwidth for element-wise ops (large ops)."""
    op_overhead_us: float
    """Time per op outside the kernel: eager dispatch, autograd bookkeeping, kernel launch."""
    source: str
    threads: int | None = None
    """CPU: the torch threads the figures were measured with (a Ray worker with 1 CPU runs 1 thread)."""
    op_extra_us: dict[str, float] = field(default_factory=dict)
    """Calibrated fixed cost per op of a class beyond op_overhead_us (e.g. a CPU conv's setup)."""
    curves: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    """Calibrated achieved rate per op class against op size, ascending: for `matmul` and `conv` (FLOPs of
    one op, TFLOP/s), for the others (bytes one op moves, GB/s). A class with a curve uses it instead of
    peak x fraction."""
    model_name: str = ""
    """The processor's model name (a calibrated CPU: /proc/cpuinfo's `model name`)."""
    spread: float = 0.0
    """Calibrated: the median over the probes of how far apart their repeated timings lay ((max - min) /
    median): the profile's own noise, which the plan prints as its uncertainty (0: a data sheet)."""

    def compute_tflops(self, op_class: str, flops: float, dtype: str = "fp32") -> float:
        """Achieved FLOP/s of a matmul or conv op of `flops` FLOPs, in TFLOP/s."""
        if op_class in self.curves and dtype == "fp32":
            return _interpolate(self.curves[op_class], flops)
        if dtype not in self.peak_tflops:
            raise KeyError(
                f"{self.name} has no {dtype} peak; it has {', '.join(self.peak_tflops)} (a CPU profile "
                "prices fp32 only: use --dtype fp32, or a catalog GPU such as --hardware h100)"
            )
        return self.peak_tflops[dtype] * self.matmul_fraction

    def memory_gbps(self, op_class: str, bytes_moved: float) -> float:
        """Achieved bytes/s of an op of class `op_class` moving `bytes_moved` bytes, in GB/s (matmul/conv
        ops' operand traffic streams like element-wise ops)."""
        curve = self.curves.get(
            op_class if op_class in self.curves and op_class not in ("matmul", "conv") else "elementwise"
        )
        if curve:
            return _interpolate(curve, bytes_moved)
        return self.mem_bandwidth_gbps * self.elementwise_fraction


@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth_gbps: float
    """Achievable bandwidth per worker, one direction, 10^9 bytes/s (the alpha-beta model's 1/beta)."""
    latency_us: float
    """Per-message latency (the alpha-beta model's alpha), software stack included."""
    source: str
    overlap: float = 1.0
    """Share of an all-reduce that can hide behind the backward pass (1: DDP overlaps fully; a calibrated
    CPU host, where the all-reduce competes with compute for the same cores, measures less)."""
    ddp_overhead_us: float = 0.0
    """Per-step cost of data parallelism beyond the all-reduce (DDP's hooks and bucket copies, ranks waiting
    for each other); measured by `shipyard calibrate` with a tiny model in DDP, 0 for the catalog links."""
    compute_slowdown: float = 1.0
    """How much slower a worker computes while all its peers compute too (shared cores, caches and memory
    bandwidth, and the host's other processes taking a core from one rank, which the other then waits for);
    measured by `shipyard calibrate` with a larger model in DDP, 1 for the catalog links."""


def _interpolate(points: tuple[tuple[float, float], ...], x: float) -> float:
    """Log-log interpolation between measured points, flat beyond the ends."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
    return points[-1][1]


# Achieved fractions for the data-sheet GPUs. Large cuBLAS GEMMs reach 70-80 % of dense peak (NVIDIA, "Matrix
# Multiplication Background User's Guide", 2023); streaming kernels reach ~80-90 % of HBM bandwidth (Jia et al.,
# "Dissecting the NVIDIA Volta GPU Architecture via Microbenchmarking", 2018, Table 3.1). Eager PyTorch costs
# ~10 us of CPU per op (He, "Making Deep Learning Go Brrrr From First Principles", 2022): small ops are
# overhead-bound on any GPU.
_GPU = dict(kind="gpu", matmul_fraction=0.7, elementwise_fraction=0.8, op_overhead_us=10.0)

DEVICES: dict[str, Device] = {
    # NVIDIA A100 Tensor Core GPU data sheet (2021), SXM4 80 GB: FP32 19.5, TF32 156, BF16 312 TFLOPS dense;
    # HBM2e 2,039 GB/s.
    "a100": Device(
        "a100",
        peak_tflops={"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
        mem_bandwidth_gbps=2039.0,
        source="NVIDIA A100 data sheet (SXM4 80GB)",
        **_GPU,
    ),
    # NVIDIA H100 Tensor Core GPU data sheet (2023), SXM5: FP32 67, TF32 494.5, BF16 989.5 TFLOPS dense (the
    # sheet's 989/1,979 figures are with 2:4 sparsity); HBM3 3.35 TB/s.
    "h100": Device(
        "h100",
        peak_tflops={"fp32": 67.0, "tf32": 494.5, "bf16": 989.5},
        mem_bandwidth_gbps=3350.0,
        source="NVIDIA H100 data sheet (SXM5)",
        **_GPU,
    ),
    # NVIDIA H200 Tensor Core GPU data sheet (2024), SXM: the H100's compute with HBM3e at 4.8 TB/s.
    "h200": Device(
        "h200",
        peak_tflops={"fp32": 67.0, "tf32": 494.5, "bf16": 989.5},
        mem_bandwidth_gbps=4800.0,
        source="NVIDIA H200 data sheet (SXM)",
        **_GPU,
    ),
}

INTERCONNECTS: dict[str, Interconnect] = {
    # NVLink: per-GPU bandwidth one direction (the data sheets give both directions together: A100 600 GB/s,
    # H100/H200 900 GB/s); NCCL reaches ~80 % of it as bus bandwidth (PERFORMANCE.md of NVIDIA's nccl-tests
    # repository).
    # Latency per ring step: ~2 us, so that a small all-reduce over 8 GPUs (14 steps) lands in the tens of
    # microseconds NCCL's small-message all-reduces take on NVLink (order of magnitude; not measured here).
    "nvlink3": Interconnect("nvlink3", 300.0 * 0.8, 2.0, "A100 data sheet: NVLink 600 GB/s bidirectional"),
    "nvlink4": Interconnect("nvlink4", 450.0 * 0.8, 2.0, "H100 data sheet: NVLink 900 GB/s bidirectional"),
    # InfiniBand HDR 200 Gb/s and NDR 400 Gb/s, one NIC per GPU (DGX A100/H100 layout); ~90 % achievable.
    "ib-200": Interconnect("ib-200", 25.0 * 0.9, 10.0, "InfiniBand HDR 200 Gb/s per GPU"),
    "ib-400": Interconnect("ib-400", 50.0 * 0.9, 10.0, "InfiniBand NDR 400 Gb/s per GPU"),
    # Ethernet over TCP: ~80 % of line rate, tens of microseconds per message in the kernel's TCP stack.
    "eth-100": Interconnect("eth-100", 12.5 * 0.8, 30.0, "100 GbE, TCP"),
    "eth-25": Interconnect("eth-25", 3.125 * 0.8, 30.0, "25 GbE, TCP"),
    # PCIe 4.0 x16 between GPUs without NVLink: 32 GB/s per direction, ~80 % achievable.
    "pcie4": Interconnect("pcie4", 32.0 * 0.8, 10.0, "PCIe 4.0 x16"),
}

# What a GPU with the given name talks over inside one node, when --interconnect names only the network.
INTRA_NODE = {"a100": "nvlink3", "h100": "nvlink4", "h200": "nvlink4"}


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    try:
        return table[name.lower()]
    except KeyError:
        raise KeyError(f"unknown {what} '{name}'; known: {', '.join(table)}") from None


def get_device(name: str) -> Device:
    return _lookup(DEVICES, name, "hardware")


def get_interconnect(name: str) -> Interconnect:
    return _lookup(INTERCONNECTS, name, "interconnect")


@dataclass(frozen=True)
class Profile:
    """A calibrated machine: what `shipyard calibrate` writes and `shipyard plan` and the pipeline read."""

    device: Device
    interconnect: Interconnect
    host: str = ""
    measured_at: str = ""
    nodes: dict[str, Any] = field(default_factory=dict)
    """Per Ray node: its own device figures (a heterogeneous cluster is planned on its slowest node)."""

    def to_json(self) -> str:
        return json.dumps({"schema_version": SCHEMA_VERSION, **asdict(self)}, indent=1)


def _device(d: dict[str, Any]) -> Device:
    return Device(**{**d, "curves": {c: tuple(map(tuple, pts)) for c, pts in d.get("curves", {}).items()}})


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"no hardware profile at {p}: run `shipyard calibrate` to measure this machine "
            "(or plan on catalog hardware with --hardware h100)"
        )
    try:
        raw = json.loads(p.read_text())
        if raw.pop("schema_version", None) != SCHEMA_VERSION:
            raise ValueError(f"schema_version is not {SCHEMA_VERSION}")
        return Profile(
            _device(raw["device"]),
            Interconnect(**raw["interconnect"]),
            raw.get("host", ""),
            raw.get("measured_at", ""),
            raw.get("nodes", {}),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{p} is not a hardware profile Shipyard can read ({err}); run `shipyard calibrate` again to rewrite it"
        ) from err


def with_threads(device: Device, threads: int) -> Device:
    """A calibrated CPU used with another thread count: compute and bandwidth scale with threads, at best."""
    if device.kind != "cpu" or not device.threads or threads == device.threads:
        return device
    k = threads / device.threads
    return replace(
        device,
        threads=threads,
        curves={c: tuple((x, r * k) for x, r in pts) for c, pts in device.curves.items()},
        peak_tflops={d: v * k for d, v in device.peak_tflops.items()},
    )
