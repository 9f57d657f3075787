"""Validate the performance model: predicted vs measured step time through Ray Train, and Ray Train's overhead.

    python bench/perfmodel.py [--epochs 6] [--models mlp,cnn,transformer] [--batches 32,64,256] [--workers 1,2]

Calibrates this machine (shipyard.perf.calibration: Ray tasks and two gloo peers), then for each model x global
batch x worker count runs Shipyard's Ray Train path (TorchTrainer over Ray Data shards, DDP on gloo, a
checkpoint, an MLflow log and a report per epoch) on digits and compares the measured step time (the median
over the steps of each epoch after the first, then the median over those epochs) with the prediction
of shipyard.perf for the same model and per-worker batch.

The training overhead ratio: the CNN at the default global batch (64) on 1 worker; steady-state samples/s
through the Ray Train path (training rows / (epoch's training loop incl. waiting for batches + its checkpoint
and report), epochs after the first) over the samples/s of the same training step in a plain loop over
in-memory tensors in this process (1 torch thread, as the Ray worker with 1 CPU has).

Last line: one JSON object {"cases", "median_rel_err", "max_rel_err", "train_overhead_ratio", ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from shipyard import configure_process, load_config  # noqa: E402


def measure_case(cfg, splits, name: str, tracking_uri: str) -> dict:
    """Fit through Ray Train; per-epoch metrics come back through MLflow, as a pipeline logs them."""
    from mlflow import MlflowClient

    from shipyard.train.loop import make_trainer

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("perfmodel") or client.get_experiment(client.create_experiment("perfmodel"))
    run_id = client.create_run(exp.experiment_id, run_name=name).info.run_id
    trainer = make_trainer(
        cfg,
        {"train": splits.train, "val": splits.val},
        splits.info.to_dict(),
        f"perfmodel-{name}-{time.time_ns()}",
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        quiet=True,
    )
    trainer.fit()
    history = {
        k: [m.value for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
        for k in ("step_time_ms", "data_wait_ms", "train_time_s", "report_s", "steps")
    }
    client.set_terminated(run_id)
    steady = slice(1, None)  # the first epoch warms up (allocations, Ray Data's first blocks)
    rows_train = splits.rows["train"]
    # report_s of epoch e is the checkpoint + report after epoch e-1: pair each training loop with its report
    loops = history["train_time_s"][1:-1]
    reports = history["report_s"][2:]
    return {
        "step_time_ms": statistics.median(history["step_time_ms"][steady]),
        "data_wait_ms": statistics.median(history["data_wait_ms"][steady]),
        "steps_per_epoch": history["steps"][-1],
        "ray_samples_per_s": statistics.median(rows_train / (t + r) for t, r in zip(loops, reports)) if loops else None,
        "report_s": statistics.median(reports) if reports else None,
    }


def predict_case(cfg, splits, profile) -> dict:
    from shipyard.perf.estimate import estimate_step
    from shipyard.perf.layers import count_step_work
    from shipyard.tasks import make_task

    workers = cfg.scaling.max_workers
    per_worker = max(1, cfg.train.batch_size // workers)
    task = make_task(cfg.task, splits.info)
    work = count_step_work(
        lambda: task.build_model(cfg.model), per_worker, make_batch=task.example_batch, loss_fn=task.loss
    )
    est = estimate_step(work, profile.device, workers, profile.interconnect)
    return {"predicted_step_time_ms": est.step_time_ms, "predicted_comm_ms": est.exposed_comm_ms}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--models", default="mlp,cnn,transformer")
    p.add_argument("--batches", default="32,64,256", help="global batch sizes")
    p.add_argument("--workers", default="1,2")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="use this hardware profile instead of calibrating now (written by shipyard calibrate)",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("shipyard.perf.calibration").setLevel(logging.INFO)
    import ray

    from shipyard.cluster.attach import init_ray
    from shipyard.data.tables import to_numpy
    from shipyard.perf.calibration import calibrate
    from shipyard.perf.devices import load_profile
    from shipyard.tasks import make_task

    tmp = Path(tempfile.mkdtemp(prefix="shipyard-bench-perf-"))
    tracking_uri = f"sqlite:///{tmp}/mlflow.db"
    base = {
        "train.epochs": args.epochs,
        "tune.enabled": False,
        "serve.enabled": False,
        "storage_path": str(tmp / "results"),
        "tracking.uri": tracking_uri,
    }
    started = time.perf_counter()
    configure_process(fast_ingress=False)  # this script's start-up: Ray's settings, as a pipeline has them
    init_ray(None)
    cases = []
    try:
        profile = load_profile(args.profile) if args.profile else calibrate(tmp / "hardware.json")
        splits = make_task(load_config(None, base).task).load(load_config(None, base).data)
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; digits "
            f"({splits.rows['train']} training rows), {args.epochs} epochs per case; profile: "
            f"{profile.device.op_overhead_us} us/op, gloo {profile.interconnect.latency_us} us + bytes / "
            f"{profile.interconnect.bandwidth_gbps} GB/s"
        )
        print(
            f"{'model':12s} {'batch':>5s} {'workers':>7s} {'predicted_ms':>12s} {'measured_ms':>11s} "
            f"{'rel_err':>8s} {'data_wait_ms':>12s}"
        )
        for model in args.models.split(","):
            for batch in map(int, args.batches.split(",")):
                for workers in map(int, args.workers.split(",")):
                    cfg = load_config(
                        None, {**base, "model.name": model, "train.batch_size": batch, "scaling.num_workers": workers}
                    )
                    case = {
                        "model": model,
                        "batch": batch,
                        "workers": workers,
                        **predict_case(cfg, splits, profile),
                        **measure_case(cfg, splits, f"{model}-b{batch}-w{workers}", tracking_uri),
                    }
                    case["rel_err"] = (case["predicted_step_time_ms"] - case["step_time_ms"]) / case["step_time_ms"]
                    cases.append(case)
                    print(
                        f"{model:12s} {batch:5d} {workers:7d} {case['predicted_step_time_ms']:12.3f} "
                        f"{case['step_time_ms']:11.3f} {case['rel_err']:+8.1%} {case['data_wait_ms']:12.3f}",
                        flush=True,
                    )
        overhead_cfg = load_config(None, {**base, "model.name": "cnn", "scaling.num_workers": 1})
        ray_case = next(
            (
                c
                for c in cases
                if c["model"] == "cnn" and c["workers"] == 1 and c["batch"] == overhead_cfg.train.batch_size
            ),
            None,
        )
        if ray_case is None:
            ray_case = measure_case(overhead_cfg, splits, "cnn-overhead", tracking_uri)
        train_xy = to_numpy(splits.train)
    finally:
        ray.shutdown()
    plain = plain_loop_samples_per_s(overhead_cfg, train_xy, splits.info, args.epochs)
    ratio = ray_case["ray_samples_per_s"] / plain
    errs = [abs(c["rel_err"]) for c in cases]
    print(
        f"training overhead: CNN, global batch {overhead_cfg.train.batch_size}, 1 worker: Ray Train path "
        f"{ray_case['ray_samples_per_s']:.0f} samples/s (median per epoch: {ray_case['steps_per_epoch']} steps, "
        f"checkpoint + report {ray_case['report_s']:.3f} s), plain loop {plain:.0f} samples/s -> ratio {ratio:.3f}"
    )
    print(
        f"{len(cases)} cases in {time.perf_counter() - started:.0f} s: median |rel err| {statistics.median(errs):.1%}, "
        f"worst {max(errs):.1%}"
    )
    print(
        json.dumps(
            {
                "cases": len(cases),
                "median_rel_err": round(statistics.median(errs), 4),
                "max_rel_err": round(max(errs), 4),
                "train_overhead_ratio": round(ratio, 3),
                "per_case": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()} for c in cases],
            }
        )
    )


if __name__ == "__main__":
    main()
