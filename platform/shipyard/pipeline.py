"""The driver pipeline: data -> plan -> tune -> train -> evaluate -> register/promote -> serve.

    summary = run(load_config("pipelines/configs/digits.yaml", ["train.lr=0.01"]))

Everything that can be checked without Ray (config, search space, data file, tracking server) is
checked before Ray starts. Each stage (shipyard.pipeline_stages) returns a typed result and logs one progress
line with its elapsed time; `summarize` builds the summary from the results, in one place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from shipyard import pipeline_stages as stage
from shipyard.cluster.attach import init_ray
from shipyard.config import Config
from shipyard.errors import ConfigError, ServingError
from shipyard.pipeline_plan import predict, resolve_auto
from shipyard.pipeline_stages import DataResult, ServeResult, TrainResult, TuneResult
from shipyard.startup import configure_process
from shipyard.tasks import make_task, objective
from shipyard.track import runs as tracking
from shipyard.tune import search as tuning

log = logging.getLogger(__name__)


class Stages:
    """Wall time per stage, with one progress line at the start and end of each."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, what: str) -> Iterator[None]:
        log.info("[%6.1fs] %-8s %s ...", time.perf_counter() - self.t0, name, what)
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 2)
        log.info("[%6.1fs] %-8s done in %.1f s", time.perf_counter() - self.t0, name, self.seconds[name])


def preflight(cfg: Config, resume: str | None = None) -> None:
    """The checks that need no Ray: they fail in seconds, before any cluster is started."""
    task = make_task(cfg.task)
    task.check_source(cfg.data)
    objective(cfg)  # tune.metric is one the task reports
    if cfg.tune.enabled:
        tuning.check_space(cfg)
        if resume and cfg.tune.scheduler == "hyperband":
            raise ConfigError(
                "--resume: a HyperBand search cannot be resumed (Tune does not save HyperBand's "
                "brackets, and a restored bracket waits forever); use tune.scheduler=asha to resume"
            )
    tracking.check_reachable(cfg.tracking_uri)
    if cfg.plan.enabled:
        _check_plan(cfg)
    elif cfg.scaling.num_workers == "auto":
        raise ConfigError(
            "scaling.num_workers=auto chooses from the plan, and plan.enabled=false; set plan.enabled=true or "
            "give a number, e.g. scaling.num_workers=2"
        )


def _check_plan(cfg: Config) -> None:
    from shipyard.perf.devices import DEVICES, load_profile
    from shipyard.perf.plan import default_profile_path

    if cfg.plan.hardware != "local" and cfg.plan.hardware.lower() not in DEVICES:
        raise ConfigError(
            f"plan.hardware '{cfg.plan.hardware}' is unknown; use local (this machine, calibrated) or "
            f"one of {', '.join(DEVICES)}"
        )
    path = default_profile_path(cfg)
    if cfg.plan.hardware == "local" and path.is_file():
        try:
            load_profile(path)
        except ValueError as err:
            raise ConfigError(f"plan.profile: {err}") from None


