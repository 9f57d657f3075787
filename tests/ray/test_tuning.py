"""Ray Tune over the training loop: every scheduler and search algorithm, num_samples, concurrency, and the
MLflow tree (one search run, one child run per trial, each with its outcome)."""

import json
from pathlib import Path

import mlflow
import pytest

from shipyard import TrainingError, load_config
from shipyard.data.tables import load_table
from shipyard.track import runs as tracking
from shipyard.tune.search import search

pytestmark = pytest.mark.ray

SPACE = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits(ray_local):
    return load_table(load_config().data)


def run_search(cfg, splits, name):
    tracking.setup(cfg)
    with mlflow.start_run(run_name=name) as parent:
        summary = search(cfg, splits, name, cfg.tracking_uri, parent.info.run_id)
    client = mlflow.MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return summary, runs


def test_one_trial_at_a_time_and_every_sample_runs(digits, workdir):
    cfg = load_config(
        None,
        {
            **workdir,
            "train.epochs": 2,
            "tune.num_samples": 3,
            "tune.max_concurrent_trials": 1,
            "tune.scheduler": "fifo",
            "tune.space": SPACE,
        },
    )
    summary, runs = run_search(cfg, digits, "serial")
    assert summary.trials == 3 and len(runs) == 3
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 50, "trials overlapped although tune.max_concurrent_trials=1"
    assert summary.trial_status == {"completed": 3}
    assert {r.data.tags["shipyard.trial_status"] for r in runs} == {"completed"}
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_asha_stops_weak_trials_at_rungs(digits, workdir):
    cfg = load_config(
        None,
        {
            **workdir,
            "train.epochs": 6,
            "tune.num_samples": 4,
            "tune.grace_period": 1,
            "tune.reduction_factor": 2,
            "tune.space": {"train.lr": {"loguniform": [1e-5, 1e-2]}},
        },
    )
    summary, runs = run_search(cfg, digits, "asha")
    assert len(runs) == 4
    stopped = [r for r in runs if r.data.tags["shipyard.trial_status"].startswith("stopped at rung")]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    # rungs at epochs 1, 2, 4: a trial may stop at any of them, and the summary counts the same outcomes
    assert sum(v for k, v in summary.trial_status.items() if k.startswith("stopped at rung")) == len(stopped)
    assert {k for k in summary.trial_status} <= {
        "completed",
        "stopped at rung 1",
        "stopped at rung 2",
        "stopped at rung 3",
    }
    assert 0 < summary.best_overrides["train.lr"] <= 1e-2


@pytest.mark.parametrize(
    "overrides",
    [
        # pbt: test_pbt_on_the_digits_space_clones_trials_of_the_same_width runs it on the digits config's own space
        # hyperband: test_hyperband_stops_trials_of_the_later_brackets makes these checks on its 5-trial search
        {"tune.scheduler": "asha", "tune.search": "optuna", "tune.grace_period": 1},
        {"tune.scheduler": "fifo", "tune.space": {"train.lr": {"grid": [1e-3, 3e-3]}}},
    ],
    ids=["optuna-tpe", "grid"],
)
def test_every_scheduler_and_search_algorithm_runs(digits, workdir, overrides):
    cfg = load_config(None, {**workdir, "train.epochs": 3, "tune.num_samples": 2, "tune.space": SPACE, **overrides})
    summary, runs = run_search(cfg, digits, overrides["tune.scheduler"])
    expected = 2 * (len(overrides["tune.space"]["train.lr"]["grid"]) if "grid" in str(overrides) else 1)
    assert summary.trials == expected and len(runs) == expected  # one MLflow child per trial, no duplicates
    assert all(r.data.tags.get("shipyard.trial_status") for r in runs)
    assert all("val_accuracy" in r.data.metrics and "train.lr" in r.data.params for r in runs)
    assert summary.best_metric > 0.3


def test_pbt_on_the_digits_space_clones_trials_of_the_same_width(digits, workdir):
    # Tune's PBT is asynchronous: at each perturbation (every epoch here) a trial is ranked by the latest scores of
    # the trials alive beside it (finished ones are left out); the lowest clones the top one, if that one saved at
    # its own last perturbation. Trial start-up varies by seconds on a busy machine, so no setting makes an exploit
    # certain; these make one all but so. All 4 trials run at once (4 x 0.5 CPU): with 2 at a time, a trial whose
    # start lagged its peer's by the seconds its epochs take met no one. tune.seed 7 samples (train.lr,
    # model.hidden) = (0.0033, 256), (0.0051, 256), (0.00098, 64), (0.0069, 64): the third learns 3-7x slower and is
    # the lowest at most of its perturbations (with seed 0, two equally slow learners took turns at the bottom and
    # cloned once in a run). 10 epochs: 4-5 exploits in each of 3 runs, in each a trial that changed width.
    cfg = load_config(
        ROOT / "pipelines/configs/digits.yaml",
        {
            **workdir,
            "tune.scheduler": "pbt",
            "tune.perturbation_interval": 1,
            "tune.num_samples": 4,
            "tune.max_concurrent_trials": 4,
            "tune.cpus_per_trial": 0.5,
            "tune.seed": 7,
            "train.epochs": 10,
        },
    )
    assert set(cfg.tune.space) == {"train.lr", "model.hidden"}
    summary, runs = run_search(cfg, digits, "pbt")
    assert summary.trials == 4 and len(runs) == 4
    assert summary.trial_status == {"completed": 4}, summary.trial_status
    assert {r.data.tags["shipyard.trial_status"] for r in runs} == {"completed"}
    # Tune's record of each exploit: pbt_policy_<target trial id>.txt, one JSON line per exploit that led to it:
    # [target tag, source tag, target iteration, source iteration, source config, target's new config]
    policies = {
        p.stem.removeprefix("pbt_policy_"): [json.loads(line) for line in p.read_text().splitlines()]
        for p in Path(summary.experiment_path).glob("pbt_policy_*.txt")
    }
    assert policies, "no trial continued from another's checkpoint"
    final = {h.trial_id: h.config for h in summary.histories}
    client = mlflow.MlflowClient(cfg.tracking_uri)
    for target, steps in policies.items():
        *_, source_config, new_config = steps[-1]
        assert new_config["model.hidden"] == source_config["model.hidden"]  # the width travels with the weights
        assert final[target]["model.hidden"] == source_config["model.hidden"]
        # the trial's MLflow run logs the config it continued with (pbt.* metrics, at each restart)
        run = next(r for r in runs if r.data.tags["trial_name"].endswith(target))
        assert client.get_metric_history(run.info.run_id, "pbt.model.hidden")[-1].value == source_config["model.hidden"]
    assert summary.best_metric > 0.8


