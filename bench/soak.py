"""Soak: Shipyard's endpoint at 80 % of its measured maximum throughput for a minute, on 2 cores.

    .venv/bin/python bench/soak.py [--seconds 60] [--load 0.8]

The tiny digits MLP of bench/serve.py (64->128->128->10) is trained and registered with
`shipyard.track.runs.log_model` in an MLflow sqlite store in a temp folder, then served by Shipyard's endpoint
at its defaults (`shipyard.serve.endpoint.build_app` with only model and registry: one replica of 0.5 CPU,
`@serve.batch` 32 / 2 ms, fast ingress through HAProxy) on a local Ray with num_cpus=2 started here. wrk
(`-t1`, loopback, one digits row per POST) shares the two cores with it:

  1. warm-up, 2 s at 8 connections; then the maximum: --max-seconds at 32 connections, as fast as it answers;
  2. the rate: --load x that maximum, 32 connections paced by wrk's Lua `delay()` (bench/serve.py's
     `bench_paced`: exponential waits, mean re-fitted from short runs until within 5 % of the target);
  3. the soak: --seconds of that paced load as back-to-back 10 s wrk runs (new connections each), so the
     first and the last 10 s each have their own wrk latency histogram (p99 as wrk reports it); errors are
     non-2xx answers plus socket errors (connect, read, write, timeout at 10 s), summed over the runs;
  4. the replica's memory: the RSS of the replica process(es) (`ray::ServeReplica:bench-soak:...` among our
     raylet's workers), sampled after warm-up and calibration, just before the soak, then after each window;
     rss_growth = end / start - 1.

Fails (exit 1) on any error in the soak, on rss_growth >= 10 % or on a replica that was replaced meanwhile.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve import (  # noqa: E402  (bench/serve.py puts platform/ and the repo root on sys.path)
    WrkResult,
    bench_paced,
    build_models,
    deployed,
    local_serve,
    lua_script,
    machine,
    run_wrk,
)
from tests.helpers import ray_worker_pids  # noqa: E402

WINDOW_S = 10  # one wrk run per window: the first and the last are the spec's "first / last 10 s"
CONNECTIONS = 32
WARMUP_S = 2.0
CALIBRATE_TOLERANCE = 0.05  # paced rate within 5 % of the target before the soak starts
MAX_RSS_GROWTH = 0.10
SHARED_CORES = 0.2  # cores used by processes not ours (nor wrk) above which a window is flagged as shared
APP = "bench-soak"


def replica_pids(raylet: int | None, app: str) -> list[int]:
    """The replica processes of Serve app `app` among the workers our raylet started (Ray titles them
    `ray::ServeReplica:<app>:<deployment>`)."""
    pids = []
    for pid in ray_worker_pids(raylet) if raylet else []:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(f"ray::ServeReplica:{app}:"):
            pids.append(pid)
    return sorted(pids)


def rss_bytes(pids: list[int]) -> int:
    import psutil

    try:
        return sum(psutil.Process(pid).memory_info().rss for pid in pids)
    except psutil.NoSuchProcess as err:
        raise RuntimeError(
            f"replica process {err.pid} is gone (replaced by Serve?): its memory cannot be "
            "followed; see the Serve logs under the Ray session folder"
        ) from err


class CpuMeter:
    """Cores used over an interval: by the replica(s), and by every process on the machine that is neither
    this one nor a descendant (Ray, Serve, HAProxy, wrk): the second is the sign of a shared, busy machine.

    Our processes are sampled at both ends; one that exits in between, e.g. wrk, is counted through this
    process's RUSAGE_CHILDREN once reaped (a grandchild that exits early would count as not ours).
    """

    def __init__(self, replicas: list[int]):
        self.replicas = replicas
        self.start()

    @staticmethod
    def _sample() -> tuple[float, dict[int, float], float]:
        import psutil

        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq  # not idle, iowait or the hypervisor's steal
        ours = {}
        for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                c = proc.cpu_times()
                ours[proc.pid] = c.user + c.system
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return busy, ours, reaped.ru_utime + reaped.ru_stime

    def start(self) -> None:
        self.t0, (self.busy0, self.ours0, self.reaped0) = time.perf_counter(), self._sample()

    def stop(self) -> tuple[float, float]:
        """(replica cores, cores not ours) since start()."""
        busy, ours, reaped = self._sample()
        wall = time.perf_counter() - self.t0
        delta = {pid: cpu - self.ours0.get(pid, 0.0) for pid, cpu in ours.items()}
        replica = sum(delta.get(pid, 0.0) for pid in self.replicas)
        other = (busy - self.busy0) - sum(delta.values()) - (reaped - self.reaped0)
        return replica / wall, max(other, 0.0) / wall


def p99_line(label: str, r: WrkResult) -> str:
    return (
        f"{label}: {r.rps:8.1f} req/s  p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  {r.requests:6d} "
        f"requests  {r.non_2xx} non-2xx  {r.socket_errors} socket errors  wrk {r.wrk_cores:.2f} cores"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--seconds",
        type=int,
        default=60,
        help=f"soak duration, a multiple of {WINDOW_S} and at least {2 * WINDOW_S} (default 60)",
    )
    p.add_argument("--load", type=float, default=0.8, help="target rate as a fraction of the maximum (0.8)")
    p.add_argument("--max-seconds", type=int, default=8, help="the maximum-throughput run (default 8)")
    p.add_argument("--calibrate-seconds", type=int, default=5, help="each rate-fitting run (default 5)")
    args = p.parse_args()
    if args.seconds < 2 * WINDOW_S or args.seconds % WINDOW_S:
        p.error(
            f"--seconds {args.seconds}: give a multiple of {WINDOW_S} s, at least {2 * WINDOW_S} "
            f"(the first and the last {WINDOW_S} s are separate wrk runs)"
        )
    if not 0 < args.load <= 1:
        p.error(f"--load {args.load}: give a fraction of the maximum in (0, 1]")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks (wrk, Serve, Ray) too
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="shipyard-bench-soak-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    ok = False
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        print(machine(), flush=True)
        print(
            f"method: wrk -t1 on loopback, one digits row per POST, {CONNECTIONS} connections; maximum = "
            f"{args.max_seconds:g} s unpaced after a {WARMUP_S:g} s warm-up at c=8; soak = "
            f"{args.seconds} s at {args.load:.0%} of it, paced by wrk's Lua delay() (exponential waits), "
            f"as {args.seconds // WINDOW_S} back-to-back {WINDOW_S} s wrk runs, each with its own latency "
            "histogram; Serve, HAProxy and wrk share the 2 cores",
            flush=True,
        )
        tiny = build_models(uri, quick=False, kinds=("tiny",))["tiny"]
        result = soak(tiny, uri, tmp, args)
        ok = True
    finally:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"(logs and store kept in {tmp})", file=sys.stderr)
    failures = report(result, t_start)
    if failures:
        sys.exit(1)


def report(result: dict, t_start: float) -> list[str]:
    """Print the soak's summary, a verdict and, last, the JSON line; returns what failed."""
    windows, rss = result["windows"], result["rss"]
    requests = sum(r.requests for r in windows)
    errors = sum(r.errors for r in windows)
    soak_wrk_s = sum(r.requests / r.rps for r in windows if r.rps)
    achieved = requests / soak_wrk_s
    growth = rss[-1] / rss[0] - 1
    first, last = windows[0], windows[-1]
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"\nsoak: {requests} requests in {soak_wrk_s:.1f} s of load ({soak_wrk_s / result['wall_s']:.1%} "
        f"of the {result['wall_s']:.1f} s wall; the rest is starting wrk between windows), {achieved:.1f} "
        f"req/s against a target of {result['target']:.1f} ({achieved / result['target'] - 1:+.1%}; "
        f"maximum {result['max'].rps:.1f}); {errors} errors ({sum(r.non_2xx for r in windows)} non-2xx, "
        f"{sum(r.socket_errors for r in windows)} socket)"
    )
    print(
        f"p99: first {WINDOW_S} s {first.p99_ms:.2f} ms, last {WINDOW_S} s {last.p99_ms:.2f} ms "
        f"(x{last.p99_ms / first.p99_ms:.2f}); over all windows {min(r.p99_ms for r in windows):.2f}-"
        f"{max(r.p99_ms for r in windows):.2f} ms"
    )
    print(
        f"replica RSS ({len(result['pids'])} replica, pid {', '.join(map(str, result['pids']))}): "
        f"{rss[0] / 2**20:.1f} MiB before the soak -> {rss[-1] / 2**20:.1f} MiB after ({growth:+.2%}); "
        f"wrk used at most {max(r.wrk_cores for r in windows):.2f} cores; load average at the end {load}; "
        f"total wall {time.perf_counter() - t_start:.0f} s"
    )

    other = [o for _, o in result["cores"]]
    busy = [f"{i * WINDOW_S}-{(i + 1) * WINDOW_S} s ({o:.2f})" for i, o in enumerate(other) if o > SHARED_CORES]
    if busy:
        print(
            f"warning: other processes took more than {SHARED_CORES} of the 2 cores in window(s) "
            f"{', '.join(busy)}: the machine was shared, so latency and rate there are not the endpoint's "
            "alone"
        )
    if abs(achieved / result["target"] - 1) > 2 * CALIBRATE_TOLERANCE:
        # wrk is closed-loop: a slower endpoint (or a busier machine) lowers the rate it is offered
        print(
            f"warning: the soak ran {achieved / result['target'] - 1:+.1%} off its target rate (within "
            f"{CALIBRATE_TOLERANCE:.0%} when fitted): latency rose since, or something else took the cores"
        )
    failures = []
    if errors:
        failures.append(f"{errors} failed requests in the soak (want 0)")
    if growth >= MAX_RSS_GROWTH:
        failures.append(f"replica RSS grew {growth:.1%} (want < {MAX_RSS_GROWTH:.0%})")
    if result["replaced"]:
        failures.append(f"replica processes changed during the soak: {result['pids']} -> {result['pids_end']}")
    print(
        "FAILED: " + "; ".join(failures)
        if failures
        else f"passed: 0 errors, replica RSS growth {growth:.2%} < {MAX_RSS_GROWTH:.0%}"
    )
    print(
        json.dumps(
            {
                "requests": requests,
                "errors": errors,
                "p99_ms_first_10s": round(first.p99_ms, 2),
                "p99_ms_last_10s": round(last.p99_ms, 2),
                "rss_growth": round(growth, 4),
                "target_rps": round(result["target"], 1),
                "achieved_rps": round(achieved, 1),
                "max_rps": round(result["max"].rps, 1),
                "seconds": len(windows) * WINDOW_S,
                "replicas": len(result["pids"]),
                "rss_mib_start": round(rss[0] / 2**20, 1),
                "rss_mib_end": round(rss[-1] / 2**20, 1),
                "p99_ms_by_10s": [round(r.p99_ms, 2) for r in windows],
                "rps_by_10s": [round(r.rps, 1) for r in windows],
                "replica_cores_by_10s": [round(c, 2) for c, _ in result["cores"]],
                "other_cores_by_10s": [round(o, 2) for o in other],
            }
        )
    )
    return failures


