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


def pipeline(address, workdir, summary, *extra):
    args = [f"{k}={v}" for k, v in workdir.items()] + [
        "model.name=cnn", "train.epochs=10", "tune.num_samples=4", "tune.grace_period=4", "tune.reduction_factor=2",
        "serve.enabled=false", "scaling.num_workers=1"]
    cmd = [sys.executable, "-m", "pipelines.digits", *args, "--address", address, "--summary-json", str(summary),
           *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_search_resumes_without_rerunning_or_duplicating(ray_local, workdir, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    summary = tmp_path / "summary.json"
    first = pipeline(address, workdir, summary)
    finished, seen = None, []
    deadline = time.time() + 300
    for line in first.stdout:  # kill as soon as one trial has finished and others are mid-way
        seen.append(line)
        if "shipyard.tuning: trial 1/4" in line:
            finished = line.split("trial 1/4 ")[1].split(":")[0]
            time.sleep(1.0)
            break
        assert time.time() < deadline, "no trial finished in 300 s:\n" + "".join(seen[-30:])
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert finished, "".join(seen[-30:])
    assert not summary.exists()

    second = pipeline(address, workdir, summary, "--resume")
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-4000:]
    assert "resuming the search saved at" in out
    result = json.loads(summary.read_text())
    assert result["search"]["trials"] == 4 and sum(result["trials"].values()) == 4
    assert result["test_accuracy"] > 0.8 and result["model_version"] == "1"

    client = mlflow.MlflowClient(workdir["tracking.uri"])
    exp = client.get_experiment_by_name("shipyard-digits").experiment_id
    parents = client.search_runs([exp], "tags.`shipyard.kind` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.run_id == result["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    searches = client.search_runs([exp], "tags.`shipyard.kind` = 'search'")
    assert len(searches) == 1
    trials = client.search_runs([exp], f"tags.mlflow.parentRunId = '{searches[0].info.run_id}'")
    assert len(trials) == 4, [t.data.tags.get("trial_name") for t in trials]  # one run per trial, no duplicates
    assert all(t.data.tags.get("shipyard.trial_status") for t in trials)
    for t in trials:
        iterations = [m.value for m in client.get_metric_history(t.info.run_id, "training_iteration")]
        assert iterations.count(1) == 1, f"{t.data.tags['trial_name']} started from scratch twice: {iterations}"
        if t.data.tags["trial_name"].endswith(finished):  # finished before the kill: not run again
            assert len(iterations) == len(set(iterations)), iterations
    kept = [p for p in Path(result["search"]["best_checkpoint"]).parent.parent.rglob("checkpoint_*")]
    assert 1 <= len(kept) <= 3 + 1 and os.path.isdir(result["search"]["best_checkpoint"])
