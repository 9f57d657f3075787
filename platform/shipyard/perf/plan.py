"""`shipyard plan`: what a config will cost before anything runs, on this machine or on catalog hardware.

    plan = make_plan(load_config("pipelines/configs/digits.yaml"), hardware="h100", nodes=range(1, 9))
    print(format_plan(plan)); plot_scaling(plan, "plan.png")

Counts the configured model's work on the meta device (shipyard.perf.layers), prices it on a device and an
interconnect (shipyard.perf.devices: the calibrated profile of this machine, or a data sheet), and gives the
step and epoch time, a strong- and weak-scaling table, a worker count, and the search's wall time. No Ray.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.config import PROJECT_ROOT, Config
from shipyard.data.splits import DataInfo
from shipyard.errors import ConfigError
from shipyard.perf.devices import (
    INTRA_NODE,
    Device,
    Interconnect,
    get_device,
    get_interconnect,
    load_profile,
    with_threads,
)
from shipyard.perf.estimate import (
    ScalingRow,
    StepEstimate,
    choose_workers,
    estimate_step,
    forward_time_ms,
    recommend_workers,
    scaling_table,
    trials_to_fill,
)
from shipyard.perf.layers import StepWork, count_step_work
from shipyard.perf.search import expected_trial_epochs, search_wall_s
from shipyard.train.epoch import VAL_BATCH, fits_in_memory


@dataclass(frozen=True)
class DataShape:
    rows: int
    in_features: int
    num_classes: int
    info: Any = None
    """The data stage's DataInfo when the pipeline plans: the task builds its real model and example batch."""


def data_shape(cfg: Config) -> DataShape:
    """Rows, features and classes of the configured data, read from file metadata and the label column only."""
    if cfg.task.name == "image_classification":
        from shipyard.tasks import make_task

        task = make_task(cfg.task)
        root, classes, files = task.folder(cfg.data)  # counts files in the class folders: nothing is decoded
        c, side = cfg.data.channels, cfg.data.image_size
        return DataShape(
            len(files),
            c * side * side,
            len(classes),
            DataInfo(
                task=cfg.task.name,
                input_shape=[c, side, side],
                output_width=len(classes),
                target="class folder",
                classes=classes,
                preprocessing={"mean": [0.5] * c, "std": [0.25] * c},
            ),
        )
    if cfg.data.builtin == "digits":
        return DataShape(1797, 64, 10)  # sklearn.datasets.load_digits: 1,797 8x8 images, 10 classes
    import pyarrow.dataset as pads

    from shipyard.data.tables import _files, check_source

    if "://" in cfg.data.path:
        raise ConfigError(
            f"shipyard plan reads the data's shape from local files; data.path is {cfg.data.path}: "
            "copy a sample locally and plan with data.path=<local file> (the pipeline plans remote "
            "data itself, after its data stage)"
        )
    check_source(cfg.data)
    files = _files(Path(cfg.data.path).expanduser())  # only .csv/.parquet files, as the pipeline reads them
    fmt = "csv" if files[0].suffix == ".csv" else "parquet"
    path = Path(cfg.data.path)
    ds = pads.dataset([str(f) for f in files], format=fmt)
    names = ds.schema.names
    if cfg.data.label not in names:
        raise ConfigError(f"data.label: column '{cfg.data.label}' not in {path}; its columns: {', '.join(names)}")
    labels = ds.to_table(columns=[cfg.data.label]).column(0)
    return DataShape(len(labels), len(names) - 1, 1 if cfg.task.name == "regression" else len(labels.unique()))


@dataclass(frozen=True)
class Plan:
    hardware: str
    device: Device
    intra: Interconnect | None
    inter: Interconnect | None
    workers_per_node: int
    shape: DataShape
    rows_train: int
    rows_val: int
    step: StepEstimate
    """One step at the configured worker count (scaling.num_workers)."""
    link: Interconnect | None
    """What that step's all-reduce crosses."""
    epoch_s: float
    strong: list[ScalingRow]
    weak: list[ScalingRow]
    recommended: ScalingRow
    search_trial_epochs: float | None
    search_wall_s: float | None
    train_s: float
    param_count: int
    notes: tuple[str, ...] = ()
    measured: Any = None
    """The measured mode's MeasuredStep (shipyard.perf.measure) when the plan was made from one."""
    analytical_step: StepEstimate | None = None
    """With `measured`: the same step as the analytical model alone prices it."""


