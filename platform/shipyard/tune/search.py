"""Hyperparameter search: Ray Tune over the same epoch loop as training, ASHA by default.

    summary = search(cfg, splits, run_name, tracking_uri, search_run_id)

The search space uses the config's own dotted keys (`train.lr`), so a trial's config is
`apply_overrides(cfg, trial_config)` and its MLflow params carry the same names.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.config import Config, apply_overrides
from shipyard.errors import ConfigError, TrainingError
from shipyard.tasks import make_task, objective
from shipyard.train.checkpoints import checkpoint_keeper, final_prune
from shipyard.tune.pbt import clip_to_space, param_shapes, pbt_keys
from shipyard.tune.plots import TrialHistory, write_search_plots
from shipyard.tune.schedules import EPOCHS, Schedule, explain_schedule, rung_counts
from shipyard.tune.trial_runs import progress_callback, settle_trial_runs, trial_logger
from shipyard.tune.trials import TRIAL_DRIVER_CPU, trials_at_once, tune_trial, tune_trial_ddp

log = logging.getLogger(__name__)


def build_space(space: dict[str, dict[str, list[Any]]]) -> dict[str, Any]:
    """`{"train.lr": {"loguniform": [1e-4, 1e-2]}}` -> Tune's sampling objects. Raises ConfigError."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if len(spec) != 1:
            raise ConfigError(f"tune.space.{key}: give exactly one distribution, e.g. {{loguniform: [1e-4, 1e-2]}}")
        ((dist, args),) = spec.items()
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
    if cfg.tune.workers_per_trial > 1 and cfg.tune.scheduler in ("pbt", "hyperband"):
        raise ConfigError(
            f"tune.scheduler={cfg.tune.scheduler} pauses or clones trials through Tune checkpoints, "
            "which a multi-worker trial (a Ray Train job) does not hand to Tune; use asha or fifo, or "
            "tune.workers_per_trial=1"
        )
    for key, spec in cfg.tune.space.items():
        ((dist, args),) = spec.items()
        for value in args if dist in ("choice", "grid") else args[:1]:
            apply_overrides(cfg, {key: value}, source=f"tune.space.{key}")
    if cfg.tune.scheduler == "pbt":
        try:
            param_shapes(cfg.model, *PROBE_DATA)
        except Exception:  # noqa: BLE001 - a model that needs the data's own shape: search() checks with it
            return
        pbt_keys(cfg, *PROBE_DATA)


PROBE_DATA = (64, 10)
"""(in_features, num_classes) the preflight builds models with, before the data is read: a square feature count,
so image models build too. Whether a key changes parameter shapes does not depend on them; search() checks
again with the data's own."""


def check_errored_trials(total: int, errors: list[str], trial_logs: str) -> str | None:
    """The verdict on a finished search's errored trials (`errors`: one line each). More than half errored: a
    TrainingError, since the best of the few left says little about the space. Some errored: the warning to log.
    None errored: None."""
    if not errors:
        return None
    what = (
        f"{len(errors)} of {total} trials errored; the first: {errors[0]}. Trial logs: {trial_logs} (error.txt "
        "in each errored trial's folder)"
    )
    if 2 * len(errors) > total:
        raise TrainingError(f"the search failed: {what}. Fix the cause and run again")
    return f"{what}; the best of the other {total - len(errors)} is used"


def _error_line(err: BaseException) -> str:
    """A trial's error in one line: the exception raised in the trial (not Ray's wrapper) and its message's first
    line, or first two when the first announces a list (`Error(s) in loading state_dict for Sequential:`)."""
    cause = getattr(err, "cause", None)
    err = cause if isinstance(cause, BaseException) else err
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(err).__name__}: {text}"


@dataclass
class SearchSummary:
    best_overrides: dict[str, Any]
    best_metric: float
    trials: int
    trial_status: dict[str, int]
    histories: list[TrialHistory]
    wall_s: float
    """Tune's fit alone: the search from its first trial to its last result."""
    best_checkpoint: str | None
    checkpoints_kept: int
    checkpoint_disk_mb: float
    experiment_path: str


