"""Hyperparameter search: Ray Tune over the same epoch loop as training, ASHA by default.

    best_overrides, summary = search(cfg, splits, parent_run_id)

The search space uses the config's own dotted keys (`train.lr`), so a trial's config is
`apply_overrides(cfg, trial_config)` and its MLflow params carry the same names.
"""
from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shipyard.config import Config, apply_overrides
from shipyard.errors import ConfigError, TrainingError
from shipyard.models import build_model
from shipyard.train import CHECKPOINT_FILE, iter_batches, make_optimizer, run_epoch

log = logging.getLogger(__name__)


def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """Epochs at which ASHA compares a trial with its peers: grace * rf^k below max_t.

    Source: Li et al., "A System for Massively Parallel Hyperparameter Tuning" (MLSys 2020), Alg. 1;
    Ray's ASHAScheduler builds the same milestones (ray/tune/schedulers/async_hyperband.py, _Bracket).
    """
    rungs, t = [], float(grace_period)
    while t < max_t:
        rungs.append(int(t))
        t *= reduction_factor
    return rungs


def rung_counts(epochs_run: list[int], rungs: list[int], max_t: int) -> dict[int, int]:
    """How many trials reached each rung (and max_t) given the epochs each trial ran."""
    return {r: sum(e >= r for e in epochs_run) for r in [*rungs, max_t]}


def trial_status(epochs_run: int, errored: bool, rungs: list[int], max_t: int) -> str:
    """`completed`, `errored`, or `stopped at rung r (epoch e)` for one trial."""
    if errored:
        return "errored"
    if epochs_run >= max_t:
        return "completed"
    reached = [i for i, r in enumerate(rungs) if epochs_run >= r]
    return f"stopped at rung {reached[-1] + 1} (epoch {epochs_run})" if reached else f"stopped at epoch {epochs_run}"


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
    grids = [k for k, spec in cfg.tune.space.items() if "grid" in spec]
    if grids and (cfg.tune.search == "optuna" or cfg.tune.scheduler == "pbt"):
        what = "tune.search=optuna" if cfg.tune.search == "optuna" else "tune.scheduler=pbt"
        raise ConfigError(f"tune.space.{grids[0]}: grid is not supported with {what}; use choice instead")
    for key, spec in cfg.tune.space.items():
        (dist, args), = spec.items()
        for value in (args if dist in ("choice", "grid") else args[:1]):
            apply_overrides(cfg, {key: value}, source=f"tune.space.{key}")


