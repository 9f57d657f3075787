"""Hyperparameter search: Ray Tune over the same epoch loop as training, ASHA by default.

    best_overrides, summary = search(cfg, splits, parent_run_id)

The search space uses the config's own dotted keys (`train.lr`), so a trial's config is
`apply_overrides(cfg, trial_config)` and its MLflow params carry the same names.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from shipyard.config import Config, apply_overrides
from shipyard.errors import ConfigError, TrainingError
from shipyard.models import build_model
from shipyard.train import iter_batches, make_optimizer, run_epoch

log = logging.getLogger(__name__)


def build_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """`{"train.lr": {"loguniform": [1e-4, 1e-2]}}` -> Tune's sampling objects. Raises ConfigError."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if len(spec) != 1:
            raise ConfigError(f"tune.space.{key}: give exactly one distribution, e.g. {{loguniform: [1e-4, 1e-2]}}")
        (dist, args), = spec.items()
        if dist in ("choice", "grid"):
            if not args:
                raise ConfigError(f"tune.space.{key}.{dist}: the list of values is empty")
            out[key] = tune.choice(args) if dist == "choice" else tune.grid_search(args)
            continue
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
            raise ConfigError(f"tune.space.{key}.{dist}: expected [low, high] numbers, got {args}")
        low, high = args
        if low >= high:
            raise ConfigError(f"tune.space.{key}.{dist}: low {low} must be below high {high}")
        if dist == "loguniform" and low <= 0:
            raise ConfigError(f"tune.space.{key}.loguniform: low must be > 0, got {low}")
        out[key] = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dist](low, high)
    return out


def check_space(cfg: Config) -> None:
    """Validate the space and every trial's config without Ray: a bad space fails before Ray starts."""
    build_space(cfg.tune.space)
    for key, spec in cfg.tune.space.items():
        (dist, args), = spec.items()
        for value in (args if dist in ("choice", "grid") else args[:1]):
            apply_overrides(cfg, {key: value}, source=f"tune.space.{key}")


def tune_trial(trial_config: dict[str, Any], base: dict[str, Any], train_ds, val_ds, in_features: int,
               num_classes: int) -> None:
    """One Tune trial: the same epoch loop as a Train worker, on one process, reporting to Tune."""
    from ray import tune

    cfg = apply_overrides(base, trial_config, source="tune trial")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only Ray Data blocks
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(1)  # trials run side by side, one CPU each
    model = build_model(cfg.model, in_features, num_classes)
    optimizer = make_optimizer(cfg, model)
    for epoch in range(cfg.train.epochs):
        metrics = run_epoch(model, optimizer, iter_batches(train_ds, cfg.train.batch_size, cfg.train.seed + epoch),
                            iter_batches(val_ds, 512))
        tune.report({**metrics, "epoch": epoch})


def _progress_callback(cfg: Config, total: int):
    """One line per finished trial instead of Tune's tables (RunConfig(verbose=0) silences those)."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, "done")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "errored")

        def _line(self, trial, status: str) -> None:
            TrialProgress.done += 1
            last = trial.last_result or {}
            epochs = last.get("training_iteration", 0)
            if status == "done" and epochs < cfg.train.epochs:
                status = f"stopped early by {cfg.tune.scheduler}"
            log.info("trial %d/%d %s: %s after %d/%d epochs, %s %.4f", TrialProgress.done, total, trial.trial_id,
                     status, epochs, cfg.train.epochs, cfg.tune.metric, last.get(cfg.tune.metric, float("nan")))

    return TrialProgress()


@dataclass
class SearchSummary:
    best_overrides: dict[str, Any]
    best_metric: float
    trials: int
    trial_status: dict[str, int]


def search(cfg: Config, splits, run_name: str, tracking_uri: str, parent_run_id: str) -> SearchSummary:
    """Run the configured search; every trial becomes a child MLflow run of `parent_run_id`."""
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    space = build_space(cfg.tune.space)
    scheduler = (ASHAScheduler(max_t=cfg.train.epochs, grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                               reduction_factor=cfg.tune.reduction_factor)
                 if cfg.tune.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_parameters(tune_trial, base=cfg.model_dump(mode="json"), train_ds=splits.train,
                                     val_ds=splits.val, in_features=splits.in_features,
                                     num_classes=splits.num_classes)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cfg.tune.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                    scheduler=scheduler,
                                    # the generator caps concurrency itself: Tune ignores max_concurrent_trials
                                    # next to a SearchGenerator (it warns and runs as many as fit)
                                    search_alg=BasicVariantGenerator(
                                        random_state=cfg.tune.seed, max_concurrent=cfg.tune.max_concurrent_trials),
                                    reuse_actors=True),  # trial start-up (process + torch import) dominates here
        run_config=tune.RunConfig(
            name=run_name, storage_path=str(cfg.storage_dir), verbose=0,
            callbacks=[_progress_callback(cfg, cfg.tune.num_samples),
                       MLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name=cfg.tracking.experiment,
                                            tags={"mlflow.parentRunId": parent_run_id, "shipyard.kind": "trial"},
                                            save_artifact=False)]),
    )
    results = tuner.fit()
    ok = [r for r in results if r.error is None and r.metrics and cfg.tune.metric in r.metrics]
    if not ok:
        errors = [str(r.error) for r in results if r.error is not None][:1]
        raise TrainingError(f"every trial of the search failed; first error: {errors[0] if errors else 'unknown'}."
                            f" Trial logs: {results.experiment_path}")
    best = results.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="last")
    status: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            key = "errored"
        elif r.metrics.get("training_iteration", 0) >= cfg.train.epochs:
            key = "completed"
        else:
            key = "stopped_early"
        status[key] = status.get(key, 0) + 1
    overrides = {k: best.config[k] for k in cfg.tune.space}
    return SearchSummary(overrides, float(best.metrics[cfg.tune.metric]), len(results), status)
