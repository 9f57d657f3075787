"""The pipeline's stages as the driver runs them, each returning a typed result (shipyard.pipeline strings them
together and builds the summary from the results).

Each function here joins a stage package to MLflow's run tree: the parent run is active when it is called.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from shipyard.config import Config, EndpointConfig, apply_overrides
from shipyard.data.splits import Splits
from shipyard.data.tables import to_numpy
from shipyard.errors import ServingError
from shipyard.pipeline_plan import predict
from shipyard.tasks import Task, make_task, objective
from shipyard.track import registry
from shipyard.track import runs as tracking
from shipyard.tune import search as tuning

if TYPE_CHECKING:
    pass

log = logging.getLogger("shipyard.pipeline")  # one logger for the driver's lines, as before the split


@dataclass(frozen=True)
class DataResult:
    task: Task
    """The task, bound to what the data stage found."""
    splits: Splits


@dataclass(frozen=True)
class TuneResult:
    best_cfg: Config
    best_overrides: dict[str, Any]
    best_metric: float
    trial_status: dict[str, int]
    search: dict[str, Any] = field(default_factory=dict)
    """trials, wall_s, experiment_path, best_checkpoint, checkpoints_kept, checkpoint_disk_mb"""


@dataclass(frozen=True)
class TrainResult:
    test_metric: float
    test_metric_name: str
    test_metrics: dict[str, float]
    model_version: str
    promoted: bool
    promotion_reason: str
    previous_champion_metric: float | None
    champion_version: str | None
    train_run_id: str
    checkpoint: str
    final_metrics: dict[str, Any]


@dataclass(frozen=True)
class ServeResult:
    endpoint: str
    endpoint_metric: float
    served_version: str | None
    endpoint_example: dict[str, Any]


def load_data(cfg: Config) -> DataResult:
    """Read and split the data with the task's reader; log what the model will bake in."""
    import mlflow

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
    return DataResult(task, splits)


def tune(cfg: Config, splits: Splits, stamp: str, search_id: str | None, resume: bool) -> TuneResult:
    """The search, in a nested `search` run; the best trial's config is what the train stage trains."""
    import mlflow

    with mlflow.start_run(
        run_id=search_id, run_name=None if search_id else "search", nested=True, tags={"shipyard.kind": "search"}
    ) as srun:
        mlflow.log_params({k: v for k, v in cfg.flat().items() if k.startswith("tune.")})
        found = tuning.search(
            cfg, splits, f"{cfg.name}-tune-{stamp}", cfg.tracking_uri, srun.info.run_id, resume=resume
        )
        mlflow.log_metric(f"best_{objective(cfg)[0]}", found.best_metric)
    return TuneResult(
        best_cfg=apply_overrides(cfg, found.best_overrides, source="best trial"),
        best_overrides=found.best_overrides,
        best_metric=found.best_metric,
        trial_status=found.trial_status,
        search={
            "trials": found.trials,
            "wall_s": found.wall_s,
            "experiment_path": found.experiment_path,
            "best_checkpoint": found.best_checkpoint,
            "checkpoints_kept": found.checkpoints_kept,
            "checkpoint_disk_mb": found.checkpoint_disk_mb,
        },
    )


def log_best(cfg: Config, tuned: TuneResult) -> None:
    """The best trial, in the log and as `best.*` params of the parent run."""
    import mlflow

    log.info(
        "best trial: %s (%s %.4f); trials %s",
        tuned.best_overrides,
        objective(cfg)[0],
        tuned.best_metric,
        tuned.trial_status,
    )
    mlflow.log_params({f"best.{k}": v for k, v in tuned.best_overrides.items()})


def train_and_register(
    cfg: Config, task: Task, splits: Splits, parent_id: str, stamp: str, auto: str | None = None
) -> TrainResult:
    """Train the chosen config on all workers, score it on the test split, register it and put it through the
    promotion gate."""
    import mlflow

    from shipyard.train.loop import fit, load_trained

    plan = predict(cfg, splits) if cfg.plan.enabled else None
    name = task.primary_metric
    prediction = None
    if plan is not None:
        from shipyard.perf.report import summary_lines

        for line in summary_lines(plan):
            log.info("%s", line)
        prediction = {
            "step_time_ms": plan.step.step_time_ms,
            "epoch_s": plan.epoch_s,
            "exposed_comm_ms": plan.step.exposed_comm_ms,
            "warn_off_by": cfg.plan.warn_off_by,
            "link": plan.link.name if plan.link else None,
            "auto": auto,  # what `auto` chose: the first steady epoch says whether the measurement agrees
            "strong": [asdict(r) for r in plan.strong],  # re-priced from the first steady epoch
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
                    **(
                        {"plan.analytical_step_time_ms": round(plan.analytical_step.step_time_ms, 4)}
                        if plan.analytical_step is not None
                        else {}
                    ),
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
    return TrainResult(
        test_metric=test_metric,
        test_metric_name=name,
        test_metrics=test,
        model_version=version,
        promoted=decision.promote,
        promotion_reason=decision.reason,
        previous_champion_metric=champion_metric,
        champion_version=registry.champion_version(cfg.model_name),
        train_run_id=run.info.run_id,
        checkpoint=result.checkpoint.path,
        final_metrics={k: result.metrics.get(k) for k in ("train_loss", "val_loss", f"val_{name}")},
    )


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


def serve_and_check(cfg: Config, task: Task, splits: Splits, trained: TrainResult) -> ServeResult:
    """Deploy the champion, send it the test rows as a client would (raw values), and check its answers against
    its logged test metric."""
    import requests
    from ray import serve

    from shipyard.serve.endpoint import build_app
    from shipyard.serve.ingress import wait_until_routed

    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    model_uri = f"models:/{cfg.model_name}@champion"
    if not trained.promoted and trained.previous_champion_metric is None:
        model_uri = f"models:/{cfg.model_name}/{trained.model_version}"  # the champion can't take this data
        log.warning("serving the candidate %s: %s", model_uri, trained.promotion_reason)
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
    name = trained.test_metric_name
    got = task.score_answers(predictions, y_test)
    expected = trained.test_metric if served_version == trained.model_version else trained.previous_champion_metric
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
    return ServeResult(
        endpoint=url,
        endpoint_metric=got,
        served_version=served_version,
        endpoint_example={"request_rows": 3, "response": example},
    )