def tune_trial(trial_config: dict[str, Any], base: dict[str, Any], train_ds, val_ds, in_features: int,
               num_classes: int) -> None:
    """One Tune trial: the same epoch loop as a Train worker, on one process, reporting to Tune.

    Each epoch saves a checkpoint, so PBT can clone a trial, HyperBand can pause one, and a restarted trial
    resumes where it stopped.
    """
    from ray import tune

    cfg = apply_overrides(base, trial_config, source="tune trial")
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only Ray Data blocks
    torch.manual_seed(cfg.train.seed)
    torch.set_num_threads(1)  # trials run side by side, one CPU each
    model = build_model(cfg.model, in_features, num_classes)
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
    for epoch in range(start, cfg.train.epochs):
        metrics = run_epoch(model, optimizer, iter_batches(train_ds, cfg.train.batch_size, cfg.train.seed + epoch),
                            iter_batches(val_ds, 512))
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                       Path(tmp) / CHECKPOINT_FILE)
            tune.report({**metrics, "epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(tmp))


def _progress_callback(cfg: Config, total: int, rungs: list[int]):
    """One line per finished trial instead of Tune's tables (RunConfig(verbose=0) silences those)."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, errored=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, errored=True)

        def _line(self, trial, errored: bool) -> None:
            self.done += 1
            last = trial.last_result or {}
            status = trial_status(last.get("training_iteration", 0), errored, rungs, cfg.train.epochs)
            log.info("trial %d/%d %s: %s, %s %.4f", self.done, total, trial.trial_id, status, cfg.tune.metric,
                     last.get(cfg.tune.metric, float("nan")))

    return TrialProgress()


@dataclass
class SearchSummary:
    best_overrides: dict[str, Any]
    best_metric: float
    trials: int
    trial_status: dict[str, int]


def _scheduler(cfg: Config, space: dict[str, Any]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    t = cfg.tune
    if t.scheduler == "asha":
        return ASHAScheduler(max_t=cfg.train.epochs, grace_period=min(t.grace_period, cfg.train.epochs),
                             reduction_factor=t.reduction_factor)
    if t.scheduler == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=t.perturbation_interval,
                                       hyperparam_mutations=space)
    return FIFOScheduler()


def _search_alg(cfg: Config):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.tune.seed), max_concurrent=cfg.tune.max_concurrent_trials)
    # the generator caps concurrency itself: Tune ignores max_concurrent_trials next to a SearchGenerator
    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=cfg.tune.max_concurrent_trials)


def explain_rungs(cfg: Config) -> list[int]:
    """Log which epochs the scheduler judges trials at; returns ASHA's rungs ([] for the others)."""
    t = cfg.tune
    if t.scheduler != "asha":
        log.info("scheduler %s over %d epochs%s", t.scheduler, cfg.train.epochs,
                 f", perturbing every {t.perturbation_interval} epochs" if t.scheduler == "pbt" else "")
        return []
    rungs = asha_rungs(cfg.train.epochs, min(t.grace_period, cfg.train.epochs), t.reduction_factor)
    log.info("ASHA: max_t %d epochs, grace_period %d, reduction_factor %g -> rungs at epochs %s: at each rung a "
             "trial goes on only if it is in the top 1/%g of the trials that reached it", cfg.train.epochs,
             t.grace_period, t.reduction_factor, rungs, t.reduction_factor)
    return rungs


def _trial_logger(tracking_uri: str, experiment: str, parent_run_id: str):
    """Ray's MLflowLoggerCallback, except that a trial restarted with a new config (a PBT exploit) logs the
    new values as metrics at that epoch: MLflow params cannot change, and re-logging them fails the trial."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class TrialRunLogger(MLflowLoggerCallback):
        def log_trial_start(self, trial):
            if trial not in self._trial_runs:
                return super().log_trial_start(trial)
            step = (trial.last_result or {}).get("training_iteration", 0)
            numeric = {f"pbt.{k}": v for k, v in trial.config.items() if isinstance(v, (int, float))}
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=numeric, step=step)

    return TrialRunLogger(tracking_uri=tracking_uri, experiment_name=experiment, save_artifact=False,
                          tags={"mlflow.parentRunId": parent_run_id, "shipyard.kind": "trial"})


def search(cfg: Config, splits, run_name: str, tracking_uri: str, parent_run_id: str) -> SearchSummary:
    """Run the configured search; every trial becomes a child MLflow run of `parent_run_id` (the search run)."""
    from ray import tune

    space = build_space(cfg.tune.space)
    rungs = explain_rungs(cfg)
    trainable = tune.with_parameters(tune_trial, base=cfg.model_dump(mode="json"), train_ds=splits.train,
                                     val_ds=splits.val, in_features=splits.in_features,
                                     num_classes=splits.num_classes)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": cfg.tune.cpus_per_trial}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                                    scheduler=_scheduler(cfg, space), search_alg=_search_alg(cfg),
                                    reuse_actors=True),  # trial start-up (process + torch import) dominates here
        run_config=tune.RunConfig(
            name=run_name, storage_path=str(cfg.storage_dir), verbose=0,
            # PBT restores from older checkpoints: keeping fewer than 4 loses them (RAY_NOTES §5)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if cfg.tune.scheduler == "pbt" else 1),
            callbacks=[_progress_callback(cfg, cfg.tune.num_samples, rungs),
                       _trial_logger(tracking_uri, cfg.tracking.experiment, parent_run_id)]),
    )
    results = tuner.fit()
    ok = [r for r in results if r.error is None and r.metrics and cfg.tune.metric in r.metrics]
    if not ok:
        errors = [str(r.error) for r in results if r.error is not None][:1]
        raise TrainingError(f"every trial of the search failed; first error: {errors[0] if errors else 'unknown'}."
                            f" Trial logs: {results.experiment_path}")
    best = results.get_best_result(metric=cfg.tune.metric, mode=cfg.tune.mode, scope="last")
    statuses = {r.metrics.get("trial_id", r.path): trial_status(r.metrics.get("training_iteration", 0),
                                                                 r.error is not None, rungs, cfg.train.epochs)
                for r in results}
    _tag_trial_runs(tracking_uri, parent_run_id, statuses)
    if rungs:
        counts = rung_counts([r.metrics.get("training_iteration", 0) for r in results], rungs, cfg.train.epochs)
        log.info("trials reaching each rung (epoch: trials): %s", counts)
    summary: dict[str, int] = {}
    for status in statuses.values():
        key = status.split(" (")[0]
        summary[key] = summary.get(key, 0) + 1
    overrides = {k: best.config[k] for k in cfg.tune.space}
    return SearchSummary(overrides, float(best.metrics[cfg.tune.metric]), len(results), summary)


def _tag_trial_runs(tracking_uri: str, parent_run_id: str, statuses: dict[str, str]) -> None:
    """Each trial's MLflow run gets its outcome; early-stopped runs end KILLED, errored ones FAILED."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    for run in client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'"):
        trial_id = next((t for t in statuses if run.data.tags.get("trial_name", "").endswith(t)), None)
        if trial_id is None:
            continue
        status = statuses[trial_id]
        client.set_tag(run.info.run_id, "shipyard.trial_status", status)
        if status != "completed":
            client.set_terminated(run.info.run_id, status="FAILED" if status == "errored" else "KILLED")
