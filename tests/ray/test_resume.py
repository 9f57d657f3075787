"""Kill the driver (SIGKILL) mid-search, re-run with --resume: the search finishes with num_samples trials,
finished trials are not rerun, unfinished ones go on from their checkpoint, and MLflow holds no duplicates.

The kill lands at a point the test controls: the trials train the gated MLP (tests/fault_hooks.py); the first
trial to reach epoch 3 passes and finishes, every later one waits there, so when the test kills the driver one
trial has finished and the others are held mid-way (epoch 3 of N), however fast the machine is."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from tests.fault_hooks import Gate
from tests.helpers import report

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


def pipeline(address, workdir, summary, settings, *extra):
    args = [f"{k}={v}" for k, v in {**workdir, **settings}.items()] + [
        "model.name=tests.fault_hooks:gated_mlp",
        "tune.grace_period=4",
        "tune.reduction_factor=2",
        "serve.enabled=false",
        "scaling.num_workers=1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "pipelines.digits",
        *args,
        "--address",
        address,
        "--summary-json",
        str(summary),
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> None:
    """A driver still running when its test ends: killed and waited for (Ray then ends its job)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    "settings",
    [
        {"train.epochs": 10, "tune.num_samples": 4},
        # trials as 2-worker Train jobs, one at a time: they resume from their Train job's own checkpoint
        {"train.epochs": 8, "tune.num_samples": 3, "tune.workers_per_trial": 2, "tune.cpus_per_trial": 2},
    ],
    ids=["one-process-trials", "two-worker-trials"],
)
def test_killed_search_resumes_without_rerunning_or_duplicating(ray_local, workdir, tmp_path, settings, request):
    address = ray_local.get_runtime_context().gcs_address
    summary = tmp_path / "summary.json"
    n = settings["tune.num_samples"]
    gate = Gate(tmp_path / "gate")
    settings = {**settings, "model.options": gate.options}
    gate.hold(3, passes=1)  # before ASHA's first rung (grace period 4): no trial held there can have been stopped
    first = pipeline(address, workdir, summary, settings)
    request.addfinalizer(lambda: stop(first))  # a failure midway: stop it by pid
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    gate.wait(3, lambda: first.poll() is None, what=lambda: "".join(lines))  # a trial passed epoch 3
    deadline = time.monotonic() + 300
    while not (re.search(rf"shipyard.tune.search: trial 1/{n} ", "".join(lines)) and len(gate.arrivals(3)) >= 2):
        assert first.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
        time.sleep(0.1)
    finished = re.search(rf"trial 1/{n} (\S+):", "".join(lines))[1]
    experiment = next(Path(workdir["storage_path"]).glob("digits-tune-*"))
    deadline = time.monotonic() + 60
    while not _saved_as_finished(experiment, finished):  # Tune's next experiment snapshot (every 1 s) records it
        assert time.monotonic() < deadline, f"Tune's snapshot never recorded {finished} as finished"
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    reader.join(timeout=10)
    held = [a for a in gate.arrivals(3)][1:]  # all but the first arrival waited at epoch 3
    report(
        f"driver killed with trial {finished} finished and {len(held)} trial(s) held during epoch 3/"
        f"{settings['train.epochs']}"
    )
    assert held and not gate.arrivals(4)[1:], gate.arrivals()  # only the passed trial went beyond epoch 3
    assert not summary.exists()
    gate.release(3)

    second = pipeline(address, workdir, summary, settings, "--resume")
    request.addfinalizer(lambda: stop(second))
    out, _ = second.communicate(timeout=600)
    (tmp_path / "resumed.log").write_text(out)  # kept by pytest for a post-mortem
    backfilled = re.findall(r"(\S+): logged epochs ([\d, ]+) from its checkpoint", out)
    report(f"epochs logged from trials' checkpoints after the resume: {backfilled or 'none (every result arrived)'}")
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
        assert sorted(set(epochs)) == list(range(1, len(set(epochs)) + 1)) and epochs.count(1) == 1, (
            f"{t.data.tags['trial_name']}: epochs_done {epochs} (each epoch from 1 on, the first once)"
        )
        if finished in t.data.tags["trial_name"]:  # finished before the kill: not run again
            assert len(epochs) == len(set(epochs)), epochs
    kept = [p for p in Path(result["search"]["experiment_path"]).rglob("checkpoint_*") if p.is_dir()]
    assert 1 <= len(kept) <= 3 + 1 and os.path.isdir(result["search"]["best_checkpoint"])


def _saved_as_finished(experiment: Path, trial_id: str) -> bool:
    """Whether Tune's latest experiment snapshot (experiment_state-*.json) records the trial as TERMINATED."""
    for state in sorted(experiment.glob("experiment_state-*.json"))[-1:]:
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError, OSError):  # being rewritten
            return False
        for trial_json, _ in trials:
            trial = json.loads(trial_json)
            if trial.get("trial_id") == trial_id or trial_id.endswith(str(trial.get("trial_id"))):
                return trial.get("status") == "TERMINATED"
    return False