def planned_info(cfg: Config, shape: DataShape) -> DataInfo:
    """The data stage's DataInfo, or one made from the shape: enough for the task to build its model."""
    return shape.info or DataInfo(
        task=cfg.task.name,
        input_shape=[shape.in_features],
        output_width=shape.num_classes,
        target=cfg.data.label,
        feature_names=[f"x{i}" for i in range(shape.in_features)],
        classes=None if cfg.task.name == "regression" else list(range(shape.num_classes)),
        preprocessing={"target": {"mean": 0.0, "std": 1.0}} if cfg.task.name == "regression" else {},
    )


def _node_counts(spec: str) -> list[int]:
    """`4` or `1..8` -> node counts."""
    try:
        if ".." in spec:
            lo, hi = (int(x) for x in spec.split("..", 1))
            counts = list(range(lo, hi + 1))
        else:
            counts = [int(spec)]
    except ValueError:
        raise ConfigError(f"--nodes '{spec}': give a count (4) or a range (1..8)") from None
    if not counts:
        raise ConfigError(f"--nodes '{spec}': the range is empty; write it low..high, e.g. 1..8")
    if min(counts) < 1:
        raise ConfigError(f"--nodes '{spec}': node counts start at 1")
    return counts


def worker_counts(nodes: Sequence[int], per_node: int) -> list[int]:
    """1, 2, 4, ... up to one full node, then every node count's full complement."""
    counts = {1}
    n = 2
    while n < per_node:
        counts.add(n)
        n *= 2
    counts.update(k * per_node for k in nodes)
    return sorted(counts)


