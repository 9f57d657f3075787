"""Validate the performance model: predicted vs measured step time through Ray Train, where the error lies,
and Ray Train's overhead per built-in model.

    python bench/perfmodel.py [--epochs 6] [--models mlp,cnn,transformer] [--batches 32,64,256] [--workers 1,2]
    python bench/perfmodel.py --models mlp,cnn,transformer,cnn@images,resnet@images   # image folders too

A model `name@images` is the image task's model on digits written as a folder of 8x8 grayscale PNGs
(pipelines/digit_images.py): the image_classification task, its real model and step; the others train on the
digits table.

Calibrates this machine (shipyard.perf.calibration: Ray tasks and two gloo peers), then for each model x global
batch x worker count runs Shipyard's Ray Train path (TorchTrainer over Ray Data shards, DDP on gloo, a
checkpoint, an MLflow log and a report per epoch) on digits and compares the measured step time (the median
over the steps of each epoch after the first, then the median over those epochs) with two predictions for the
same model and per-worker batch: the analytical plan (shipyard.perf) and the measured mode (shipyard.perf.measure:
each model's real step timed once in this process at 32 rows, every case scaled from it op by op; and its step
alone and in DDP on 2 local gloo processes at 32 and 128 rows, which prices the 2-worker cases).

Error attribution: each case's step is also timed in this process (1 thread, in-memory tensors, no Ray) phase by
phase (forward with the loss, backward, optimizer); the rest of the Ray step (exposed all-reduce, DDP's other
costs, what the Ray Train worker adds) is the Ray step minus that plain step. Each case names the part whose
prediction is furthest off.

The training overhead ratio, per built-in model: the model at the default global batch (64) on 1 worker;
steady-state samples/s through the Ray Train path (training rows / (epoch's training loop incl. waiting for
batches + its checkpoint and report), epochs after the first) over the samples/s of the same training step in a
plain loop over in-memory tensors in this process (1 torch thread, as the Ray worker with 1 CPU has), run right
after the Ray case; the JSON's `train_overhead_ratio` is the worst model's. `ddp_overhead_ratio`: the 2-worker
case at the default batch over plain `torchrun` DDP run right after it (bench/torchrun_ddp.py; Ray idles beside it).

Drift: a 2-vCPU VM's own speed moves by tens of percent over minutes, so every baseline is measured right beside
its case, and a reference (256x256 matmuls a second, 1 thread) is timed before each case: `machine_drift` in the
JSON is its relative range over the run, the floor under any error here.

Last line: one JSON object {"cases", "median_rel_err", "max_rel_err", "measured_median_rel_err",
"measured_max_rel_err", "train_overhead_ratio", "train_overhead_ratio_per_model", "cpu", ...}.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT))  # pipelines.digit_images

from bench.baselines import (  # noqa: E402
    attribute,
    plain_loop_samples_per_s,
    plain_phases_ms,
    reference_rate,
    torchrun_samples_per_s,
)
from shipyard import configure_process, load_config  # noqa: E402

IMAGES = {"task.name": "image_classification", "data.builtin": None, "data.image_size": 8, "data.channels": 1}
"""`name@images`: the image task on the digits written as PNGs (data.path is set once the folder is written)."""

MEASURED_BATCH = 32
"""The measured mode's one measurement per model, at a per-worker batch the cases use (64/2 and 32/1)."""


def model_overrides(spec: str, folder: Path) -> dict:
    """`mlp` -> the digits table; `cnn@images` -> the image task on the digits as a folder of PNGs."""
    name, _, data = spec.partition("@")
    if data not in ("", "images"):
        raise SystemExit(f"--models: {spec!r}: give a model name, or name@images for the image task")
    return {"model.name": name, **({**IMAGES, "data.path": str(folder)} if data else {})}


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