def soak(model: dict, uri: str, tmp: Path, args: argparse.Namespace) -> dict:
    """Deploy the default endpoint on a local Ray, find its maximum, pace it at args.load of that for
    args.seconds; every process it starts is stopped by pid when it returns or fails."""
    from shipyard.config import EndpointConfig
    from shipyard.serve.ingress import wait_until_routed

    with local_serve() as (port, raylet), deployed(APP, "shipyard_batch", model, uri, port) as (url, body):
        wait_until_routed(url.rsplit("/", 1)[0])
        pids = replica_pids(raylet, APP)
        print(
            f"\nendpoint: {model['uri']} at {url}, Shipyard's defaults ({EndpointConfig().num_replicas} "
            f"replica(s) configured; replica pid(s) {pids})",
            flush=True,
        )
        if not pids:
            raise RuntimeError(f"no ray::ServeReplica:{APP}:* process among our raylet's ({raylet}) workers")
        script = lua_script(tmp / "max.lua", body)
        warm = run_wrk(url, script, 8, WARMUP_S)
        top = run_wrk(url, script, CONNECTIONS, args.max_seconds)
        print(p99_line(f"  maximum, c={CONNECTIONS} unpaced", top), flush=True)
        target = args.load * top.rps
        print(f"  target {args.load:.0%} of it: {target:.1f} req/s; fitting the pacing:", flush=True)
        _, delay_ms = bench_paced(
            url, body, target, tmp, args.calibrate_seconds, warm.p50_ms, "calibrate", CALIBRATE_TOLERANCE, CONNECTIONS
        )
        paced = lua_script(tmp / "soak.lua", body, delay_ms)

        print(f"\nsoak: {args.seconds} s at a mean delay of {delay_ms:.2f} ms per request per connection", flush=True)
        rss = [rss_bytes(pids)]
        windows: list[WrkResult] = []
        cores: list[tuple[float, float]] = []  # (replica, everything not ours) per window
        t0 = time.perf_counter()
        meter = CpuMeter(pids)
        for i in range(args.seconds // WINDOW_S):
            meter.start()
            r = run_wrk(url, paced, CONNECTIONS, WINDOW_S)
            cores.append(meter.stop())
            windows.append(r)
            rss.append(rss_bytes(pids))
            print(
                p99_line(f"  {i * WINDOW_S:3d}-{(i + 1) * WINDOW_S:3d} s", r)
                + f"  replica RSS {rss[-1] / 2**20:.1f} MiB, {cores[-1][0]:.2f} cores; not ours "
                f"{cores[-1][1]:.2f} cores",
                flush=True,
            )
        wall_s = time.perf_counter() - t0
        pids_end = replica_pids(raylet, APP)
    return {
        "windows": windows,
        "rss": rss,
        "cores": cores,
        "pids": pids,
        "pids_end": pids_end,
        "replaced": pids_end != pids,
        "target": target,
        "max": top,
        "wall_s": wall_s,
    }


if __name__ == "__main__":
    main()
