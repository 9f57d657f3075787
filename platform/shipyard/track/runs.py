"""MLflow: the parent run of a pipeline, the logged model, the registry and the `champion` alias.

Only the driver (and rank 0 of a Train job, see shipyard.train.loop) talks to MLflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from shipyard.config import PROJECT_ROOT, Config
from shipyard.errors import ConfigError, TrackingError
from shipyard.track import promotion, registry
from shipyard.track.promotion import Decision

log = logging.getLogger(__name__)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before Ray starts, when a tracking server does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as err:
        raise TrackingError(
            f"tracking.uri {uri} does not answer ({err.__class__.__name__}); start it with "
            "`mlflow server --host 127.0.0.1 --port <port>` or fix tracking.uri"
        ) from err


def setup(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    import mlflow

    uri = cfg.tracking_uri
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return mlflow.set_experiment(cfg.tracking.experiment).experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # else artifacts land in ./mlruns of whatever folder the driver started in
        location = (Path(uri[len("sqlite:///") :]).parent / "artifacts").as_uri()
    try:
        exp_id = mlflow.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent pipeline
        exp_id = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def resumable_run(cfg: Config, which: str) -> tuple[str, str, str | None]:
    """The pipeline run that `--resume` continues: (parent run id, its stamp, its search run id or None).

    `which` is a run name or "latest" (the newest unfinished run of this pipeline). Fails, naming what differs,
    when the config is not the one the run started with: the search it resumes was built from that config.
    """
    from mlflow import MlflowClient

    client = MlflowClient(cfg.tracking_uri)
    exp = setup(cfg)
    query = f"tags.`shipyard.kind` = 'pipeline' and tags.`shipyard.pipeline` = '{cfg.name}'"
    if which != "latest":
        if "'" in which:
            raise ConfigError(f"--resume {which!r}: a run name has no quotes")
        query += f" and attributes.run_name = '{which}'"
    runs = client.search_runs([exp], query, order_by=["attributes.start_time DESC"], max_results=20)
    unfinished = [r for r in runs if r.info.status != "FINISHED"]
    if not unfinished:
        what = f"named '{which}'" if which != "latest" else f"of pipeline '{cfg.name}'"
        raise ConfigError(
            f"--resume: no unfinished pipeline run {what} in experiment '{cfg.tracking.experiment}' "
            f"at {cfg.tracking_uri} (finished runs: {[r.info.run_name for r in runs[:5]]}); "
            "run without --resume to start a new one"
        )
    run = unfinished[0]
    logged, now = run.data.params, {k: str(v) for k, v in cfg.flat().items()}
    changed = [k for k in sorted(now) if k in logged and logged[k] != now[k]]
    if changed:
        raise ConfigError(
            f"--resume continues run '{run.info.run_name}' with the config it started with, but "
            f"{', '.join(f'{k} is {now[k]} (was {logged[k]})' for k in changed[:5])}: pass the "
            f"same values ({' '.join(f'{k}={logged[k]}' for k in changed[:5])}), or start a new run"
        )
    searches = client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.`shipyard.kind` = 'search'", max_results=1
    )
    return run.info.run_id, run.data.tags["shipyard.stamp"], searches[0].info.run_id if searches else None


def log_config(cfg: Config) -> None:
    """The resolved config: flat params (same spelling as the CLI) plus the YAML as an artifact."""
    import mlflow

    mlflow.log_params(cfg.flat())
    mlflow.log_text(cfg.to_yaml(), "config.yaml")


def evaluate_model(model, task, x: np.ndarray, y: np.ndarray, batch_rows: int = 4096) -> dict[str, float]:
    """The task's metrics of a (CPU) model on a split's arrays."""
    import torch

    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch_rows):
            outputs.append(model(torch.from_numpy(x[start : start + batch_rows])).float())
    return task.metrics(torch.cat(outputs), torch.tensor(y))


def log_model(
    model,
    x_example: np.ndarray,
    cfg: Config,
    classes: list[Any] | None,
    feature_names: list[str],
    tags: dict[str, str],
    info: dict[str, Any] | None = None,
) -> str:
    """Log the model (torch.export format: weights, not a pickle) with its signature, register a version.
    `info` (the data stage's DataInfo as a dict) goes into the model's metadata: the endpoint parses requests
    and forms answers with the task it names."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        logits = model(torch.as_tensor(x_example)).numpy()
    try:
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(x_example, logits),
            input_example=x_example,
            registered_model_name=cfg.model_name,
            # explicit requirements: inferring them costs ~7 s and trips over torch's +cpu label
            # (MLflow 3.17, torch 2.13.0+cpu)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
            metadata={
                "classes": classes,
                "feature_names": feature_names,
                **({"data_info": info, "task_options": cfg.task.options} if info else {}),
            },
        )
    except mlflow.exceptions.MlflowException:
        raise  # the tracking server or registry said no: its own message is the clearest
    except Exception as err:  # torch.export cannot trace every model (data-dependent control flow, ...)
        first_line = (str(err).strip().splitlines() or [""])[0][:300]
        raise TrackingError(
            f"could not log model.name={cfg.model.name} in torch.export form ({type(err).__name__}: "
            f"{first_line}); the weights are safe in the last training checkpoint. "
            "Make the model's forward traceable by torch.export (no Python control flow on tensor values)"
        ) from err
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    return version