def _scheduler(cfg: Config, space: dict[str, Any], mutated: list[str]):
    """Tune's scheduler for tune.scheduler; with PBT, `mutated` are the space keys it may change in a trial."""
    from ray.tune.schedulers import (
        ASHAScheduler,
        FIFOScheduler,
        HyperBandScheduler,
        PopulationBasedTraining,
        TrialScheduler,
    )

    t = cfg.tune
    if t.scheduler == "asha":
        return ASHAScheduler(
            time_attr=EPOCHS,
            max_t=cfg.train.epochs,
            grace_period=min(t.grace_period, cfg.train.epochs),
            reduction_factor=t.reduction_factor,
        )
    if t.scheduler == "hyperband":
        return HyperBandScheduler(time_attr=EPOCHS, max_t=cfg.train.epochs, reduction_factor=t.reduction_factor)
    if t.scheduler == "pbt":
        # a choice goes to PBT as its list, so a perturbation shifts to a neighbouring value; as a Tune domain
        # PBT would multiply it by 0.8 or 1.2 (128 -> 102), a value the user never listed
        mutations = {k: t.space[k]["choice"] if "choice" in t.space[k] else space[k] for k in mutated}
        max_t = cfg.train.epochs

        class PBT(PopulationBasedTraining):
            """Tune's PBT, except at a trial's last epoch (a perturbation time when train.epochs is a multiple of
            tune.perturbation_interval): there it neither clones nor is saved as a source. A trial that cloned a
            last epoch's checkpoint would have no epoch left to run and would end without a report, its status and
            metric those from before the exploit; cloning at its own last epoch would only copy another's result."""

            def on_trial_result(self, tune_controller, trial, result):
                if result.get(EPOCHS, 0) >= max_t:
                    return TrialScheduler.CONTINUE
                return super().on_trial_result(tune_controller, trial, result)

        return PBT(
            time_attr=EPOCHS,
            perturbation_interval=t.perturbation_interval,
            hyperparam_mutations=mutations,
            custom_explore_fn=functools.partial(clip_to_space, space=t.space),
        )
    return FIFOScheduler()


def _search_alg(cfg: Config, at_once: int):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    # HyperBand pauses trials, and a paused trial counts against a searcher's cap: with a cap below a
    # bracket's size no trial is ever stopped. Running trials are then limited by CPUs per trial alone.
    hyperband = cfg.tune.scheduler == "hyperband"
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        optuna = OptunaSearch(seed=cfg.tune.seed)
        return optuna if hyperband else ConcurrencyLimiter(optuna, max_concurrent=at_once)
    if hyperband:
        at_once = 0
    # the generator caps concurrency itself: Tune ignores max_concurrent_trials next to a SearchGenerator
    return BasicVariantGenerator(random_state=cfg.tune.seed, max_concurrent=at_once)


def search(
    cfg: Config, splits, run_name: str, tracking_uri: str, parent_run_id: str, resume: bool = False
) -> SearchSummary:
    """Run the configured search; every trial becomes a child MLflow run of `parent_run_id` (the search run).

    With `resume`, a search of the same `run_name` whose driver died goes on from its last saved state:
    finished trials are kept, unfinished ones restart from their latest checkpoint.
    """
    import ray
    from ray import tune

    space = build_space(cfg.tune.space)
    schedule = explain_schedule(cfg)
    pbt = cfg.tune.scheduler == "pbt"
    mutated: list[str] = []
    if pbt:
        mutated, fixed = pbt_keys(cfg, *make_task(cfg.task, splits.info).net_shape())
        log.info(
            "PBT mutates %s%s",
            ", ".join(mutated),
            f"; keeps {', '.join(fixed)} as each trial sampled it, since it changes the model's parameter "
            f"shapes ({'; '.join(fixed.values())}): an exploit copies it from the cloned trial with the "
            "checkpoint"
            if fixed
            else "",
        )
    at_once = trials_at_once(cfg, [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]])
    if cfg.tune.max_concurrent_trials != "auto" and at_once < min(cfg.tune.max_concurrent_trials, cfg.tune.num_samples):
        log.warning(
            "only %d trial(s) of %g CPUs fit on this cluster at once (tune.max_concurrent_trials=%d)",
            at_once,
            cfg.tune.cpus_per_trial,
            cfg.tune.max_concurrent_trials,
        )
    multi = cfg.tune.workers_per_trial > 1
    trainable = tune.with_parameters(
        tune_trial_ddp if multi else tune_trial,
        base=cfg.model_dump(mode="json"),
        train_ds=splits.train,
        val_ds=splits.val,
        info=splits.info.to_dict(),
    )
    trainable = tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPU if multi else cfg.tune.cpus_per_trial})
    path = Path(cfg.storage_dir) / run_name
    # Tune snapshots the experiment every TUNE_GLOBAL_CHECKPOINT_S (1 s, set at start-up: shipyard.startup)
    if resume and tune.Tuner.can_restore(str(path)):
        log.info(
            "resuming the search saved at %s: finished trials are kept, the others restart from their "
            "latest checkpoint",
            path,
        )
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True, param_space=space)
    else:
        if resume:
            log.warning("no saved search at %s to resume: starting it afresh", path)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=objective(cfg)[0],
                mode=objective(cfg)[1],
                num_samples=cfg.tune.num_samples,
                scheduler=_scheduler(cfg, space, mutated),
                search_alg=_search_alg(cfg, at_once),
                reuse_actors=not multi,
            ),  # trial start-up (process + torch import)
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=str(cfg.storage_dir),
                verbose=0,
                # a function trial's last report is not marked done: without this stop rule HyperBand pauses a
                # trial that reached max_t, and if it is its bracket's last, the search hangs (seen on Ray 2.60)
                stop={EPOCHS: cfg.train.epochs},
                # per trial: its best and its latest; across finished trials the keeper keeps the best
                # tune.keep_checkpoints. Not with PBT: an exploit clones the checkpoint its source saved at its last
                # perturbation, and the cloning trial loads it when it restarts, after its source may have saved
                # more (Tune's num_to_keep keeps only the best few and the latest) or ended (the keeper prunes ended
                # trials): the clone then fails with FileNotFoundError. So with PBT every checkpoint stays until the
                # search ends
                # and final_prune keeps the best tune.keep_checkpoints: disk grows by a checkpoint per trial-epoch.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=None if pbt else 1,
                    checkpoint_score_attribute=objective(cfg)[0],
                    checkpoint_score_order=objective(cfg)[1],
                ),
                callbacks=[
                    progress_callback(cfg, cfg.tune.num_samples, schedule),
                    *([] if pbt else [checkpoint_keeper(cfg)]),
                    trial_logger(tracking_uri, cfg.tracking.experiment, parent_run_id, schedule, pbt),
                ],
            ),
        )
    started = time.time()
    results = tuner.fit()
    fit_s = round(time.time() - started, 2)
    ok = [r for r in results if r.error is None and r.metrics and objective(cfg)[0] in r.metrics]
    errored = check_errored_trials(
        len(results), [_error_line(r.error) for r in results if r.error is not None], results.experiment_path
    )
    if not ok:
        raise TrainingError(
            f"no trial of the search reported {objective(cfg)[0]}. Trial logs: {results.experiment_path}"
        )
    if errored:
        log.warning("%s", errored)
    best = results.get_best_result(metric=objective(cfg)[0], mode=objective(cfg)[1], scope="last")
    histories = _histories(cfg, results, schedule, started)
    best_checkpoint = best.checkpoint.path if best.checkpoint else best.metrics.get("checkpoint_path")
    if best_checkpoint and not Path(best_checkpoint).exists():  # a Train-job trial: its job's newest
        best_checkpoint = str(
            max(
                (d for d in Path(best.path).rglob("checkpoint_*") if d.is_dir()),
                key=lambda d: d.stat().st_mtime,
                default=best_checkpoint,
            )
        )
    kept, disk_mb = final_prune(cfg, results, best_checkpoint)
    log.info(
        "checkpoints: %d kept (%.1f MiB) under %s; the best trial's is %s",
        kept,
        disk_mb,
        results.experiment_path,
        best_checkpoint,
    )
    if schedule.rungs:
        counts = rung_counts([h.epochs[-1] if h.epochs else 0 for h in histories], schedule.rungs, schedule.max_t)
        log.info("trials reaching each rung (epoch: trials): %s", counts)
    summary = dict(Counter(h.status.split(" (")[0] for h in histories))  # "stopped at rung 2 (epoch 9)" -> rung
    settle_trial_runs(tracking_uri, parent_run_id, histories)
    _log_search_outputs(cfg, histories, schedule.rungs, tracking_uri, parent_run_id, kept, disk_mb)
    overrides = {k: best.config[k] for k in cfg.tune.space}
    return SearchSummary(
        overrides,
        float(best.metrics[objective(cfg)[0]]),
        len(results),
        summary,
        histories,
        fit_s,
        best_checkpoint,
        kept,
        disk_mb,
        results.experiment_path,
    )


