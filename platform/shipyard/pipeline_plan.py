"""The plan stage as the driver runs it: the performance model's prediction for the run, and the numbers that
`auto` worker and trial counts become."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shipyard.config import Config, apply_overrides
from shipyard.data.splits import Splits
from shipyard.errors import ConfigError

if TYPE_CHECKING:
    from shipyard.perf.plan import Plan

log = logging.getLogger("shipyard.pipeline")  # the driver's lines, under one logger


def cluster_fit(cfg: Config) -> tuple[int, float]:
    """(the most Train workers that fit the cluster, its CPUs): what `auto` counts must fit."""
    import ray

    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 1))
    if cfg.scaling.use_gpu:
        return max(1, int(resources.get("GPU", 0))), cpus
    return max(1, int(cpus // cfg.scaling.cpus_per_worker)), cpus


def auto_choices(cfg: Config, plan: Plan | None, fit_workers: int, cpus: float) -> dict[str, int]:
    """What `scaling.num_workers: auto` and `tune.max_concurrent_trials: auto` become: the plan's worker count
    (the most workers whose predicted efficiency stays >= 70 % and that fit: make_plan chose it), and as many
    trials at once as fit the cluster's CPUs."""
    from shipyard.perf.estimate import trials_to_fill

    changes: dict[str, int] = {}
    if cfg.scaling.num_workers == "auto":
        if plan is None:
            raise ConfigError(
                "scaling.num_workers=auto chooses from the plan, and there is none for this run (see the plan "
                "line above); give a number instead, e.g. scaling.num_workers=2"
            )
        changes["scaling.num_workers"] = min(plan.step.workers, fit_workers)
    if cfg.tune.max_concurrent_trials == "auto":
        changes["tune.max_concurrent_trials"] = trials_to_fill(cpus, cfg.tune.cpus_per_trial, cfg.tune.num_samples)
    return changes


def resolve_auto(cfg: Config, plan: Plan | None) -> tuple[Config, str | None]:
    """`auto` counts made numbers (auto_choices), printed and logged as params `auto.*`; returns the config and,
    for the train stage, what the worker choice was."""
    import mlflow

    if cfg.scaling.num_workers != "auto" and cfg.tune.max_concurrent_trials != "auto":
        return cfg, None
    fit_workers, cpus = cluster_fit(cfg)
    changes = auto_choices(cfg, plan, fit_workers, cpus)
    note = None
    if "scaling.num_workers" in changes:
        note = f"scaling.num_workers=auto chose {changes['scaling.num_workers']} worker(s)"
        log.info(
            "%s: the most whose predicted efficiency stays >= 70 %% and that fit this cluster (%d fit); "
            "predicted step %.2f ms, epoch %.2f s",
            note,
            fit_workers,
            plan.step.step_time_ms,
            plan.epoch_s,
        )
    if "tune.max_concurrent_trials" in changes:
        log.info(
            "tune.max_concurrent_trials=auto chose %d trial(s) at once: %g CPUs / %g per trial, at most %d trials",
            changes["tune.max_concurrent_trials"],
            cpus,
            cfg.tune.cpus_per_trial,
            cfg.tune.num_samples,
        )
    mlflow.log_params({f"auto.{k}": v for k, v in changes.items()})
    return apply_overrides(cfg, changes, source="auto"), note


def predict(cfg: Config, splits: Splits) -> Plan | None:
    """The performance model's plan for cfg on the data found, or None where it cannot price the run."""
    from shipyard.perf.plan import DataShape, default_profile_path, make_plan

    if cfg.scaling.use_gpu and cfg.plan.hardware == "local":
        log.info("plan: skipped: plan.hardware=local prices CPUs; set plan.hardware=h100 (a100, h200) for GPU workers")
        return None
    path = default_profile_path(cfg)
    try:
        if cfg.plan.hardware == "local" and not path.is_file():
            from shipyard.perf.calibration import calibrate

            log.info("plan: no hardware profile at %s yet: measuring this machine first (shipyard calibrate)", path)
            calibrate(path, threads=max(1, int(cfg.scaling.cpus_per_worker)))
        shape = DataShape(sum(splits.rows.values()), splits.in_features, splits.num_classes, splits.info)
        fit_workers, cpus = cluster_fit(cfg)
        return make_plan(
            cfg,
            cfg.plan.hardware,
            profile=path,
            shape=shape,
            rows=splits.rows,
            fit_workers=fit_workers,
            cluster_cpus=cpus,
            measure=cfg.plan.measure and cfg.plan.hardware == "local",
        )
    except Exception as err:  # a prediction is advice: training goes on without one
        log.warning(
            "plan: no prediction for this run (%s: %s); run `shipyard calibrate` to write %s, or set "
            "plan.enabled=false",
            type(err).__name__,
            err,
            path,
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        return None
