"""Ray Tune over the training loop: every scheduler and search algorithm, num_samples, concurrency, and the
MLflow tree (one search run, one child run per trial, each with its outcome)."""
import mlflow
import pytest

from shipyard import tracking
from shipyard.config import load_config
from shipyard.data import load_splits
from shipyard.tuning import search

pytestmark = pytest.mark.ray

SPACE = {"train.lr": {"loguniform": [1e-4, 1e-2]}}


@pytest.fixture(scope="module")
def digits(ray_local):
    return load_splits(load_config().data)


def run_search(cfg, splits, name):
    tracking.setup(cfg)
    with mlflow.start_run(run_name=name) as parent:
        summary = search(cfg, splits, name, cfg.tracking_uri, parent.info.run_id)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return summary, runs


def test_one_trial_at_a_time_and_every_sample_runs(digits, workdir):
    cfg = load_config(None, {**workdir, "train.epochs": 2, "tune.num_samples": 3, "tune.max_concurrent_trials": 1,
                             "tune.scheduler": "fifo", "tune.space": SPACE})
    summary, runs = run_search(cfg, digits, "serial")
    assert summary.trials == 3 and len(runs) == 3
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 50, "trials overlapped although tune.max_concurrent_trials=1"
    assert summary.trial_status == {"completed": 3}
    assert {r.data.tags["shipyard.trial_status"] for r in runs} == {"completed"}
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_asha_stops_weak_trials_at_rungs(digits, workdir):
    cfg = load_config(None, {**workdir, "train.epochs": 6, "tune.num_samples": 4, "tune.grace_period": 1,
                             "tune.reduction_factor": 2, "tune.space": {"train.lr": {"loguniform": [1e-5, 1e-2]}}})
    summary, runs = run_search(cfg, digits, "asha")
    assert len(runs) == 4
    stopped = [r for r in runs if r.data.tags["shipyard.trial_status"].startswith("stopped at rung")]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    assert summary.trial_status.get("stopped at rung 1", 0) + summary.trial_status.get("stopped at rung 2", 0) \
        == len(stopped)
    assert 0 < summary.best_overrides["train.lr"] <= 1e-2


@pytest.mark.parametrize("overrides", [
    {"tune.scheduler": "pbt", "tune.perturbation_interval": 1},
    {"tune.scheduler": "asha", "tune.search": "optuna", "tune.grace_period": 1},
    {"tune.scheduler": "fifo", "tune.space": {"train.lr": {"grid": [1e-3, 3e-3]}}},
], ids=["pbt", "optuna-tpe", "grid"])
def test_every_scheduler_and_search_algorithm_runs(digits, workdir, overrides):
    cfg = load_config(None, {**workdir, "train.epochs": 3, "tune.num_samples": 2, "tune.space": SPACE,
                             **overrides})
    summary, runs = run_search(cfg, digits, overrides["tune.scheduler"])
    expected = 2 * (len(overrides["tune.space"]["train.lr"]["grid"]) if "grid" in str(overrides) else 1)
    assert summary.trials == expected and len(runs) == expected  # one MLflow child per trial, no duplicates
    assert all(r.data.tags.get("shipyard.trial_status") for r in runs)
    assert all("val_accuracy" in r.data.metrics and "train.lr" in r.data.params for r in runs)
    assert summary.best_metric > 0.3