def test_a_search_whose_trials_mostly_errored_fails_naming_the_first_error_and_the_logs(digits, workdir):
    # a transformer's width must be a multiple of its 4 heads: the two trials of width 30 error as they build it
    cfg = load_config(
        None,
        {
            **workdir,
            "train.epochs": 1,
            "tune.num_samples": 1,
            "tune.scheduler": "fifo",
            "model.name": "transformer",
            "tune.space": {"model.hidden": {"grid": [32, 30, 30]}},
        },
    )
    with pytest.raises(TrainingError) as err:
        run_search(cfg, digits, "errored")
    message = str(err.value)
    assert message.startswith(
        "the search failed: 2 of 3 trials errored; the first: ConfigError: "
        "model.name=transformer: model.hidden (30) must be a multiple of model.options.heads (4)"
    )
    assert f"Trial logs: {Path(cfg.storage_dir) / 'errored'}" in message


def test_hyperband_stops_trials_of_the_later_brackets(digits, workdir):
    # max_t 3, reduction 3: bracket 1 runs 2 trials to 3 epochs, bracket 2 starts 3 trials and keeps 1 after epoch 1
    cfg = load_config(
        None,
        {
            **workdir,
            "train.epochs": 3,
            "tune.num_samples": 5,
            "tune.scheduler": "hyperband",
            "tune.space": {"train.lr": {"loguniform": [1e-5, 1e-2]}},
        },
    )
    summary, runs = run_search(cfg, digits, "hyperband")
    assert summary.trials == 5 and len(runs) == 5
    statuses = sorted(r.data.tags["shipyard.trial_status"] for r in runs)
    assert statuses == ["completed"] * 3 + ["stopped at rung 1 (epoch 1)"] * 2, statuses
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3 + ["KILLED"] * 2
    # what test_every_scheduler_and_search_algorithm_runs checks for the other schedulers
    assert all("val_accuracy" in r.data.metrics and "train.lr" in r.data.params for r in runs)
    assert summary.best_metric > 0.3


def test_trials_as_two_worker_train_jobs_with_plots_and_pruned_checkpoints(digits, workdir):
    cfg = load_config(
        None,
        {
            **workdir,
            "train.epochs": 3,
            "tune.num_samples": 2,
            "tune.workers_per_trial": 2,
            "tune.cpus_per_trial": 2,
            "tune.keep_checkpoints": 1,
            "tune.space": SPACE,
        },
    )
    summary, runs = run_search(cfg, digits, "ddp")
    assert summary.trials == 2 and len(runs) == 2
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert spans[1][0] >= spans[0][1] - 50, "a 2-CPU trial fits once on 2 CPUs: trials must not overlap"
    assert all(r.data.metrics["val_accuracy"] > 0.3 for r in runs)
    assert [len(h.epochs) for h in summary.histories] == [3, 3]
    client = mlflow.MlflowClient(cfg.tracking_uri)
    parent = runs[0].data.tags["mlflow.parentRunId"]
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert plots == {"plots/learning_curves.png", "plots/objective_vs_params.png"}
    assert client.get_run(parent).data.metrics["checkpoint_disk_mb"] == summary.checkpoint_disk_mb > 0
    # the Train jobs checkpoint inside the search's folder, and only the best one is left
    kept = [str(p) for p in Path(summary.experiment_path).rglob("checkpoint_*") if p.is_dir()]
    assert kept == [summary.best_checkpoint] and summary.checkpoints_kept == 1


def test_checkpoints_beyond_the_best_k_are_deleted_but_never_the_best_trials(digits, workdir):
    cfg = load_config(
        None,
        {
            **workdir,
            "train.epochs": 4,
            "tune.num_samples": 4,
            "tune.scheduler": "fifo",
            "tune.keep_checkpoints": 2,
            "tune.space": SPACE,
        },
    )
    summary, _ = run_search(cfg, digits, "keep")
    kept = sorted(str(p) for p in Path(summary.experiment_path).glob("*/checkpoint_*"))
    assert summary.best_checkpoint in kept and 1 <= len(kept) <= 3 and summary.checkpoints_kept == len(kept)
