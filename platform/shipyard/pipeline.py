"""The driver pipeline: data -> plan -> tune -> train -> evaluate -> register/promote -> serve.

    summary = run(load_config("pipelines/configs/digits.yaml", ["train.lr=0.01"]))

Everything that can be checked without Ray (config, search space, data file, tracking server) is
checked before Ray starts. Each stage logs one progress line with its elapsed time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from shipyard.cluster.attach import init_ray
from shipyard.config import Config, EndpointConfig, apply_overrides
from shipyard.data.tables import to_numpy
from shipyard.errors import ConfigError, ServingError
from shipyard.tasks import Task, make_task, objective
from shipyard.track import registry
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
        if cfg.serve.enabled and cfg.serve.fast_ingress:
            from shipyard.serve.ingress import enable_fast_ingress

            enable_fast_ingress()  # read when Serve's processes start: only a Ray started here takes it
        started_ray = init_ray(address, cfg)
    summary: dict[str, Any] = {"model_name": cfg.model_name, "endpoint": None}
    keep = cfg.serve.keep_running if keep_serving is None else keep_serving
    served = serve_was_running = left_up = False
    stopped_by = None
    try:
        tracking.setup(cfg)
        with mlflow.start_run(
            run_id=parent_id,
            run_name=None if parent_id else f"{cfg.name}-{stamp}",
            tags={"shipyard.kind": "pipeline", "shipyard.pipeline": cfg.name, "shipyard.stamp": stamp},
        ) as parent:
            parent_id = parent.info.run_id
            summary["parent_run_id"] = parent_id
            log.info("MLflow: %s, experiment '%s', parent run %s", cfg.tracking_uri, cfg.tracking.experiment, parent_id)
            tracking.log_config(cfg)

            with stages("data", f"reading {cfg.data.path or cfg.data.builtin} with Ray Data ({cfg.task.name})"):
                task = make_task(cfg.task)
                splits = task.load(cfg.data)
                task.bind(splits.info)
                mlflow.log_params(
                    {
                        "data.hash": splits.data_hash,
                        "data.rows_train": splits.rows["train"],
                        "data.rows_val": splits.rows["val"],
                        "data.rows_test": splits.rows["test"],
                    }
                )
                # what the model bakes in, fitted on the train split: means, deviations, categories
                mlflow.log_dict(splits.info.to_dict(), "data_info.json")
            summary["data_hash"] = splits.data_hash

            best_cfg = cfg
            if cfg.plan.enabled:
                with stages("plan", "pricing the run (shipyard.perf; the first run on a machine measures it)"):
                    plan = _predict(cfg, splits)
                if plan is not None and plan.search_wall_s is not None and cfg.tune.enabled:
                    log.info(
                        "plan: the search trains ~%.0f trial-epochs (rung maths), ~%.0f s wall with %d at a time",
                        plan.search_trial_epochs,
                        plan.search_wall_s,
                        cfg.tune.max_concurrent_trials,
                    )
            if cfg.tune.enabled and cfg.tune.space:
                with stages(
                    "tune",
                    f"{cfg.tune.num_samples} trials, {cfg.tune.scheduler}, at most "
                    f"{cfg.tune.max_concurrent_trials} at a time",
                ):
                    with mlflow.start_run(
                        run_id=search_id,
                        run_name=None if search_id else "search",
                        nested=True,
                        tags={"shipyard.kind": "search"},
                    ) as srun:
                        mlflow.log_params({k: v for k, v in cfg.flat().items() if k.startswith("tune.")})
                        found = tuning.search(
                            cfg,
                            splits,
                            f"{cfg.name}-tune-{stamp}",
                            cfg.tracking_uri,
                            srun.info.run_id,
                            resume=bool(resume),
                        )
                        mlflow.log_metric(f"best_{objective(cfg)[0]}", found.best_metric)
                best_cfg = apply_overrides(cfg, found.best_overrides, source="best trial")
                log.info(
                    "best trial: %s (%s %.4f); trials %s",
                    found.best_overrides,
                    objective(cfg)[0],
                    found.best_metric,
                    found.trial_status,
                )
                summary["best_config"] = found.best_overrides
                summary["trials"] = found.trial_status
                summary["search"] = {
                    "trials": found.trials,
                    "wall_s": found.wall_s,
                    "experiment_path": found.experiment_path,
                    "best_checkpoint": found.best_checkpoint,
                    "checkpoints_kept": found.checkpoints_kept,
                    "checkpoint_disk_mb": found.checkpoint_disk_mb,
                }
                mlflow.log_params({f"best.{k}": v for k, v in found.best_overrides.items()})

            with stages("train", f"{cfg.scaling.workers_text} Ray Train workers x {best_cfg.train.epochs} epochs"):
                summary.update(_train_and_register(best_cfg, task, splits, parent_id, stamp))
            mlflow.log_metrics({f"test_{summary['test_metric_name']}": summary["test_metric"]})

            if cfg.serve.enabled:
                with stages("serve", f"deploying models:/{cfg.model_name}@champion on {cfg.serve.host}"):
                    from ray import serve

                    status = serve.status()
                    serve_was_running = bool(status.proxies or status.applications)  # another Serve user
                    if cfg.name in status.applications:
                        raise ServingError(
                            f"a Serve app named '{cfg.name}' is already running on this cluster "
                            "(another pipeline's --keep-serving?); stop it or set name=<other>"
                        )
                    served = True
                    summary.update(_serve_and_check(cfg, task, splits, summary))
                mlflow.log_metric(f"endpoint_{summary['test_metric_name']}", summary["endpoint_metric"])
            summary["stage_seconds"] = stages.seconds
            summary["total_seconds"] = round(time.perf_counter() - stages.t0, 2)
            mlflow.log_dict(summary, "summary.json")
        if report is not None:
            report(summary)
        if served and keep and started_ray:
            stopped_by = _wait_for_stop(summary["endpoint"])
        elif served and keep:
            left_up = True
            log.info(
                "endpoint stays up at %s on the cluster (serve.keep_running); `serve delete %s` or "
                "`serve shutdown` stops it",
                summary["endpoint"],
                cfg.name,
            )
    finally:
        if served and not left_up:
            from ray import serve

            # remove only our app from a Serve instance that was already running: other endpoints stay up
            serve.delete(cfg.name) if serve_was_running else serve.shutdown()
        if started_ray:
            ray.shutdown()
        if stopped_by:
            log.info("%s: stopped the endpoint at %s and the Ray it ran on", stopped_by, summary["endpoint"])
    return summary


def _train_and_register(cfg: Config, task: Task, splits, parent_id: str, stamp: str) -> dict[str, Any]:
    import mlflow

    from shipyard.train.loop import fit, load_trained

    plan = _predict(cfg, splits) if cfg.plan.enabled else None
    name = task.primary_metric
    prediction = None
    if plan is not None:
        from shipyard.perf.plan import summary_lines

        for line in summary_lines(plan):
            log.info("%s", line)
        prediction = {
            "step_time_ms": plan.step.step_time_ms,
            "epoch_s": plan.epoch_s,
            "exposed_comm_ms": plan.step.exposed_comm_ms,
            "warn_off_by": cfg.plan.warn_off_by,
            "link": plan.link.name if plan.link else None,
        }
    earlier = _earlier_train_run(parent_id)  # a resumed pipeline goes on in the train run its killed driver began
    if earlier:
        log.info("resuming the train run %s: Ray Train goes on from its latest checkpoint", earlier)
    with mlflow.start_run(
        run_id=earlier, run_name=None if earlier else "train", nested=True, tags={"shipyard.kind": "train"}
    ) as run:
        if not earlier:
            tracking.log_config(cfg)
        if plan is not None and not earlier:  # params are written once: a resumed run's plan may differ a little
            mlflow.log_params(
                {
                    "plan.device": plan.device.name,
                    "plan.predicted_step_time_ms": round(plan.step.step_time_ms, 4),
                    "plan.predicted_epoch_s": round(plan.epoch_s, 4),
                }
            )
        result = fit(cfg, splits, f"{cfg.name}-train-{stamp}", cfg.tracking_uri, run.info.run_id, prediction)
        model = load_trained(cfg, result.checkpoint, task)
        x_test, y_test = to_numpy(splits.test)
        test = tracking.evaluate_model(model, task, x_test, y_test)
        mlflow.log_metrics({f"test_{k}": v for k, v in test.items()})
        test_metric = test[name]
        log.info("test %s on %d held-out rows", ", ".join(f"{k} {v:.4f}" for k, v in test.items()), len(y_test))
        tags = tracking.lineage_tags(cfg, splits.data_hash, parent_id, run.info.run_id, test_metric, name)
        version = _version_of_run(cfg.model_name, run.info.run_id)  # registered before the driver was killed
        if version is None:
            version = tracking.log_model(
                model, x_test[:5], cfg, splits.classes, splits.feature_names, tags, info=splits.info.to_dict()
            )
        else:
            log.info(
                "%s v%s was registered by this train run before: not registering it again", cfg.model_name, version
            )
            for key, value in tags.items():  # the driver may have died before the tags were all set
                mlflow.MlflowClient().set_model_version_tag(cfg.model_name, version, key, value)
    decision, champion_metric = tracking.promote_if_better(cfg.model_name, version, test_metric, x_test, y_test, task)
    log.info(
        "registered %s v%s; %s -> %s",
        cfg.model_name,
        version,
        decision.reason,
        "promoted to champion" if decision.promote else "champion unchanged",
    )
    out = {
        "test_metric": test_metric,
        "test_metric_name": name,
        "test_metrics": test,
        "model_version": version,
        "promoted": decision.promote,
        "promotion_reason": decision.reason,
        "previous_champion_metric": champion_metric,
        "champion_version": registry.champion_version(cfg.model_name),
        "train_run_id": run.info.run_id,
        "checkpoint": result.checkpoint.path,
        "final_metrics": {k: result.metrics.get(k) for k in ("train_loss", "val_loss", f"val_{name}")},
    }
    if name == "accuracy":  # the names earlier summaries used, kept for scripts that read them
        out.update(test_accuracy=test_metric, previous_champion_accuracy=champion_metric)
    return out


def _earlier_train_run(parent_id: str) -> str | None:
    """The train run under this pipeline run, if a killed driver had begun one (only a resumed run has one)."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent_id}' and tags.`shipyard.kind` = 'train'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def _version_of_run(model_name: str, run_id: str) -> str | None:
    """The registered version this train run logged, if any."""
    import mlflow

    found = mlflow.MlflowClient().search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return str(found[0].version) if found else None


