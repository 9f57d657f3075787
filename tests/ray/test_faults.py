"""Faults during training: a worker killed by pid, the driver killed (SIGKILL), the MLflow server stopped.
Nothing done is lost, nothing is done twice, and the run ends as accurate as an undisturbed one."""
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
import torch

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 8
QUICK = {"train.epochs": EPOCHS, "scaling.num_workers": 2, "tune.enabled": False, "serve.enabled": False,
         "plan.enabled": False}


class Pipeline:
    """`python -m pipelines.digits` on the test session's Ray, its output collected line by line."""

    def __init__(self, address: str, settings: dict, summary: Path, *extra: str):
        args = [f"{k}={v}" for k, v in settings.items()]
        self.summary = summary
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.digits", *args, "--address", address, "--summary-json", str(summary),
             *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log)
            if found:
                return found
            assert self.proc.poll() is None or self.reader.is_alive(), f"exited before {pattern!r}:\n{self.log[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} in {timeout_s} s:\n{self.log[-3000:]}")

    def finish(self, timeout_s: float = 400) -> dict:
        self.proc.wait(timeout=timeout_s)
        self.reader.join(timeout=10)
        assert self.proc.returncode == 0, self.log[-4000:]
        return json.loads(self.summary.read_text())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)


def train_epochs_logged(tracking_uri: str, run_id: str) -> list[float]:
    return [m.value for m in mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "epochs_done")]


def training_worker_pids(ray) -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                       filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


@pytest.fixture(scope="module")
def outage(ray_local, hardware_profile, tmp_path_factory):
    """The pipeline's training with its MLflow server stopped after epoch 2 and back after epoch 4. The outage
    never touches training, so this run is also the undisturbed baseline the worker-kill test compares with."""
    from shipyard.localcluster import MlflowServer

    tmp = tmp_path_factory.mktemp("outage")
    address = ray_local.get_runtime_context().gcs_address
    with MlflowServer(tmp / "server") as server:
        run = Pipeline(address, {"storage_path": str(tmp / "results"), "plan.profile": str(hardware_profile),
                                 **QUICK, "tracking.uri": server.url}, tmp / "summary.json")
        run.wait_for(rf"epoch 2/{EPOCHS} ")
        server.stop()
        run.wait_for(r"MLflow tracking server unreachable")
        run.wait_for(rf"epoch 4/{EPOCHS} ")  # training goes on without it
        server.start()  # the same port and store
        summary = run.finish()
        epochs = train_epochs_logged(server.url, summary["train_run_id"])
        accuracy = mlflow.MlflowClient(server.url).get_metric_history(summary["train_run_id"], "val_accuracy")
    return {"summary": summary, "log": run.log, "epochs": epochs, "val_accuracy": accuracy}


def test_training_outlives_a_tracking_server_outage_and_its_metrics_arrive(outage):
    assert sorted(set(outage["epochs"])) == list(range(1, EPOCHS + 1)), outage["epochs"]  # the outage's too
    assert len(outage["val_accuracy"]) == EPOCHS
    # delivered by rank 0's queue once the server was back, or (had training ended first) by the driver
    assert re.search(r"MLflow tracking server back after|delivered \d+ MLflow calls that training queued",
                     outage["log"]), outage["log"][-3000:]
    assert "LOST" not in outage["log"]
    state = torch.load(Path(outage["summary"]["checkpoint"]) / "state.pt", weights_only=True)
    assert state["epoch"] == EPOCHS - 1 and outage["summary"]["test_accuracy"] > 0.8


def test_a_killed_training_worker_restarts_from_its_last_checkpoint_and_ends_as_accurate(ray_local, workdir,
                                                                                         outage, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    calm = outage["summary"]  # the same seed, data, workers and epochs, and no worker lost
    hit = Pipeline(address, {**workdir, **QUICK, "train.max_failures": 1}, tmp_path / "hit.json")
    hit.wait_for(rf"epoch 3/{EPOCHS} ")
    workers = training_worker_pids(ray_local)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # mid-epoch 4: the epoch-3 checkpoint is the latest
    hit.wait_for(r"training on 2 worker\(s\), \d+ rows each per step, epochs [2-9]")  # the new worker group
    restarted = training_worker_pids(ray_local)
    summary = hit.finish()

    done_before = max(int(n) for n in re.findall(rf"epoch (\d+)/{EPOCHS} ", hit.log.split("resuming from")[0]))
    resumed_after = int(re.search(r"resuming from the checkpoint of epoch (\d+)", hit.log)[1]) + 1  # 1-based
    print(f"worker killed after epoch {done_before}; resumed after epoch {resumed_after}; test accuracy "
          f"{summary['test_accuracy']:.4f} (undisturbed {calm['test_accuracy']:.4f})")
    assert done_before - resumed_after <= 1, f"lost {done_before - resumed_after} epochs"
    assert len(restarted) == 2 and set(restarted).isdisjoint(workers)  # a new worker group did the rest
    assert summary["test_accuracy"] == pytest.approx(calm["test_accuracy"], abs=0.01)
    epochs = train_epochs_logged(workdir["tracking.uri"], summary["train_run_id"])
    assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)) and epochs.count(1) == 1, epochs
    state = torch.load(Path(summary["checkpoint"]) / "state.pt", weights_only=True)
    assert state["epoch"] == EPOCHS - 1