def make_plan(
    cfg: Config,
    hardware: str = "local",
    nodes: str = "1",
    gpus_per_node: int | None = None,
    interconnect: str | None = None,
    profile: str | Path | None = None,
    algorithm: str = "ring",
    dtype: str = "fp32",
    shape: DataShape | None = None,
    rows: dict[str, int] | None = None,
    fit_workers: int | None = None,
    cluster_cpus: float | None = None,
    measure: bool = False,
) -> Plan:
    """Price cfg's training and search on `hardware` (`local`: the calibrated profile; or a catalog name).

    `shape` and `rows` (train/val row counts): the pipeline passes what its data stage found; otherwise they
    come from the data's metadata and the configured split fractions. `fit_workers`, `cluster_cpus`: the most
    workers, and the CPUs, that `auto` worker and trial counts must fit (default: the priced nodes). `measure`:
    run the model's real step here first and price every configuration from it (shipyard.perf.measure)."""
    from shipyard.tasks import make_task
    from shipyard.train.step import StepOptions

    notes: list[str] = []
    node_counts = _node_counts(nodes)
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node {gpus_per_node}: give at least 1")
    threads = max(1, int(cfg.scaling.cpus_per_worker))
    if hardware == "local" or measure:  # the measured mode scales what it measures here by this profile
        prof = load_profile(profile or default_profile_path(cfg))
        here = with_threads(prof.device, threads)
    if hardware == "local":
        device = here
        intra = inter = prof.interconnect
        per_node = gpus_per_node or max(1, _local_cpus() // threads)  # CPU workers that fit on one node
        notes.append(f"local profile from {prof.measured_at} ({prof.device.source})")
    else:
        device = get_device(hardware)
        per_node = gpus_per_node or 8
        intra = get_interconnect(INTRA_NODE.get(device.name, "pcie4"))
        inter = get_interconnect(interconnect or "ib-200")
        if interconnect is None and max(node_counts) > 1:
            notes.append("between nodes: ib-200 (InfiniBand HDR, one NIC per GPU); pick another with --interconnect")
    shape = shape or data_shape(cfg)
    # the task's own model (its encoder and decoder included), batch and loss: the step the workers run
    task = make_task(cfg.task, planned_info(cfg, shape))
    options = StepOptions.of(cfg.train)
    if options.precision == "bf16-mixed" and dtype == "fp32":
        if hardware == "local":
            notes.append("train.precision=bf16-mixed priced as fp32: a CPU profile has fp32 rates only")
        else:
            dtype = "bf16"
    rows_train = rows["train"] if rows else round(shape.rows * (1 - cfg.data.val_fraction - cfg.data.test_fraction))
    rows_val = rows["val"] if rows else round(shape.rows * cfg.data.val_fraction)
    foreach = device.kind == "gpu"  # AdamW's default: multi-tensor on CUDA, per-tensor on CPU

    @functools.cache
    def work(batch: int) -> StepWork:
        return count_step_work(
            lambda: task.build_model(cfg.model),
            batch,
            foreach=foreach,
            make_batch=task.example_batch,
            loss_fn=task.loss,
            options=options,
        )

    measured = parallel = None
    if measure:
        from shipyard.perf.measure import measure_data_parallel, measure_step

        measured_batch = max(1, cfg.train.batch_size // (cfg.scaling.max_workers or 1))
        measured = measure_step(
            lambda: task.build_model(cfg.model), measured_batch, task.example_batch, task.loss, options, threads
        )
        notes.append(
            f"measured mode: the real step ran here at {measured_batch} rows with {threads} thread(s): "
            f"{measured.step_ms:.3f} ms (last rounds within {measured.spread:.0%}); {measured.matched} of "
            f"{len(measured.op_ms)} counted ops matched; every other configuration scales it op by op"
        )
        # this model's own DDP cost on two local peers, where 2 workers of the run would share one node: a run that
        # may use more than one worker, packed, on a profile of one node (a cluster's link is its network's)
        one_node = hardware == "local" and per_node >= 2 and len(prof.nodes) <= 1
        if one_node and cfg.scaling.placement_strategy == "PACK" and (cfg.scaling.max_workers or per_node) > 1:
            per_worker = max(1, cfg.train.batch_size // 2)  # what each of 2 workers gets
            try:
                parallel = measure_data_parallel(
                    lambda: task.build_model(cfg.model), per_worker, task.example_batch, task.loss, options, threads
                )
            except RuntimeError as err:  # the plan is advice: 2 workers keep the analytical price
                notes.append(f"measured mode: 2 workers priced analytically ({err})")
            else:
                notes.append(
                    f"measured mode: its DDP step on 2 local gloo peers = {parallel.slowdown:.2f} x its step alone "
                    f"+ {parallel.fixed_ms:.3f} ms (measured at {parallel.batches[0]} and {parallel.batches[1]} rows "
                    "a worker); 2 workers on this node are priced from it"
                )

    def price(w: StepWork, dev: Device, n: int, lk: Interconnect | None, alg=algorithm, dt=dtype) -> StepEstimate:
        if measured is None:
            return estimate_step(w, dev, n, lk, alg, dt)
        from shipyard.perf.measure import measured_estimate

        return measured_estimate(measured, w, here, dev, n, lk, alg, dt, parallel=parallel)

    @functools.cache
    def eval_s(n: int) -> float:
        """Validation on each of n workers, forward only, in batches of VAL_BATCH: a split held in memory is
        shared, each worker evaluating its 1/n of it (train.epoch.HeldRows); a larger one every worker streams
        whole; fewer rows than workers are not shared."""
        if rows_val <= 0:
            return 0.0
        shared = n > 1 and rows_val >= n and fits_in_memory(rows_val, shape.in_features)
        share = math.ceil(rows_val / n) if shared else rows_val
        eval_work = count_step_work(
            lambda: task.build_model(cfg.model),
            min(VAL_BATCH, share),
            make_batch=task.example_batch,
            forward_only=True,
        )
        return math.ceil(share / VAL_BATCH) * forward_time_ms(eval_work, device, dtype) / 1e3

    def placement(n: int) -> tuple[int, Interconnect | None]:
        used = math.ceil(n / per_node)
        return used, (intra if used == 1 else inter)

    counts = worker_counts(node_counts, per_node)
    gb = cfg.train.batch_size
    strong_counts = [n for n in counts if n <= gb]  # past N = global batch a worker would get no rows
    if len(strong_counts) < len(counts):
        notes.append(f"strong scaling stops at {strong_counts[-1]} workers: the global batch is {gb} rows")
    strong = scaling_table(work, device, strong_counts, placement, gb, rows_train, False, algorithm, dtype, price)
    weak = scaling_table(work, device, counts, placement, gb, rows_train, True, algorithm, dtype, price)
    if any(r.batch_per_worker * r.workers < gb for r in strong):
        notes.append(
            f"strong scaling gives each of N workers {gb} // N rows, as training does: the global batch "
            f"becomes ({gb} // N) x N where N does not divide {gb}"
        )
    fit_workers = fit_workers or per_node * max(node_counts)
    fit_cpus = cluster_cpus if cluster_cpus is not None else fit_workers * cfg.scaling.cpus_per_worker
    n = cfg.scaling.max_workers  # elastic: priced at its full size
    if n is None:  # scaling.num_workers: auto
        chosen = choose_workers(strong, fit_workers)
        n = chosen.workers
        notes.append(
            f"scaling.num_workers=auto: {n} worker(s), the most whose predicted efficiency stays >= 70 % and that "
            f"fit ({fit_workers} fit): {chosen.efficiency:.0%} efficient, {chosen.samples_per_s:.0f} samples/s"
        )
    _, link = placement(n)
    if hardware == "local" and max(node_counts) > 1 and len(prof.nodes) <= 1:
        notes.append(
            f"more than one node priced with {inter.name}, measured on one host: run shipyard calibrate "
            "on the cluster to measure the network between nodes"
        )
    step = price(work(max(1, gb // n)), device, n, link)
    steps = math.ceil(rows_train / (max(1, gb // n) * n))
    epoch_s = steps * step.step_time_ms / 1e3 + eval_s(n)
    trial_epochs = wall = None
    if cfg.tune.enabled and cfg.tune.space:
        t = cfg.tune
        w = t.workers_per_trial
        trial_step = price(work(max(1, gb // w)), device, w, placement(w)[1])
        trial_epoch_s = math.ceil(rows_train / (max(1, gb // w) * w)) * trial_step.step_time_ms / 1e3 + eval_s(w)
        trial_epochs = expected_trial_epochs(
            t.scheduler, t.num_samples, cfg.train.epochs, t.grace_period, t.reduction_factor
        )
        at_once = t.max_concurrent_trials
        if at_once == "auto":
            at_once = trials_to_fill(fit_cpus, t.cpus_per_trial, t.num_samples)
        wall = search_wall_s(trial_epochs, t.num_samples, trial_epoch_s, at_once)
    return Plan(
        hardware,
        device,
        intra,
        inter,
        per_node,
        shape,
        rows_train,
        rows_val,
        step,
        link,
        epoch_s,
        strong,
        weak,
        recommend_workers(strong),
        trial_epochs,
        wall,
        epoch_s * cfg.train.epochs,
        work(1).param_bytes // 4,
        tuple(notes),
        measured,
        estimate_step(work(max(1, gb // n)), device, n, link, algorithm, dtype) if measured is not None else None,
    )


def _local_cpus() -> int:
    import os

    return os.cpu_count() or 1


def default_profile_path(cfg: Config | None = None) -> Path:
    """Where `shipyard calibrate` writes and plan and the pipeline read: plan.profile, under the project."""
    p = Path(cfg.plan.profile if cfg is not None else ".shipyard/hardware.json")
    return p if p.is_absolute() else PROJECT_ROOT / p