def _histories(cfg: Config, results, schedule: Schedule, started: float) -> list[TrialHistory]:
    """Per-trial learning curves from each trial's result log (it survives a driver restart)."""
    out = []
    frames = [r.metrics_dataframe for r in results]
    stamps = [
        df["reported_at_s"].iloc[0] - df["time_this_iter_s"].iloc[0]
        for df in frames
        if df is not None and len(df) and "reported_at_s" in df
    ]
    t0 = min([started, *stamps])
    for r, df in zip(results, frames):
        rows = df if df is not None and objective(cfg)[0] in getattr(df, "columns", []) else None
        epochs, elapsed = [], []
        if rows is not None:  # Train-job trials report no reported_at_s: Tune's whole-second timestamp then
            epochs = rows[EPOCHS].astype(int).tolist()
            elapsed = (rows["reported_at_s" if "reported_at_s" in rows else "timestamp"] - t0).tolist()
        status = schedule.status(epochs[-1] if epochs else 0, r.error is not None)
        out.append(
            TrialHistory(
                str((r.metrics or {}).get("trial_id", Path(r.path).name)),
                {k: r.config.get(k) for k in cfg.tune.space},
                status,
                epochs,
                rows[objective(cfg)[0]].astype(float).tolist() if rows is not None else [],
                elapsed,
            )
        )
    return out


def _log_search_outputs(
    cfg: Config,
    histories: list[TrialHistory],
    rungs: list[int],
    tracking_uri: str,
    run_id: str,
    kept: int,
    disk_mb: float,
) -> None:
    """Onto the search run: the checkpoint disk report and the PNG plots (learning curves, objective per param)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    client.log_metric(run_id, "checkpoints_kept", kept)
    client.log_metric(run_id, "checkpoint_disk_mb", disk_mb)
    with tempfile.TemporaryDirectory() as tmp:
        write_search_plots(histories, objective(cfg)[0], objective(cfg)[1], rungs, Path(tmp))
        client.log_artifacts(run_id, tmp, "plots")