def test_a_pipeline_killed_while_training_resumes_without_redoing_work(ray_local, workdir, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    settings = {**workdir, **QUICK, "tune.enabled": True, "tune.num_samples": 2, "tune.grace_period": 2,
                "tune.max_concurrent_trials": 2}
    first = Pipeline(address, settings, tmp_path / "summary.json")
    first.wait_for(r"\]\s+train\s")  # the search is over: the final training has begun
    first.wait_for(rf"epoch 4/{EPOCHS} ")
    time.sleep(0.5)
    first.kill()

    second = Pipeline(address, settings, tmp_path / "summary.json", "--resume")
    summary = second.finish()
    assert "resuming the search saved at" in second.log and "resuming from the checkpoint of epoch" in second.log
    assert re.search(r"resuming from the checkpoint of epoch [3-9]", second.log), second.log[-3000:]

    client = mlflow.MlflowClient(workdir["tracking.uri"], registry_uri=workdir["tracking.uri"])
    experiment = client.get_experiment_by_name("shipyard-digits").experiment_id
    runs = client.search_runs([experiment], "")
    kinds = sorted(r.data.tags.get("shipyard.kind") for r in runs)
    assert kinds == ["pipeline", "search", "train", "trial", "trial"], kinds  # nothing twice
    assert all(r.info.status == "FINISHED" for r in runs if r.data.tags.get("shipyard.kind") != "trial")
    for trial in (r for r in runs if r.data.tags.get("shipyard.kind") == "trial"):  # the search was not rerun
        epochs = train_epochs_logged(workdir["tracking.uri"], trial.info.run_id)
        assert len(epochs) == len(set(epochs)), epochs
    epochs = train_epochs_logged(workdir["tracking.uri"], summary["train_run_id"])
    assert sorted(set(epochs)) == list(range(1, EPOCHS + 1)), epochs
    assert epochs.count(1) == 1 and len(epochs) - len(set(epochs)) <= 1, epochs  # at most the epoch in flight
    versions = client.search_model_versions("name = 'digits'")
    assert [str(v.version) for v in versions] == ["1"] and summary["model_version"] == "1"
    assert str(client.get_model_version_by_alias("digits", "champion").version) == "1"


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (two or three checkpoints); skipped where this user may not mount (CI without root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk test runs where it can")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_fails_clearly_and_resume_goes_on_from_an_intact_checkpoint(ray_local, workdir, tmp_path,
                                                                               small_disk):
    address = ray_local.get_runtime_context().gcs_address
    settings = {**workdir, **QUICK, "scaling.num_workers": 1, "train.epochs": 12, "train.max_failures": 1,
                "storage_path": str(small_disk / "results")}
    full = Pipeline(address, settings, tmp_path / "summary.json")
    full.proc.wait(timeout=300)
    full.reader.join(timeout=10)
    assert full.proc.returncode == 2, full.log[-3000:]
    assert re.search(r"ERROR shipyard: training run \S+ failed: the disk holding storage_path .* is full\. The "
                     r"checkpoints saved so far are intact there", full.log), full.log[-3000:]
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space freed

    resumed = Pipeline(address, settings, tmp_path / "summary.json", "--resume")
    summary = resumed.finish()
    assert re.search(r"resuming from the checkpoint of epoch \d", resumed.log), resumed.log[-3000:]
    client = mlflow.MlflowClient(workdir["tracking.uri"], registry_uri=workdir["tracking.uri"])
    experiment = client.get_experiment_by_name("shipyard-digits").experiment_id
    assert sorted(r.data.tags.get("shipyard.kind") for r in client.search_runs([experiment], "")) == [
        "pipeline", "train"]
    epochs = train_epochs_logged(workdir["tracking.uri"], summary["train_run_id"])
    assert sorted(set(epochs)) == list(range(1, 13)) and epochs.count(1) == 1, epochs
    assert summary["model_version"] == "1" and summary["test_accuracy"] > 0.9
