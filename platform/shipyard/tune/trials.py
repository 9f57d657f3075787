"""One trial of a search: the training function Tune runs, and what it may hold on the cluster.

A trial is one process running the same epoch loop as a Train worker (`tune_trial`), or, with
tune.workers_per_trial > 1, a small driver of a Ray Train job of N data-parallel workers (`tune_trial_ddp`).
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from shipyard.config import Config, apply_overrides
from shipyard.errors import ConfigError
from shipyard.tasks import make_task
from shipyard.train.checkpoints import CHECKPOINT_FILE
from shipyard.train.epoch import VAL_BATCH, HeldRows, fits_in_memory, make_optimizer, run_epoch
from shipyard.train.step import StepOptions
from shipyard.tune.schedules import EPOCHS

TRIAL_DRIVER_CPU = 0.01
"""A multi-worker trial is a small driver plus its Train workers, whose bundles are separate (Ray 2.60):
the driver takes this much of tune.cpus_per_trial so that the whole trial holds exactly cpus_per_trial."""


def worker_cpus(cfg: Config) -> float:
    """CPUs of each Train worker of a multi-worker trial: its share of cpus_per_trial, less the driver's."""
    return (cfg.tune.cpus_per_trial - TRIAL_DRIVER_CPU) / cfg.tune.workers_per_trial


def trials_at_once(cfg: Config, node_cpus: list[float]) -> int:
    """How many trials run side by side on these nodes; ConfigError when a trial can never start."""
    t = cfg.tune
    if t.workers_per_trial == 1:
        if t.cpus_per_trial > max(node_cpus, default=0):
            raise ConfigError(
                f"tune.cpus_per_trial={t.cpus_per_trial:g}, but the largest Ray node has "
                f"{max(node_cpus, default=0):g} CPUs: no trial can ever start. Lower "
                "tune.cpus_per_trial or add a bigger node"
            )
        fits = sum(int(c // t.cpus_per_trial) for c in node_cpus)
    else:  # a Train job: its workers may spread over nodes
        if t.cpus_per_trial <= TRIAL_DRIVER_CPU * 2:
            raise ConfigError(
                f"tune.cpus_per_trial={t.cpus_per_trial:g} is too small for {t.workers_per_trial} "
                "workers; give each trial at least 0.1 CPU per worker"
            )
        per_worker = worker_cpus(cfg)
        slots = sum(int(c // per_worker) for c in node_cpus)
        if slots < t.workers_per_trial or t.cpus_per_trial > sum(node_cpus):
            raise ConfigError(
                f"tune.workers_per_trial={t.workers_per_trial} workers of {per_worker:.3g} CPUs "
                f"(tune.cpus_per_trial={t.cpus_per_trial:g}) do not fit on this cluster's nodes "
                f"({', '.join(f'{c:g}' for c in node_cpus)} CPUs): no trial can ever start. "
                "Lower tune.workers_per_trial or tune.cpus_per_trial"
            )
        fits = max(1, int(sum(node_cpus) // t.cpus_per_trial))
    cap = t.num_samples if t.max_concurrent_trials == "auto" else t.max_concurrent_trials  # auto: as many as fit
    return min(fits, cap, t.num_samples)


def tune_trial(trial_config: dict[str, Any], base: dict[str, Any], train_ds, val_ds, info: dict[str, Any]) -> None:
    """One Tune trial: the same epoch loop as a Train worker, on one process, reporting to Tune.

    Each epoch saves a checkpoint, so PBT can clone a trial, HyperBand can pause one, and a restarted trial
    resumes where it stopped.
    """
    from ray import tune

    cfg = apply_overrides(base, trial_config, source="tune trial")
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_trial)))  # trials run side by side
    task = make_task(cfg.task, info)
    model = task.build_model(cfg.model)
    optimizer = make_optimizer(cfg, model)
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # PBT may have perturbed these since the checkpoint
            group["lr"], group["weight_decay"] = cfg.train.lr, cfg.train.weight_decay
        start = state["epoch"] + 1
    width = math.prod(task.info.input_shape)
    # read once and reshuffled every epoch when they fit (HeldRows), as in a Train worker
    train_rows = HeldRows(train_ds, cfg.train.batch_size, keep=fits_in_memory(train_ds.count(), width))
    val_rows = HeldRows(val_ds, VAL_BATCH, keep=fits_in_memory(val_ds.count(), width))
    for epoch in range(start, cfg.train.epochs):
        metrics = run_epoch(
            model,
            optimizer,
            train_rows.epoch(cfg.train.seed + epoch),
            val_rows.epoch(),
            task,
            options=StepOptions.of(cfg.train),
        )
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                Path(tmp) / CHECKPOINT_FILE,
            )
            tune.report(
                {**metrics, "epoch": epoch, EPOCHS: epoch + 1, "reported_at_s": time.time()},
                checkpoint=tune.Checkpoint.from_directory(tmp),
            )


def tune_trial_ddp(trial_config: dict[str, Any], base: dict[str, Any], train_ds, val_ds, info: dict[str, Any]) -> None:
    """A trial that is a Ray Train job of tune.workers_per_trial data-parallel workers; rank 0's reports reach
    Tune through TuneReportCallback, with the path of the job's checkpoint (`checkpoint_path`)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from shipyard.train.loop import make_trainer

    cfg = apply_overrides(base, trial_config, source="tune trial")
    ctx = tune.get_context()
    # the trial's folder in the search's storage (get_trial_dir() is a node-local staging copy): a resumed trial
    # finds its Train run there, and Train resumes a run of the same name and storage from its last checkpoint
    storage = Path(cfg.storage_dir) / ctx.get_experiment_name() / Path(ctx.get_trial_dir()).name
    trainer = make_trainer(
        cfg,
        {"train": train_ds, "val": val_ds},
        info,
        "train",
        storage_path=str(storage),
        num_workers=cfg.tune.workers_per_trial,
        cpus_per_worker=worker_cpus(cfg),
        callbacks=[TuneReportCallback()],
        quiet=True,
    )
    trainer.fit()
    _wait_for_last_report()


def _wait_for_last_report(timeout_s: float = 30.0) -> None:
    """TuneReportCallback hands rank 0's reports to the trial through a queue of one (a private Ray API, as is
    this read of it). If the trial function returned as soon as the Train run did, Tune would end the trial before
    it read the last report, and the trial's status came out one epoch short (seen on Ray 2.60). So stay until
    Tune, having read it, stops the trial (the `stop` rule at train.epochs, or the scheduler)."""
    from shipyard.private_apis import train_report_queue

    q = train_report_queue()
    deadline = time.time() + timeout_s
    while q is not None and not q.empty() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(max(0.0, min(10.0, deadline - time.time())))  # Tune stops the trial within this
