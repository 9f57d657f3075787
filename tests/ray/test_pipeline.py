"""End to end on a local Ray: data -> tune -> train -> register/promote -> serve, checked in MLflow."""
from pathlib import Path

import mlflow
import pytest

from shipyard.cli import run_pipeline

from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "pipelines" / "configs" / "digits.yaml"

pytestmark = pytest.mark.ray


def overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def test_digits_end_to_end_then_worse_run_keeps_champion(ray_local, workdir, serve_port, tmp_path):
    summary_path = tmp_path / "summary.json"
    first = run_pipeline(DIGITS, overrides({**TINY, **workdir, "serve.port": serve_port}),
                         summary_json=summary_path)
    assert summary_path.exists()
    for key in ("test_accuracy", "model_name", "model_version", "promoted", "endpoint", "stage_seconds",
                "parent_run_id"):
        assert key in first
    assert first["promoted"] and first["model_version"] == "1"
    assert first["test_accuracy"] > 0.85
    assert first["endpoint"] == f"http://127.0.0.1:{serve_port}"
    assert first["served_version"] == "1"
    assert first["endpoint_accuracy"] == pytest.approx(first["test_accuracy"], abs=0.005)
    assert set(first["stage_seconds"]) == {"ray", "data", "tune", "train", "serve"}

    client = mlflow.MlflowClient(workdir["tracking.uri"])
    parent = client.get_run(first["parent_run_id"])
    assert parent.data.params["train.epochs"] == "3"  # the resolved config is logged
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{first['parent_run_id']}'")
    kinds = sorted(r.data.tags.get("shipyard.kind") for r in children)
    assert kinds == ["train", "trial", "trial"]
    train_run = next(r for r in children if r.data.tags["shipyard.kind"] == "train")
    history = client.get_metric_history(train_run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1, 2]  # one point per epoch, logged by rank 0 only
    for key in ("train_loss", "val_loss", "epoch_time_s", "samples_per_s"):
        assert len(client.get_metric_history(train_run.info.run_id, key)) == 3
    for trial in (r for r in children if r.data.tags["shipyard.kind"] == "trial"):
        assert "train.lr" in trial.data.params and "val_accuracy" in trial.data.metrics

    champion = client.get_model_version_by_alias("digits", "champion")
    assert str(champion.version) == "1"
    for tag in ("shipyard.data_hash", "shipyard.git_commit", "shipyard.config", "shipyard.parent_run_id",
                "shipyard.train_run_id"):
        assert champion.tags[tag]
    assert champion.tags["shipyard.data_hash"] == first["data_hash"]

    # a clearly worse run: one epoch at a tiny learning rate, no search
    worse = run_pipeline(DIGITS, overrides({**workdir, "train.epochs": 1, "train.lr": 1e-5, "tune.enabled": False,
                                            "serve.port": serve_port}))
    assert worse["model_version"] == "2" and not worse["promoted"]
    assert worse["test_accuracy"] < first["test_accuracy"]
    assert str(client.get_model_version_by_alias("digits", "champion").version) == "1"
    assert worse["served_version"] == "1"  # the endpoint serves the champion, not the rejected candidate
    assert "does not beat" in client.get_model_version("digits", "2").tags["shipyard.promotion"]


def test_pipeline_against_a_real_mlflow_server(ray_local, mlflow_server, tmp_path, serve_port):
    summary = run_pipeline(DIGITS, overrides({**TINY, "tune.enabled": False, "tracking.uri": mlflow_server,
                                              "storage_path": tmp_path / "results", "serve.port": serve_port}))
    assert summary["promoted"] and summary["served_version"] == summary["model_version"]
    client = mlflow.MlflowClient(mlflow_server)
    assert str(client.get_model_version_by_alias("digits", "champion").version) == summary["model_version"]
    run = client.get_run(summary["train_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