def _predict(cfg: Config, splits):
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
        return make_plan(cfg, cfg.plan.hardware, profile=path, shape=shape, rows=splits.rows)
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


def _serve_and_check(cfg: Config, task: Task, splits, summary: dict[str, Any]) -> dict[str, Any]:
    """Deploy the champion, send it the test rows as a client would (raw values), and check its answers against
    its logged test metric."""
    import requests
    from ray import serve

    from shipyard.serve.endpoint import build_app
    from shipyard.serve.ingress import wait_until_routed

    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    model_uri = f"models:/{cfg.model_name}@champion"
    if not summary["promoted"] and summary["previous_champion_metric"] is None:
        model_uri = f"models:/{cfg.model_name}/{summary['model_version']}"  # the champion can't take this data
        log.warning("serving the candidate %s: %s", model_uri, summary["promotion_reason"])
    app = build_app(
        {
            **cfg.serve.model_dump(include=set(EndpointConfig.model_fields)),
            "model": model_uri,
            "tracking_uri": cfg.tracking_uri,
        }
    )
    serve.run(app, name=cfg.name, route_prefix="/")
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    wait_until_routed(url)
    x_test, y_test = to_numpy(splits.test)
    instances = task.instances(x_test)
    hint = (
        "a Serve instance that was already running on this cluster keeps its own HTTP host and port; "
        "set serve.host and serve.port to those"
    )
    headers = {"X-API-Key": os.environ[cfg.serve.api_key_env]} if cfg.serve.api_key_env else {}
    predictions: list[Any] = []
    served_version = None
    # rows per request: within max_instances and, at ~25 bytes a number in JSON, within max_body_bytes
    step = max(1, min(cfg.serve.max_instances, cfg.serve.max_body_bytes // (25 * max(1, x_test[0].size))))
    for start in range(0, len(instances), step):
        try:
            resp = requests.post(
                f"{url}/predict", json={"instances": instances[start : start + step]}, headers=headers, timeout=60
            )
        except requests.ConnectionError as err:
            raise ServingError(f"nothing listens on {url}: {hint}") from err
        if resp.status_code == 404:
            raise ServingError(f"{url}/predict answered 404: {hint}")
        if resp.status_code != 200:
            raise ServingError(f"endpoint {url}/predict answered {resp.status_code}: {resp.text[:500]}")
        body = resp.json()
        predictions += body["predictions"]
        served_version = body["model_version"]
    name = summary["test_metric_name"]
    got = task.score_answers(predictions, y_test)
    expected = (
        summary["test_metric"] if served_version == summary["model_version"] else summary["previous_champion_metric"]
    )
    log.info(
        "endpoint %s (v%s) answered %d test rows: %s %.4f (expected %s)",
        url,
        served_version,
        len(predictions),
        name,
        got,
        "n/a" if expected is None else f"{expected:.4f}",
    )
    # the same model on the same rows: only float summation order differs (batching)
    if expected is not None and cfg.serve.canary_share == 0 and abs(got - expected) > 0.005 * max(1, abs(expected)):
        raise ServingError(
            f"endpoint {name} {got:.4f} differs from the logged test {name} {expected:.4f} of v{served_version}"
        )
    example = requests.post(f"{url}/predict", json={"instances": instances[:3]}, headers=headers, timeout=30).json()
    out = {
        "endpoint": url,
        "endpoint_metric": got,
        "served_version": served_version,
        "endpoint_example": {"request_rows": 3, "response": example},
    }
    if name == "accuracy":
        out["endpoint_accuracy"] = got
    return out


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