def score_version(name: str, version: str, x: np.ndarray, y: np.ndarray, task) -> float | None:
    """The task's primary metric of a registered version on (x, y), a split `task` encoded; None if the version
    cannot take these rows. A version trained on other data may encode them otherwise (its own categories of a
    text column, its own class order): the rows are then re-encoded from their raw values as it encodes them."""
    from shipyard.tasks import reencode
    from shipyard.track.registry import load

    try:
        served = load(name, version)  # torch.export form only: nothing is unpickled
        if served.task.encoding() != task.encoding():
            x, y = reencode(task, served.task, x, y)
        return evaluate_model(served.model, task, x.astype(np.float32), y)[task.primary_metric]
    except Exception as err:  # other features: a shape error; a pickled model: ServingError
        log.warning("v%s of %s cannot be scored on this test split: %s", version, name, err)
        return None


def promote_if_better(
    name: str, version: str, candidate_metric: float, x_test: np.ndarray, y_test: np.ndarray, task
) -> tuple[Decision, float | None]:
    """Move `champion` to `version` only if it beats the current champion on the same test rows, by the task's
    primary metric and its direction (a higher accuracy, a lower RMSE).

    The champion is re-scored on the candidate's test split rather than trusting its logged figure,
    which may come from other data or another split. Pipelines promoting into one registry at once (on one
    machine or many, through one MLflow server) leave the alias on the best of their versions and the champion
    they found: `promotion.steps` is the protocol and its argument; this function performs its requests.
    Returns the decision for `version` and the metric of the champion found first (None if there was none).
    """
    import mlflow

    if "'" in name:
        raise ConfigError(f"tracking.model_name {name!r}: a registered model name for promotion has no quotes")
    client = mlflow.MlflowClient()
    mine = client.get_model_version(name, version).tags
    protocol = promotion.steps(version, candidate_metric, gate=promotion.Gate(task.primary_metric, task.mode))
    answer: Any = None
    try:
        while True:
            try:
                request = protocol.send(answer)
            except StopIteration as done:
                return done.value
            answer = _perform(request, name, version, mine, x_test, y_test, task)
    except Exception as err:
        with contextlib.suppress(Exception):  # the registry may be what failed: the claim then goes stale
            registry.release_claim(name, version, f"promotion failed ({type(err).__name__}: {err})"[:500])
        raise


def _perform(
    request: promotion.Request,
    name: str,
    version: str,
    mine: dict[str, str],
    x_test: np.ndarray,
    y_test: np.ndarray,
    task,
) -> Any:
    """One request of `promotion.steps` on MLflow; returns its answer."""
    import mlflow

    match request:
        case promotion.Read():
            return registry.promotion_view(name)
        case promotion.Score(version=other):
            accuracy = score_version(name, other, x_test, y_test, task)
            theirs = mlflow.MlflowClient().get_model_version(name, other).tags
            for key in ("shipyard.data_hash", "shipyard.split"):
                if accuracy is not None and theirs.get(key) != mine.get(key):
                    # its training rows may sit in this test split, which flatters it: say so, decide anyway
                    log.warning(
                        "v%s was trained with another %s (%s, now %s): the comparison may favour it",
                        other,
                        key,
                        theirs.get(key),
                        mine.get(key),
                    )
            return accuracy
        case promotion.Mark(phase=phase):
            registry.mark_claim(name, version, phase)
        case promotion.Move(version=target, before=before, history=history):
            registry.move_champion(name, target, history)
            log.info("%s: champion v%s -> v%s (promotion of v%s)", name, before, target, version)
        case promotion.WriteHistory(history=history):
            registry.write_history(name, history)
        case promotion.Sleep(seconds=seconds):
            time.sleep(seconds)
        case promotion.Release(reason=reason):
            registry.release_claim(name, version, reason)
        case _:
            raise AssertionError(f"unknown promotion request {request!r}")
    return None


def lineage_tags(
    cfg: Config,
    data_hash: str,
    parent_run_id: str,
    train_run_id: str,
    test_metric: float,
    metric_name: str = "accuracy",
) -> dict[str, str]:
    return {
        "shipyard.data_hash": data_hash,
        "shipyard.git_commit": git_commit(),
        "shipyard.config": json.dumps(cfg.model_dump(mode="json"), sort_keys=True)[:4900],
        "shipyard.parent_run_id": parent_run_id,
        "shipyard.train_run_id": train_run_id,
        f"shipyard.test_{metric_name}": f"{test_metric:.6f}",
        # v2: CSV integer feature columns are read as floats since issue 7, which changed their rows' hashes,
        # so a champion split by v1 gets the promotion gate's "trained with another split" warning
        "shipyard.split": f"v2 seed={cfg.data.seed} val={cfg.data.val_fraction} test={cfg.data.test_fraction}",
    }
