"""End to end on a local Ray: data -> tune -> train -> register/promote -> serve, checked in MLflow."""

import json
from pathlib import Path

import mlflow
import pytest
import torch

from shipyard.cli import run_pipeline
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "pipelines" / "configs" / "digits.yaml"

pytestmark = pytest.mark.ray


def overrides(d: dict) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


BAD = {"train.epochs": 1, "train.lr": 1e-5, "tune.enabled": False}
"""One epoch at a tiny learning rate, no search: a clearly worse model."""


def test_digits_promotes_only_better_models_and_serves_the_champion(ray_local, workdir, serve_port, tmp_path):
    # 1. a poor first model: the first version always becomes champion. Its worker count is the plan's choice
    auto = {"scaling.num_workers": "auto", "tune.max_concurrent_trials": "auto"}
    first = run_pipeline(DIGITS, overrides({**workdir, **BAD, **auto, "serve.port": serve_port}))
    assert first["promoted"] and first["model_version"] == "1" and first["served_version"] == "1"
    assert "trials" not in first  # tune.enabled=false: no search
    client = mlflow.MlflowClient(workdir["tracking.uri"])
    params = client.get_run(first["parent_run_id"]).data.params
    chosen = int(params["auto.scaling.num_workers"])  # the session's Ray has 2 CPUs: 1 or 2 fit
    assert chosen in (1, 2) and params["auto.tune.max_concurrent_trials"] == "2"  # 2 CPUs, 1 per trial
    check = client.get_run(first["train_run_id"]).data.tags["shipyard.auto_check"]  # said after the only epoch
    assert check.startswith(f"scaling.num_workers=auto chose {chosen} worker(s): measured ") and "agree" in check

    # 2. the real pipeline (search + training) beats it on the same test rows and takes the alias
    summary_path = tmp_path / "summary.json"
    good = run_pipeline(DIGITS, overrides({**TINY, **workdir, "serve.port": serve_port}), summary_json=summary_path)
    assert json.loads(summary_path.read_text())["model_version"] == "2"
    for key in (
        "test_accuracy",
        "model_name",
        "model_version",
        "promoted",
        "endpoint",
        "stage_seconds",
        "parent_run_id",
    ):
        assert key in good
    assert good["promoted"] and good["test_accuracy"] > max(0.85, first["test_accuracy"])
    assert good["previous_champion_accuracy"] == pytest.approx(first["test_accuracy"])
    assert good["endpoint"] == f"http://127.0.0.1:{serve_port}" and good["served_version"] == "2"
    assert good["endpoint_accuracy"] == pytest.approx(good["test_accuracy"], abs=0.005)
    assert set(good["stage_seconds"]) == {"ray", "data", "plan", "tune", "train", "serve"}

    # the per-epoch checkpoint holds weights, optimizer state, the epoch and the RNG state a resume restores
    # (loadable without pickles)
    state = torch.load(Path(good["checkpoint"]) / "state.pt", weights_only=True)
    assert set(state) == {"model", "optimizer", "epoch", "rng"} and state["epoch"] == 2

    client = mlflow.MlflowClient(workdir["tracking.uri"])
    parent = client.get_run(good["parent_run_id"])
    assert parent.data.params["train.epochs"] == "3"  # the resolved config is logged
    exp = [parent.info.experiment_id]
    children = client.search_runs(exp, f"tags.mlflow.parentRunId = '{good['parent_run_id']}'")
    assert sorted(r.data.tags.get("shipyard.kind") for r in children) == ["search", "train"]
    train_run = next(r for r in children if r.data.tags["shipyard.kind"] == "train")
    search_run = next(r for r in children if r.data.tags["shipyard.kind"] == "search")
    trials = client.search_runs(exp, f"tags.mlflow.parentRunId = '{search_run.info.run_id}'")
    assert len(trials) == 2 and {r.data.tags["shipyard.kind"] for r in trials} == {"trial"}
    history = client.get_metric_history(train_run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == [0, 1, 2]  # one point per epoch, logged by rank 0 only
    for key in (
        "train_loss",
        "val_loss",
        "epoch_time_s",
        "samples_per_s",
        "step_time_ms",
        "data_wait_ms",
        "predicted_step_time_ms",
    ):
        assert len(client.get_metric_history(train_run.info.run_id, key)) == 3
    # the plan, made before training from the session's calibrated profile, is beside the measurement
    predicted = float(train_run.data.params["plan.predicted_step_time_ms"])
    assert predicted > 0 and train_run.data.metrics["predicted_step_time_ms"] == pytest.approx(predicted, rel=1e-3)
    assert train_run.data.params["plan.device"].startswith("cpu:")
    assert 0 < train_run.data.metrics["step_time_ms"] < 1000
    for trial in trials:
        assert "train.lr" in trial.data.params and "val_accuracy" in trial.data.metrics
        assert trial.data.tags["shipyard.trial_status"]

    champion = client.get_model_version_by_alias("digits", "champion")
    assert str(champion.version) == "2"
    for tag in (
        "shipyard.data_hash",
        "shipyard.git_commit",
        "shipyard.config",
        "shipyard.parent_run_id",
        "shipyard.train_run_id",
        "shipyard.split",
    ):
        assert champion.tags[tag]
    assert champion.tags["shipyard.data_hash"] == good["data_hash"]
    assert champion.tags["shipyard.train_run_id"] == train_run.info.run_id
    assert "beats" in champion.tags["shipyard.promotion"]

    # 3. a worse run registers a version but leaves the alias, and the endpoint keeps serving the champion
    worse = run_pipeline(DIGITS, overrides({**workdir, **BAD, "serve.port": serve_port}))
    assert worse["model_version"] == "3" and not worse["promoted"]
    assert str(client.get_model_version_by_alias("digits", "champion").version) == "2"
    assert worse["served_version"] == "2"
    assert worse["endpoint_accuracy"] == pytest.approx(good["test_accuracy"], abs=0.005)
    assert "does not beat" in client.get_model_version("digits", "3").tags["shipyard.promotion"]


# The pipeline against a real `mlflow server` (champion alias, parent/child runs, served version through the
# server) is checked on the tabular pipeline's run: tests/ray/test_tabular.py, which shares its one run.
