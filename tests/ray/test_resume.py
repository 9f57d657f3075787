"""Kill the driver (SIGKILL) mid-search, re-run with --resume: the search finishes with num_samples trials,
finished trials are not rerun, unfinished ones go on from their checkpoint, and MLflow holds no duplicates."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


def pipeline(address, workdir, summary, settings, *extra):
    args = [f"{k}={v}" for k, v in {**workdir, **settings}.items()] + [
        "tune.grace_period=4", "tune.reduction_factor=2", "serve.enabled=false", "scaling.num_workers=1"]
    cmd = [sys.executable, "-m", "pipelines.digits", *args, "--address", address, "--summary-json", str(summary),
           *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("settings", [
    {"model.name": "cnn", "train.epochs": 10, "tune.num_samples": 4},
    # trials as 2-worker Train jobs, one at a time: they resume from their Train job's own checkpoint
    {"train.epochs": 8, "tune.num_samples": 3, "tune.workers_per_trial": 2, "tune.cpus_per_trial": 2},
], ids=["one-process-trials", "two-worker-trials"])
def test_killed_search_resumes_without_rerunning_or_duplicating(ray_local, workdir, tmp_path, settings):
    address = ray_local.get_runtime_context().gcs_address
    summary = tmp_path / "summary.json"
    n = settings["tune.num_samples"]
    first = pipeline(address, workdir, summary, settings)
    finished, seen = None, []
    deadline = time.time() + 300
    for line in first.stdout:  # kill as soon as one trial has finished and others are mid-way
        seen.append(line)
        if f"shipyard.tuning: trial 1/{n}" in line:
            finished = line.split(f"trial 1/{n} ")[1].split(":")[0]
            time.sleep(4.0)  # past Tune's next experiment snapshot (TUNE_GLOBAL_CHECKPOINT_S=1), which records it
            break
        assert time.time() < deadline, "no trial finished in 300 s:\n" + "".join(seen[-30:])
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert finished, "".join(seen[-30:])
    assert not summary.exists()

    second = pipeline(address, workdir, summary, settings, "--resume")
    out, _ = second.communicate(timeout=600)
    (tmp_path / "resumed.log").write_text(out)  # kept by pytest for a post-mortem
    assert second.returncode == 0, out[-4000:]
    assert "resuming the search saved at" in out
    result = json.loads(summary.read_text())
    assert result["search"]["trials"] == n and sum(result["trials"].values()) == n
    assert result["test_accuracy"] > 0.8 and result["model_version"] == "1"

    client = mlflow.MlflowClient(workdir["tracking.uri"])
    exp = client.get_experiment_by_name("shipyard-digits").experiment_id
    parents = client.search_runs([exp], "tags.`shipyard.kind` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.run_id == result["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    searches = client.search_runs([exp], "tags.`shipyard.kind` = 'search'")
    assert len(searches) == 1
    trials = client.search_runs([exp], f"tags.mlflow.parentRunId = '{searches[0].info.run_id}'")
    assert len(trials) == n, [t.data.tags.get("trial_name") for t in trials]  # one run per trial, no duplicates
    assert all(t.data.tags.get("shipyard.trial_status") for t in trials)
    for t in trials:
        epochs = [m.value for m in client.get_metric_history(t.info.run_id, "epochs_done")]
        assert epochs.count(1) == 1, f"{t.data.tags['trial_name']} started from scratch twice: {epochs}"
        if t.data.tags["trial_name"].endswith(finished):  # finished before the kill: not run again
            assert len(epochs) == len(set(epochs)), epochs
    kept = [p for p in Path(result["search"]["experiment_path"]).rglob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(kept) <= 3 + 1 and os.path.isdir(result["search"]["best_checkpoint"])
