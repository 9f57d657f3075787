"""Ray Tune over the training loop: num_samples, max_concurrent_trials and ASHA are honoured."""
import mlflow
import pytest

from shipyard import tracking
from shipyard.config import load_config
from shipyard.data import load_splits
from shipyard.tuning import search

pytestmark = pytest.mark.ray


def trial_runs(cfg, overrides, name):
    tracking.setup(cfg)
    splits = load_splits(cfg.data)
    with mlflow.start_run(run_name=name) as parent:
        summary = search(cfg, splits, name, cfg.tracking_uri, parent.info.run_id)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return summary, runs


def test_one_trial_at_a_time_and_every_sample_runs(ray_local, workdir):
    cfg = load_config(None, {**workdir, "train.epochs": 2, "tune.num_samples": 3, "tune.max_concurrent_trials": 1,
                             "tune.scheduler": "fifo",
                             "tune.space": {"train.lr": {"loguniform": [1e-3, 1e-2]}}})
    summary, runs = trial_runs(cfg, {}, "serial")
    assert summary.trials == 3 and len(runs) == 3
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 50, "trials overlapped although tune.max_concurrent_trials=1"
    assert summary.trial_status == {"completed": 3}


def test_asha_stops_weak_trials_early(ray_local, workdir):
    cfg = load_config(None, {**workdir, "train.epochs": 6, "tune.num_samples": 4, "tune.grace_period": 1,
                             "tune.reduction_factor": 2,
                             "tune.space": {"train.lr": {"loguniform": [1e-5, 1e-2]}}})
    summary, runs = trial_runs(cfg, {}, "asha")
    assert len(runs) == 4
    assert summary.trial_status.get("stopped_early", 0) >= 1
    assert 0 < summary.best_overrides["train.lr"] <= 1e-2
