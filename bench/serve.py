"""Serving throughput: Shipyard's endpoint against `mlflow models serve` and a bare uvicorn app, on 2 cores.

    .venv/bin/python bench/serve.py [--seconds 8] [--quick]

Two models are trained here on sklearn's digits (a few seconds each, plain torch) and registered with
`shipyard.track.runs.log_model` in an MLflow sqlite store in a temp folder: *tiny*, the digits MLP
64->128->128->10 (per-request overhead dominates), and *heavy*, a wide MLP of three hidden layers, 1024 wide
to start with and widened (1280, 1536, ...) until one instance costs >= 0.5 ms on one thread, so batching pays
(1536 on the 2-vCPU machine of BENCHMARKS.md). Each registered version is served in turn by

  (a) Shipyard (`shipyard.serve.endpoint.build_app`, fast ingress through HAProxy) with `@serve.batch` at its
      defaults (max_batch_size 32, batch_wait_timeout_s 0.002), one replica and, as a variant, two;
  (b) Shipyard with max_batch_size 1 (no batching), one replica;
  (c) `mlflow models serve --env-manager local -w 2` (MLflow's own scoring server; one torch thread per
      worker, uvicorn's access log off as in the others);
  (d) a bare uvicorn + FastAPI + torch app with 2 workers (bench/bare_app.py): the limit for a Python server.

Ray gets num_cpus=2 and every server shares the machine's two cores with the load generator: `wrk -t1` on
loopback, one digits row per request, at 1, 8 and 32 connections for --seconds each after a 2 s warm-up at 8.
wrk's own CPU (its rusage, as a child of this process) is reported per run as cores used, to show it is not
the bottleneck. Shipyard's best configuration for a model is the batching variant with the most requests/s at
32 connections; ratios at 32 connections are to (c) and (d). Then that configuration, on the tiny model, is
driven at half its maximum with 32 connections paced by wrk's Lua `delay()` (a random wait with an
exponential distribution before each request, its mean calibrated until the achieved rate is within 10 % of
the target) and its p99 latency reported. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(1, str(ROOT))  # tests.helpers: stop what our raylet started, by pid

from bench.serve_models import SHIPYARD_VARIANTS, build_models, deployed, local_serve  # noqa: E402
from bench.wrk import (  # noqa: E402
    CONCURRENCY,
    WrkResult,
    lua_script,
    machine,
    measure,
    run_wrk,
    server_process,
    wait_for_prediction,
)
from tests.helpers import free_port  # noqa: E402

VENV_BIN = Path(sys.executable).parent
HALF_MAX_TOLERANCE = 0.10  # achieved rate within 10 % of half the maximum
BATCHING = ("shipyard_batch", "shipyard_batch_2rep")
SERVERS = {  # JSON key -> what it is, in table order
    "shipyard_batch": "(a) Shipyard, batch",
    "shipyard_batch_2rep": "(a) same, 2 replicas",
    "shipyard_nobatch": "(b) Shipyard, no batch",
    "mlflow": "(c) mlflow serve -w 2",
    "bare": "(d) bare uvicorn -w 2",
}

log = logging.getLogger("bench.serve")


# -- the servers -------------------------------------------------------------------------------------------


def bench_shipyard(
    variant: str, model: dict, uri: str, port: int, tmp: Path, seconds: float, warmup_s: float
) -> dict[int, WrkResult]:
    """Deploy one Shipyard variant on the running Serve, measure it and delete it."""
    name = f"bench-{variant}"
    t0 = time.perf_counter()
    with deployed(name, variant, model, uri, port) as (url, body):
        print(f"  {variant}: deployed in {time.perf_counter() - t0:.1f} s", flush=True)
        return measure(variant, url, lua_script(tmp / f"{name}.lua", body), seconds, warmup_s)


def bench_mlflow(model: dict, uri: str, tmp: Path, seconds: float, warmup_s: float) -> dict[int, WrkResult]:
    port = free_port()
    cmd = [
        str(VENV_BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        model["uri"],
        "--env-manager",
        "local",
        "-w",
        "2",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    env = {
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        # one torch thread per worker and no access log, as in (a), (b) and (d)
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "UVICORN_ACCESS_LOG": "false",
    }
    log_path = tmp / "mlflow-serve.log"
    t0 = time.perf_counter()
    with server_process(cmd, env, log_path) as proc:
        url = f"http://127.0.0.1:{port}/invocations"
        payload = {"inputs": [model["row"]]}
        wait_for_prediction(
            url,
            payload,
            lambda a: max(range(10), key=a["predictions"][0].__getitem__),
            model["label"],
            120,
            proc,
            log_path,
        )
        print(f"  mlflow: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        return measure("mlflow", url, lua_script(tmp / "mlflow.lua", json.dumps(payload)), seconds, warmup_s)


def bench_bare(model: dict, uri: str, tmp: Path, seconds: float, warmup_s: float) -> dict[int, WrkResult]:
    port = free_port()
    cmd = [
        str(VENV_BIN / "uvicorn"),
        "bench.bare_app:app",
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {"MLFLOW_TRACKING_URI": uri, "BENCH_MODEL_URI": model["uri"]}
    log_path = tmp / "bare.log"
    t0 = time.perf_counter()
    with server_process(cmd, env, log_path) as proc:
        url = f"http://127.0.0.1:{port}/predict"
        payload = {"instances": [model["row"]]}
        wait_for_prediction(url, payload, lambda a: a["predictions"][0], model["label"], 120, proc, log_path)
        print(f"  bare: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        return measure("bare", url, lua_script(tmp / "bare.lua", json.dumps(payload)), seconds, warmup_s)


def bench_half_max(
    url: str,
    body: str,
    max_rps: float,
    tmp: Path,
    seconds: float,
    first_latency_ms: float,
    connections: int = 32,
    tries: int = 5,
) -> tuple[WrkResult, float]:
    """Drive `url` at about max_rps / 2 with `connections` paced connections; returns (result, mean delay
    ms)."""
    return bench_paced(
        url, body, max_rps / 2, tmp, seconds, first_latency_ms, "half max", HALF_MAX_TOLERANCE, connections, tries
    )


def bench_paced(
    url: str,
    body: str,
    target: float,
    tmp: Path,
    seconds: float,
    first_latency_ms: float,
    label: str,
    tolerance: float,
    connections: int = 32,
    tries: int = 5,
) -> tuple[WrkResult, float]:
    """Drive `url` at about `target` req/s with `connections` paced connections; returns the run closest to
    the target and its mean delay in ms.

    A connection's cycle is its request's latency plus the delay; the delay is re-fitted from each run's
    achieved rate (cycle = connections / rate), kept inside the bracket of delays already seen to give too
    much and too little, until the rate is within `tolerance` of the target.
    """
    cycle_ms = connections * 1000 / target
    delay = max(0.0, cycle_ms - first_latency_ms)
    low, high = 0.0, cycle_ms  # delays known to give a rate above / below the target
    best: tuple[WrkResult, float] | None = None
    for _ in range(tries):
        r = run_wrk(url, lua_script(tmp / "paced.lua", body, delay), connections, seconds)
        off = r.rps / target - 1
        print(
            f"  {label}: delay {delay:.2f} ms -> {r.rps:.1f} req/s (target {target:.1f}, {off:+.1%}), "
            f"p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, wrk {r.wrk_cores:.2f} cores"
            + (f", {r.errors} errors" if r.errors else ""),
            flush=True,
        )
        if best is None or abs(off) < abs(best[0].rps / target - 1):
            best = (r, delay)
        if abs(off) <= tolerance:
            break
        if off > 0:
            low = max(low, delay)
        else:
            high = min(high, delay)
        service_ms = connections * 1000 / r.rps - delay
        delay = cycle_ms - service_ms
        if not low < delay < high:
            delay = (low + high) / 2
    return best


# -- main --------------------------------------------------------------------------------------------------


def machine_line(seconds: float, warmup_s: float) -> str:
    return (
        f"{machine()}\nload: wrk -t1 -c{{{','.join(map(str, CONCURRENCY))}}} "
        f"-d{seconds:g}s --latency on loopback after a {warmup_s:g} s warm-up at c=8; one digits row per "
        "POST; servers and wrk share the 2 cores"
    )


def print_table(kind: str, results: dict[str, dict[int, WrkResult]]) -> None:
    print(f"\n{kind + ' model':<31}{'req/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} {'wrk cores':>10}")
    for server in (s for s in SERVERS if s in results):
        for c, r in results[server].items():
            print(
                f"  {SERVERS[server]:<22} c={c:<3} {r.rps:9.1f} {r.p50_ms:9.2f} {r.p99_ms:9.2f} "
                f"{r.errors:7d} {r.wrk_cores:10.2f}" + ("  FLAGGED" if r.errors else "")
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=None, help="duration of each wrk run (default 8; 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 s runs, no 2-replica variant")
    args = p.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    warmup_s = 1.0 if args.quick else 2.0
    variants = [v for v in SHIPYARD_VARIANTS if not (args.quick and v == "shipyard_batch_2rep")]
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks on a plain kill too
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="shipyard-bench-serve-"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    ok = False
    try:
        import mlflow

        mlflow.set_tracking_uri(uri)
        print(machine_line(seconds, warmup_s), flush=True)
        models = build_models(uri, args.quick)
        results: dict[str, dict[str, dict[int, WrkResult]]] = {"tiny": {}, "heavy": {}}

        # (c) and (d) first, before Ray's processes exist; then Ray and (a), (b)
        for kind, model in models.items():
            print(f"\n{kind}: {model['uri']}", flush=True)
            results[kind]["mlflow"] = bench_mlflow(model, uri, tmp, seconds, warmup_s)
            results[kind]["bare"] = bench_bare(model, uri, tmp, seconds, warmup_s)

        half, best = run_shipyard(models, variants, uri, tmp, seconds, warmup_s, results)
        ok = True
    finally:
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"(logs and store kept in {tmp})", file=sys.stderr)

    for kind in ("tiny", "heavy"):
        print_table(kind, results[kind])
    print("\nat c=32, ratio of requests/s to (c) mlflow and (d) bare:")
    ratios = {}
    for kind in ("tiny", "heavy"):
        ref_m, ref_b = results[kind]["mlflow"][32].rps, results[kind]["bare"][32].rps
        for server in (s for s in SERVERS if s in results[kind]):
            mark = "  <- best" if server == best[kind] else ""
            rps = results[kind][server][32].rps
            print(
                f"  {kind:<6} {SERVERS[server]:<22} {rps:9.1f} req/s  x{rps / ref_m:5.2f} vs mlflow  "
                f"x{rps / ref_b:5.2f} vs bare{mark}"
            )
        ratios[kind] = (results[kind][best[kind]][32].rps / ref_m, results[kind][best[kind]][32].rps / ref_b)
    half_result, half_delay = half
    half_target = results["tiny"][best["tiny"]][32].rps / 2
    half_ok = abs(half_result.rps / half_target - 1) <= HALF_MAX_TOLERANCE
    print(
        f"\nhalf max: {best['tiny']} on tiny at {half_result.rps:.1f} req/s (target {half_target:.1f}, "
        f"{'within' if half_ok else 'NOT within'} {HALF_MAX_TOLERANCE:.0%}), 32 connections waiting "
        f"{half_delay:.2f} ms on average between requests: "
        f"p50 {half_result.p50_ms:.2f} ms, p99 {half_result.p99_ms:.2f} ms"
    )
    flagged = [
        f"{kind}/{server}/c={c}"
        for kind in results
        for server, by_c in results[kind].items()
        for c, r in by_c.items()
        if r.errors
    ]
    wrk_max = max(r.wrk_cores for kind in results for by_c in results[kind].values() for r in by_c.values())
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"wrk used at most {wrk_max:.2f} cores in any run; runs with errors: "
        f"{', '.join(flagged) or 'none'}; "
        f"load average at the end {load}; total wall {time.perf_counter() - t_start:.0f} s"
    )
    print(
        json.dumps(
            {
                "tiny_ratio_vs_mlflow": round(ratios["tiny"][0], 2),
                "heavy_ratio_vs_mlflow": round(ratios["heavy"][0], 2),
                "tiny_ratio_vs_bare": round(ratios["tiny"][1], 2),
                "heavy_ratio_vs_bare": round(ratios["heavy"][1], 2),
                "p99_ms_at_half_max": round(half_result.p99_ms, 2),
                "half_max_rps": round(half_result.rps, 2),
                "half_max_target_rps": round(half_target, 2),
                "half_max_within_tolerance": half_ok,
                "rps": {
                    kind: {
                        server: {str(c): round(r.rps, 2) for c, r in results[kind][server].items()}
                        for server in SERVERS
                        if server in results[kind]
                    }
                    for kind in results
                },
                "best": best,
                "seconds": seconds,
                "wrk_max_cores": round(wrk_max, 2),
                "errors": flagged,
            }
        )
    )


def run_shipyard(
    models: dict, variants: list[str], uri: str, tmp: Path, seconds: float, warmup_s: float, results: dict
) -> tuple[tuple[WrkResult, float], dict[str, str]]:
    """(a) and (b) on one local Ray with fast ingress, started and stopped here (by pid, never `ray stop`)."""
    with local_serve() as (port, _):
        best = {}
        for kind, model in models.items():
            print(f"\n{kind}: Shipyard, {model['uri']}", flush=True)
            for variant in variants:
                results[kind][variant] = bench_shipyard(variant, model, uri, port, tmp, seconds, warmup_s)
            best[kind] = max((v for v in BATCHING if v in results[kind]), key=lambda v: results[kind][v][32].rps)
        # half max: redeploy tiny's best configuration and pace it at half its maximum
        tiny = models["tiny"]
        variant = best["tiny"]
        with deployed("bench-half", variant, tiny, uri, port) as (url, body):
            run_wrk(url, lua_script(tmp / "warm.lua", body), 8, warmup_s)
            print(f"\nhalf max ({variant} on tiny, 32 paced connections):", flush=True)
            half = bench_half_max(
                url, body, results["tiny"][variant][32].rps, tmp, seconds, results["tiny"][variant][8].p50_ms
            )
        return half, best


if __name__ == "__main__":
    main()