def predict_case(cfg, splits, profile, measured=None, parallel=None) -> dict:
    """The analytical plan's step and its parts; with `measured` (the model's MeasuredStep, and `parallel` its
    MeasuredDataParallel), the measured mode's step too."""
    from shipyard.perf.estimate import estimate_step
    from shipyard.perf.layers import count_step_work
    from shipyard.perf.measure import measured_estimate
    from shipyard.tasks import make_task

    workers = cfg.scaling.max_workers
    per_worker = max(1, cfg.train.batch_size // workers)
    task = make_task(cfg.task, splits.info)
    work = count_step_work(
        lambda: task.build_model(cfg.model), per_worker, make_batch=task.example_batch, loss_fn=task.loss
    )
    est = estimate_step(work, profile.device, workers, profile.interconnect)
    out = {
        "predicted_step_time_ms": est.step_time_ms,
        "predicted_comm_ms": est.exposed_comm_ms,
        "predicted_parts_ms": {
            "forward": est.forward_ms,
            "backward": est.backward_ms,
            "optimizer": est.optimizer_ms,
            "comm_and_overheads": est.exposed_comm_ms + est.ddp_overhead_ms,
        },
    }
    if measured is not None:
        m = measured_estimate(measured, work, profile.device, None, workers, profile.interconnect, parallel=parallel)
        out["measured_mode_step_time_ms"] = m.step_time_ms
    return out


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
    from shipyard.perf.measure import measure_data_parallel, measure_step
    from shipyard.perf.probes import cpu_model_name
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
        profile_path = args.profile or tmp / "hardware.json"
        profile = load_profile(profile_path) if args.profile else calibrate(profile_path)
        models = args.models.split(",")
        spec = {m: {**base, **model_overrides(m, tmp / "digit-images")} for m in models}
        if any("@images" in m for m in models):
            from pipelines.digit_images import write_digit_images

            write_digit_images(tmp / "digit-images")
        loaded: dict[str, object] = {}  # one load per data source: the table, the image folder

        def splits_of(m: str):
            key = m.partition("@")[2]
            if key not in loaded:
                c = load_config(None, spec[m])
                loaded[key] = make_task(c.task).load(c.data)
            return loaded[key]

        splits = splits_of(models[0])
        default_batch = {m: load_config(None, spec[m]).train.batch_size for m in models}
        print(
            f"machine: {cpu_model_name()}, {os.cpu_count()} CPUs; digits ({splits.rows['train']} training rows), "
            f"{args.epochs} epochs per case; profile: {profile.device.op_overhead_us} us/op, gloo "
            f"{profile.interconnect.latency_us} us + bytes / {profile.interconnect.bandwidth_gbps} GB/s; "
            f"calibration spread {profile.device.spread:.1%}; reference {reference_rate():.0f} matmuls/s"
        )
        measured, parallel = {}, {}
        for model in models:  # the measured mode: each model's real step here once, every case priced from it
            cfg = load_config(None, spec[model])
            task = make_task(cfg.task, splits_of(model).info)
            measured[model] = measure_step(
                lambda task=task, cfg=cfg: task.build_model(cfg.model), MEASURED_BATCH, task.example_batch, task.loss
            )
            parallel[model] = measure_data_parallel(
                lambda task=task, cfg=cfg: task.build_model(cfg.model), MEASURED_BATCH, task.example_batch, task.loss
            )
            m, dp = measured[model], parallel[model]
            print(
                f"measured mode, {model}: {m.step_ms:.3f} ms a step at {MEASURED_BATCH} rows here (last rounds "
                f"within {m.spread:.1%}), {m.matched}/{len(m.op_ms)} counted ops matched; on 2 local gloo peers, "
                f"alone / DDP: "
                + ", ".join(f"{b} rows {a:.3f} / {d:.3f} ms" for b, a, d in zip(dp.batches, dp.alone_ms, dp.ddp_ms))
                + f" -> DDP step = {dp.slowdown:.2f} x alone + {dp.fixed_ms:.3f} ms"
            )
        print(
            f"{'model':12s} {'batch':>5s} {'workers':>7s} {'predicted_ms':>12s} {'measured_ms':>11s} "
            f"{'rel_err':>8s} {'meas_mode_ms':>12s} {'rel_err':>8s} {'data_wait_ms':>12s}  error mostly in "
            "(reference matmuls/s before the case)"
        )
        for model in models:
            for batch in map(int, args.batches.split(",")):
                for workers in map(int, args.workers.split(",")):
                    cfg = load_config(None, {**spec[model], "train.batch_size": batch, "scaling.num_workers": workers})
                    splits = splits_of(model)
                    case = {
                        "model": model,
                        "batch": batch,
                        "workers": workers,
                        "machine_rate": reference_rate(),
                        **predict_case(cfg, splits, profile, measured[model], parallel[model]),
                        **measure_case(cfg, splits, f"{model}-b{batch}-w{workers}", tracking_uri),
                    }
                    case["rel_err"] = (case["predicted_step_time_ms"] - case["step_time_ms"]) / case["step_time_ms"]
                    case["measured_rel_err"] = (case["measured_mode_step_time_ms"] - case["step_time_ms"]) / case[
                        "step_time_ms"
                    ]
                    plain = plain_phases_ms(cfg, splits.info, max(1, batch // workers))
                    case["plain_parts_ms"] = plain
                    part, err_ms, case["part_errors_ms"] = attribute(case, plain)
                    if batch == default_batch[model]:  # a baseline right after its case: the machine drifts
                        if workers == 1:
                            case["plain_samples_per_s"] = plain_loop_samples_per_s(
                                cfg, to_numpy(splits.train), splits.info, args.epochs
                            )
                        elif workers == 2:
                            case["torchrun_samples_per_s"] = torchrun_samples_per_s(
                                model, batch // 2, splits.rows["train"], args.epochs
                            )
                    cases.append(case)
                    print(
                        f"{model:12s} {batch:5d} {workers:7d} {case['predicted_step_time_ms']:12.3f} "
                        f"{case['step_time_ms']:11.3f} {case['rel_err']:+8.1%} "
                        f"{case['measured_mode_step_time_ms']:12.3f} {case['measured_rel_err']:+8.1%} "
                        f"{case['data_wait_ms']:12.3f}  {part} {err_ms:+.3f} ms (machine {case['machine_rate']:.0f})",
                        flush=True,
                    )
        # Ray Train's overhead per built-in model: its 1-worker case at the default global batch against the plain
        # loop measured right after it (a model whose grid lacks that case gets both measured here, in a row)
        overhead_cfgs = {m: load_config(None, {**spec[m], "scaling.num_workers": 1}) for m in models}
        ray_cases = {}
        for m, ocfg in overhead_cfgs.items():
            ray_cases[m] = next(
                (c for c in cases if c["model"] == m and c["workers"] == 1 and c["batch"] == ocfg.train.batch_size),
                None,
            )
            if ray_cases[m] is None:
                ray_cases[m] = measure_case(ocfg, splits_of(m), f"{m}-overhead", tracking_uri)
                ray_cases[m]["plain_samples_per_s"] = plain_loop_samples_per_s(
                    ocfg, to_numpy(splits_of(m).train), splits_of(m).info, args.epochs
                )
    finally:
        ray.shutdown()
    ratios = {}
    for m, ocfg in overhead_cfgs.items():
        plain = ray_cases[m]["plain_samples_per_s"]
        ratios[m] = ray_cases[m]["ray_samples_per_s"] / plain
        print(
            f"training overhead, {m}: global batch {ocfg.train.batch_size}, 1 worker: Ray Train path "
            f"{ray_cases[m]['ray_samples_per_s']:.0f} samples/s (median per epoch: {ray_cases[m]['steps_per_epoch']} "
            f"steps, checkpoint + report {ray_cases[m]['report_s']:.3f} s), plain loop right after it {plain:.0f} "
            f"samples/s -> ratio {ratios[m]:.3f}"
        )
    # what the platform costs a data-parallel step: Shipyard's 2-worker case against plain torchrun DDP right after it
    ddp = {}
    for m, ocfg in overhead_cfgs.items():
        two = next(
            (c for c in cases if c["model"] == m and c["workers"] == 2 and c["batch"] == ocfg.train.batch_size), None
        )
        if two is None:
            continue
        plain_ddp = two["torchrun_samples_per_s"]
        ddp[m] = two["ray_samples_per_s"] / plain_ddp
        print(
            f"data-parallel overhead, {m}: global batch {ocfg.train.batch_size}, 2 workers: Shipyard "
            f"{two['ray_samples_per_s']:.0f} samples/s, torchrun DDP (gloo, in-memory tensors) right after it "
            f"{plain_ddp:.0f} samples/s -> ratio {ddp[m]:.3f}"
        )
    # scaling.num_workers=auto against measurement: the count the plan picks for each model at the default batch,
    # and whether its measured samples/s is within 10 % of the best count measured
    from shipyard.perf.plan import DataShape, make_plan

    auto = {}
    for m, ocfg in overhead_cfgs.items():
        measured_rates = {
            c["workers"]: c["ray_samples_per_s"]
            for c in cases
            if c["model"] == m and c["batch"] == ocfg.train.batch_size and c["ray_samples_per_s"]
        }
        if len(measured_rates) < 2:
            continue
        acfg = load_config(None, {**spec[m], "scaling.num_workers": "auto"})
        sp = splits_of(m)
        shape = DataShape(sum(sp.rows.values()), sp.in_features, sp.num_classes, sp.info)
        plan = make_plan(acfg, "local", profile=profile_path, shape=shape, rows=sp.rows)
        chose, best = plan.step.workers, max(measured_rates, key=measured_rates.get)
        within = chose in measured_rates and measured_rates[chose] >= 0.9 * measured_rates[best]
        auto[m] = {"chose": chose, "best_measured": best, "within_10pct": within}
        print(
            f"scaling.num_workers=auto, {m}: the plan picks {chose} worker(s); measured samples/s "
            + ", ".join(f"{w}: {r:.0f}" for w, r in sorted(measured_rates.items()))
            + f" -> {'within' if within else 'NOT within'} 10 % of the best ({best})"
        )
    from shipyard.perf.measure import relative_range

    errs = [abs(c["rel_err"]) for c in cases]
    drift = relative_range([c["machine_rate"] for c in cases])
    merrs = [abs(c["measured_rel_err"]) for c in cases]
    where = collections.Counter(max(c["part_errors_ms"], key=lambda k: abs(c["part_errors_ms"][k])) for c in cases)
    print(
        f"{len(cases)} cases in {time.perf_counter() - started:.0f} s: analytical median |rel err| "
        f"{statistics.median(errs):.1%}, worst {max(errs):.1%}; measured mode median {statistics.median(merrs):.1%}, "
        f"worst {max(merrs):.1%}; the largest error per case lies in: {dict(where.most_common())}; the machine's "
        f"own speed (reference matmuls/s before each case) moved {drift:.1%}"
    )
    print(
        json.dumps(
            {
                "cases": len(cases),
                "median_rel_err": round(statistics.median(errs), 4),
                "max_rel_err": round(max(errs), 4),
                "measured_median_rel_err": round(statistics.median(merrs), 4),
                "measured_max_rel_err": round(max(merrs), 4),
                "train_overhead_ratio": round(min(ratios.values()), 3),
                "train_overhead_ratio_per_model": {m: round(r, 3) for m, r in ratios.items()},
                "ddp_overhead_ratio": round(min(ddp.values()), 3) if ddp else None,
                "ddp_overhead_ratio_per_model": {m: round(r, 3) for m, r in ddp.items()},
                "auto_workers_within_10pct": all(a["within_10pct"] for a in auto.values()) if auto else None,
                "auto_workers": auto,
                "cpu": cpu_model_name(),
                "calibration_spread": profile.device.spread,
                "machine_drift": round(drift, 4),
                "per_case": [_rounded(c) for c in cases],
            }
        )
    )


def _rounded(v):
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return v


if __name__ == "__main__":
    main()
