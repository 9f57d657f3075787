"""`shipyard calibrate`: measure every Ray node and the all-reduce between Ray workers; write the profile.

    profile = calibrate(".shipyard/hardware.json")      # after pipeline.init_ray(); ~20 s on 2 cores

Compute is measured by shipyard.perf.calibrate in a Ray task on each node, with the CPUs a Train worker gets
(threads = scaling.cpus_per_worker). The all-reduce is timed between two Ray actors joined in a gloo process
group, as Ray Train's CPU workers are, at sizes from 4 B to 16 MiB; a least-squares line through
(bytes, time) gives the alpha-beta interconnect (comm.ring_allreduce_s with N = 2: time = 2 alpha + bytes / bw).
"""
from __future__ import annotations

import logging
import socket
import statistics
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from shipyard.perf.devices import Interconnect, Profile

log = logging.getLogger(__name__)

ALLREDUCE_BYTES = tuple(4 * 4 ** k for k in range(0, 12))  # 4 B .. 16 MiB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_node(threads: int, budget_s: float) -> dict:
    import ray

    from shipyard.perf.calibrate import measure_device

    return {"node": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
            "device": asdict(measure_device(threads, budget_s))}


class _Peer:
    """One side of a gloo process group (Ray Train's CPU backend)."""

    def where(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def join(self, addr: str, port: int, rank: int, world: int) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))

    def time_allreduce(self, sizes: tuple[int, ...], calls: int) -> list[float]:
        """Median over 5 rounds of the mean time of `calls` all-reduces, per size. Both ranks run the same
        fixed number of calls: a collective whose count depended on a rank's own clock could hang."""
        import torch
        import torch.distributed as dist

        out = []
        for nbytes in sizes:
            t = torch.ones(max(1, nbytes // 4))
            for _ in range(3):
                dist.all_reduce(t)
            reps = []
            for _ in range(5):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(calls):
                    dist.all_reduce(t)
                reps.append((time.perf_counter() - start) / calls)
            out.append(statistics.median(reps))
        return out

    def leave(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


def measure_allreduce(threads: float = 1.0, calls: int = 20, spread: bool = False) -> Interconnect:
    """Fit alpha and bandwidth to gloo all-reduce times between two Ray actors (on two nodes when `spread`)."""
    import ray

    peer = ray.remote(num_cpus=threads)(_Peer).options(scheduling_strategy="SPREAD" if spread else "DEFAULT")
    peers = [peer.remote(), peer.remote()]
    try:
        addr, port = ray.get(peers[0].where.remote())
        ray.get([p.join.remote(addr, port, rank, 2) for rank, p in enumerate(peers)])
        times = ray.get([p.time_allreduce.remote(ALLREDUCE_BYTES, calls) for p in peers])[0]
        ray.get([p.leave.remote() for p in peers])
    finally:
        for p in peers:
            ray.kill(p)
    x = np.array([[1.0, b] for b in ALLREDUCE_BYTES])
    (intercept_s, s_per_byte), *_ = np.linalg.lstsq(x / np.array(times)[:, None], np.ones(len(times)), rcond=None)
    # ring all-reduce over N = 2: 2 alpha + 2 (N-1)/N bytes / bw = 2 alpha + bytes / bw
    latency_us = max(intercept_s, 1e-7) / 2 * 1e6
    bandwidth_gbps = 1 / max(s_per_byte, 1e-15) / 1e9
    log.info("gloo all-reduce between 2 Ray workers%s: %s", " on 2 nodes" if spread else "",
             ", ".join(f"{b} B {t * 1e6:.0f} us" for b, t in zip(ALLREDUCE_BYTES[::3], times[::3])))
    # overlap 0: on a CPU host the all-reduce runs on the cores the workers compute on; nothing hides
    return Interconnect("gloo" + ("-network" if spread else "-loopback"), round(bandwidth_gbps, 3),
                        round(latency_us, 2), f"measured by shipyard calibrate ({datetime.now(timezone.utc):%Y-%m-%d})",
                        overlap=0.0)


def calibrate(out: str | Path, threads: int = 1, budget_s: float = 0.15) -> Profile:
    """Measure every alive Ray node and the all-reduce between workers; write and return the profile."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from shipyard.perf.devices import _device

    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= threads]
    if not nodes:
        raise RuntimeError(f"no Ray node has {threads} CPUs free for calibration; lower --threads")
    task = ray.remote(num_cpus=threads)(_measure_node)
    started = time.perf_counter()
    results = ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                       .remote(threads, budget_s) for n in nodes])
    per_node = {r["ip"] + ":" + r["node"][:8]: r["device"] for r in results}
    slowest = min(results, key=lambda r: max(p[1] for p in r["device"]["curves"]["matmul"]))
    link = measure_allreduce(threads, spread=len({n["NodeManagerAddress"] for n in nodes}) > 1)
    device = _device(slowest["device"])
    profile = Profile(replace(device, name=f"cpu:{slowest['ip']}"), link, socket.gethostname(),
                      datetime.now(timezone.utc).isoformat(timespec="seconds"), per_node)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)  # never a half-written profile
    log.info("calibrated %d node(s) in %.1f s: matmul up to %.3f TFLOP/s, element-wise %.1f GB/s at 100 MB, %.2f us "
             "per op; gloo all-reduce %.1f us + bytes / %.2f GB/s -> %s", len(nodes), time.perf_counter() - started,
             device.peak_tflops["fp32"], device.mem_bandwidth_gbps, device.op_overhead_us, link.latency_us,
             link.bandwidth_gbps, path)
    return profile
