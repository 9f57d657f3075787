"""Communication: alpha-beta models of gradient all-reduce, and how much of it DDP hides behind backward.

A message of n bytes costs alpha + n * beta (Hockney 1994): alpha = the interconnect's latency_us,
1/beta = its bandwidth_gbps. Collective costs are from Thakur, Rabenseifner and Gropp, "Optimization of
Collective Communication Operations in MPICH" (IJHPCA 2005), as Paleo (Qi et al. 2017, Sec. 3.2) uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from shipyard.perf.devices import Interconnect

Algorithm = Literal["ring", "tree", "ps"]
ALGORITHMS = ("ring", "tree", "ps")

# torch.nn.parallel.DistributedDataParallel defaults: bucket_cap_mb=25 and a first bucket of 1 MiB
# (torch/distributed/constants.py: _DEFAULT_FIRST_BUCKET_BYTES), filled in reverse parameter order.
DDP_BUCKET_BYTES = 25 * 1024 * 1024
DDP_FIRST_BUCKET_BYTES = 1024 * 1024


def ring_allreduce_s(nbytes: float, workers: int, link: Interconnect) -> float:
    """Ring all-reduce: reduce-scatter then all-gather, 2(N-1) steps of nbytes/N each:
    2(N-1)/N * nbytes / bandwidth + 2(N-1) * latency (Thakur et al. 2005, Sec. 4.4)."""
    if workers <= 1:
        return 0.0
    n = workers
    return 2 * (n - 1) / n * nbytes / (link.bandwidth_gbps * 1e9) + 2 * (n - 1) * link.latency_us * 1e-6


def tree_allreduce_s(nbytes: float, workers: int, link: Interconnect) -> float:
    """Pipelined (double) binary-tree all-reduce: a reduce up and a broadcast down a tree of depth log2 N;
    pipelining makes the bandwidth term independent of depth: 2 log2(N) * latency + 2 * nbytes / bandwidth
    (Sanders, Speck and Traeff, Parallel Computing 2009; NCCL 2.4's trees)."""
    if workers <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(workers)) * link.latency_us * 1e-6 + 2 * nbytes / (link.bandwidth_gbps * 1e9)


def ps_allreduce_s(nbytes: float, workers: int, link: Interconnect) -> float:
    """One parameter server: every worker pushes its gradient and pulls the parameters through the server's
    link, which carries 2 N nbytes: 2 N * nbytes / bandwidth + 2 * latency (Paleo, Sec. 3.2)."""
    if workers <= 1:
        return 0.0
    return 2 * workers * nbytes / (link.bandwidth_gbps * 1e9) + 2 * link.latency_us * 1e-6


_COST = {"ring": ring_allreduce_s, "tree": tree_allreduce_s, "ps": ps_allreduce_s}


def allreduce_s(nbytes: float, workers: int, link: Interconnect, algorithm: Algorithm = "ring") -> float:
    if algorithm not in _COST:
        raise KeyError(f"unknown all-reduce algorithm '{algorithm}'; known: {', '.join(_COST)}")
    return _COST[algorithm](nbytes, workers, link)


def ddp_buckets(param_bytes: Sequence[int]) -> list[list[int]]:
    """Indices of parameters per DDP bucket, in the order DDP reduces them (reverse registration order:
    the last layers' gradients are ready first). As torch assigns them (compute_bucket_assignment_by_size in
    torch/csrc/distributed/c10d/reducer.cpp): a tensor joins the open bucket, which closes once it holds at
    least the cap (1 MiB for the first, 25 MiB after)."""
    buckets: list[list[int]] = [[]]
    filled, cap = 0, DDP_FIRST_BUCKET_BYTES
    for i in reversed(range(len(param_bytes))):
        buckets[-1].append(i)
        filled += param_bytes[i]
        if filled >= cap:
            buckets.append([])
            filled, cap = 0, DDP_BUCKET_BYTES
    return [b for b in buckets if b]


def exposed_comm_s(
    backward_s: float,
    ready_s: Sequence[float],
    param_bytes: Sequence[int],
    workers: int,
    link: Interconnect,
    algorithm: Algorithm = "ring",
) -> tuple[float, float]:
    """(total all-reduce time, the part not hidden behind the backward pass) for one step.

    `ready_s[i]`: when parameter i's gradient is ready, counted from the start of backward. Each bucket's
    all-reduce starts when its last gradient is ready and the previous bucket's has finished (DDP launches
    them in order on one communication stream); what runs past the end of backward is exposed. `link.overlap`
    scales the hidden part (1 on GPUs; measured on a CPU host whose cores also run the all-reduce).
    """
    if workers <= 1:
        return 0.0, 0.0
    clock, total = 0.0, 0.0
    for bucket in ddp_buckets(param_bytes):
        cost = allreduce_s(sum(param_bytes[i] for i in bucket), workers, link, algorithm)
        clock = max(clock, max(ready_s[i] for i in bucket)) + cost
        total += cost
    tail = max(0.0, clock - backward_s)
    hidden = total - tail
    return total, tail + hidden * (1 - link.overlap)