def run(
    cfg: Config,
    address: str | None = None,
    keep_serving: bool | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    resume: str | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (also what `--summary-json` writes).

    `report(summary)` is called once the summary is complete, before an endpoint kept up waits for Ctrl-C.
    `resume` ("latest" or a run name) continues an unfinished pipeline run: the same MLflow runs, and its
    search goes on from Tune's saved state (finished trials kept, the others from their latest checkpoint).
    """
    import mlflow
    import ray

    preflight(cfg, resume)
    parent_id = search_id = None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    if resume:
        parent_id, stamp, search_id = tracking.resumable_run(cfg, resume)
        log.info("resuming pipeline run %s-%s (%s)", cfg.name, stamp, parent_id)
    stages = Stages()
    with stages("ray", "starting or attaching to Ray"):
        # what an entry point sets at start-up (a no-op then), for a script that calls run() itself: Ray reads
        # these when it starts, which is next
        configure_process(fast_ingress=cfg.serve.enabled and cfg.serve.fast_ingress, address=address)
        started_ray = init_ray(address, cfg)
    keep = cfg.serve.keep_running if keep_serving is None else keep_serving
    served: ServeResult | None = None
    serving = serve_was_running = left_up = False
    stopped_by = None
    try:
        tracking.setup(cfg)
        with mlflow.start_run(
            run_id=parent_id,
            run_name=None if parent_id else f"{cfg.name}-{stamp}",
            tags={"shipyard.kind": "pipeline", "shipyard.pipeline": cfg.name, "shipyard.stamp": stamp},
        ) as parent:
            parent_id = parent.info.run_id
            log.info("MLflow: %s, experiment '%s', parent run %s", cfg.tracking_uri, cfg.tracking.experiment, parent_id)
            tracking.log_config(cfg)
            with stages("data", f"reading {cfg.data.path or cfg.data.builtin} with Ray Data ({cfg.task.name})"):
                data = stage.load_data(cfg)
            plan = None
            if cfg.plan.enabled:
                with stages("plan", "pricing the run (shipyard.perf; the first run on a machine measures it)"):
                    plan = predict(cfg, data.splits)
            cfg, auto = resolve_auto(cfg, plan)  # `auto` worker and trial counts made numbers
            if plan is not None and plan.search_wall_s is not None and cfg.tune.enabled:
                log.info(
                    "plan: the search trains ~%.0f trial-epochs (rung maths), ~%.0f s wall with %d at a time",
                    plan.search_trial_epochs,
                    plan.search_wall_s,
                    cfg.tune.max_concurrent_trials,
                )
            tuned = None
            if cfg.tune.enabled and cfg.tune.space:
                what = f"{cfg.tune.num_samples} trials, {cfg.tune.scheduler}, at most {cfg.tune.max_concurrent_trials}"
                with stages("tune", f"{what} at a time"):
                    tuned = stage.tune(cfg, data.splits, stamp, search_id, bool(resume))
                stage.log_best(cfg, tuned)
            best_cfg = tuned.best_cfg if tuned else cfg
            with stages("train", f"{cfg.scaling.workers_text} Ray Train workers x {best_cfg.train.epochs} epochs"):
                trained = stage.train_and_register(best_cfg, data.task, data.splits, parent_id, stamp, auto)
            mlflow.log_metrics({f"test_{trained.test_metric_name}": trained.test_metric})
            if cfg.serve.enabled:
                with stages("serve", f"deploying models:/{cfg.model_name}@champion on {cfg.serve.host}"):
                    serve_was_running = _check_serve_free(cfg)
                    serving = True
                    served = stage.serve_and_check(cfg, data.task, data.splits, trained)
                mlflow.log_metric(f"endpoint_{trained.test_metric_name}", served.endpoint_metric)
            summary = summarize(cfg, parent_id, data, tuned, trained, served, stages)
            mlflow.log_dict(summary, "summary.json")
        if report is not None:
            report(summary)
        if served and keep and started_ray:
            stopped_by = _wait_for_stop(served.endpoint)
        elif served and keep:
            left_up = True
            log.info(
                "endpoint stays up at %s on the cluster (serve.keep_running); `serve delete %s` or "
                "`serve shutdown` stops it",
                served.endpoint,
                cfg.name,
            )
    finally:
        if serving and not left_up:
            from ray import serve

            # remove only our app from a Serve instance that was already running: other endpoints stay up
            serve.delete(cfg.name) if serve_was_running else serve.shutdown()
        if started_ray:
            ray.shutdown()
        if stopped_by:
            log.info("%s: stopped the endpoint at %s and the Ray it ran on", stopped_by, served.endpoint)
    return summary


def _check_serve_free(cfg: Config) -> bool:
    """Whether Serve was already running here (another Serve user); refuse if our app name is taken."""
    from ray import serve

    status = serve.status()
    if cfg.name in status.applications:
        raise ServingError(
            f"a Serve app named '{cfg.name}' is already running on this cluster "
            "(another pipeline's --keep-serving?); stop it or set name=<other>"
        )
    return bool(status.proxies or status.applications)


def summarize(
    cfg: Config,
    parent_id: str,
    data: DataResult,
    tuned: TuneResult | None,
    trained: TrainResult,
    served: ServeResult | None,
    stages: Stages,
) -> dict[str, Any]:
    """The run's summary (printed by the CLI, written by --summary-json, logged as summary.json): the one place
    its keys are spelled."""
    summary: dict[str, Any] = {"model_name": cfg.model_name, "endpoint": None, "parent_run_id": parent_id}
    summary["data_hash"] = data.splits.data_hash
    if tuned is not None:
        summary["best_config"] = tuned.best_overrides
        summary["trials"] = tuned.trial_status
        summary["search"] = tuned.search
    summary.update(dataclasses.asdict(trained))
    name = trained.test_metric_name
    if name == "accuracy":  # the names earlier summaries used, kept for scripts that read them
        summary.update(test_accuracy=trained.test_metric, previous_champion_accuracy=trained.previous_champion_metric)
    if served is not None:
        summary.update(dataclasses.asdict(served))
        if name == "accuracy":
            summary["endpoint_accuracy"] = served.endpoint_metric
    summary["stage_seconds"] = stages.seconds
    summary["total_seconds"] = round(time.perf_counter() - stages.t0, 2)
    return summary


def _wait_for_stop(url: str) -> str:
    """Keep the endpoint up until Ctrl-C or SIGTERM (what a service manager sends); returns which came.

    Ray's core worker installs a C++ handler for SIGTERM that prints a raw signal dump and kills the process
    before the endpoint and Ray are shut down; for the wait, SIGTERM is handled like Ctrl-C instead."""

    def on_sigterm(signum, frame):
        raise _Sigterm

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    log.info("endpoint stays up at %s (serve.keep_running); press Ctrl-C (or send SIGTERM) to stop it", url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return "Ctrl-C"
    except _Sigterm:
        return "SIGTERM"
    finally:  # a second SIGTERM while shutting down ends the process at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _Sigterm(Exception):
    """SIGTERM during the wait of a kept endpoint."""
