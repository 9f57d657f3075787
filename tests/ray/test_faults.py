"""Faults during training: a worker killed by pid, the driver killed (SIGKILL), the MLflow server stopped.
Nothing done is lost, nothing is done twice, and the run ends as accurate as an undisturbed one.

Each fault lands at a point the test controls, whatever the machine's speed: the runs train the gated MLP
(tests/fault_hooks.py), which waits at the first step of an epoch the test holds, and each test prints and
asserts the epoch its fault landed in."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from tests.fault_hooks import Gate
from tests.helpers import report

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 8
QUICK = {
    "train.epochs": EPOCHS,
    "scaling.num_workers": 2,
    "tune.enabled": False,
    "serve.enabled": False,
    "plan.enabled": False,
}


def gated(settings: dict, gate: Gate) -> dict:
    """The run trains the gated MLP: the built-in MLP that waits at the epochs `gate` holds."""
    return {**settings, "model.name": "tests.fault_hooks:gated_mlp", "model.options": gate.options}


def wait_logged(tracking_uri: str, epoch: int, run: "Pipeline", timeout_s: float = 60) -> None:
    """Until the train run holds epoch `epoch`'s metrics (rank 0 sends them from a thread, a moment later)."""
    client = mlflow.MlflowClient(tracking_uri)
    deadline = time.monotonic() + timeout_s
    while True:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "tags.`shipyard.kind` = 'train'"
        )
        if runs and epoch in train_epochs_logged(tracking_uri, runs[0].info.run_id):
            return
        assert run.alive() and time.monotonic() < deadline, f"epoch {epoch} never logged:\n{run.log[-3000:]}"
        time.sleep(0.2)


class Pipeline:
    """`python -m pipelines.digits` on the test session's Ray, its output collected line by line. One still
    running when its test ends (a failure midway) is killed by pid (stop_pipelines_left_running)."""

    started: list["Pipeline"] = []

    def __init__(self, address: str, settings: dict, summary: Path, *extra: str):
        Pipeline.started.append(self)
        args = [f"{k}={v}" for k, v in settings.items()]
        self.summary = summary
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipelines.digits",
                *args,
                "--address",
                address,
                "--summary-json",
                str(summary),
                *extra,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
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

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_gate(self, gate: Gate, epoch: int, **kwargs) -> dict:
        return gate.wait(epoch, self.alive, what=lambda: self.log, **kwargs)

    def finish(self, timeout_s: float = 400) -> dict:
        self.proc.wait(timeout=timeout_s)
        self.reader.join(timeout=10)
        assert self.proc.returncode == 0, self.log[-4000:]
        return json.loads(self.summary.read_text())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)


@pytest.fixture(autouse=True)
def stop_pipelines_left_running():
    """A test that fails midway would leave its pipeline training on the session's Ray, slowing and breaking
    the tests after it: every pipeline still running when a test ends is killed (its driver: Ray ends its job)."""
    yield
    for run in Pipeline.started:
        if run.alive():
            run.kill()
            print(f"killed pipeline pid {run.proc.pid}, still running when its test ended")
    Pipeline.started.clear()


def train_epochs_logged(tracking_uri: str, run_id: str) -> list[float]:
    return [m.value for m in mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "epochs_done")]


def training_worker_pids(ray) -> list[int]:
    from ray.util.state import list_actors

    return [
        a.pid
        for a in list_actors(
            address=ray.get_runtime_context().gcs_address,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        )
    ]


@pytest.fixture(scope="module")
def outage(ray_local, hardware_profile, tmp_path_factory):
    """The pipeline's training with its MLflow server stopped during epoch 3 and back during epoch 5. The outage
    never touches training, so this run is also the undisturbed baseline the worker-kill test compares with."""
    from harness.processes import MlflowServer

    tmp = tmp_path_factory.mktemp("outage")
    address = ray_local.get_runtime_context().gcs_address
    gate = Gate(tmp / "gate")
    gate.hold(3)
    gate.hold(5)
    with MlflowServer(tmp / "server") as server, contextlib.ExitStack() as stop:
        run = Pipeline(
            address,
            gated(
                {
                    "storage_path": str(tmp / "results"),
                    "plan.profile": str(hardware_profile),
                    **QUICK,
                    "tracking.uri": server.url,
                },
                gate,
            ),
            tmp / "summary.json",
        )
        stop.callback(lambda: run.alive() and run.kill())  # a failure in a fixture is no test's: stop it here
        run.wait_gate(gate, 3)
        server.stop()
        gate.release(3)
        run.wait_for(r"MLflow tracking server unreachable")  # epoch 3's metrics found no server
        run.wait_gate(gate, 5)  # training went on without it
        stopped, back = 3, gate.latest_epoch()
        server.start()  # the same port and store
        gate.release(5)
        summary = run.finish()
        epochs = train_epochs_logged(server.url, summary["train_run_id"])
        accuracy = mlflow.MlflowClient(server.url).get_metric_history(summary["train_run_id"], "val_accuracy")
    report(f"tracking server stopped during epoch {stopped}/{EPOCHS}, back during epoch {back}/{EPOCHS}")
    assert back == 5
    return {"summary": summary, "log": run.log, "epochs": epochs, "val_accuracy": accuracy}


def test_training_outlives_a_tracking_server_outage_and_its_metrics_arrive(outage):
    assert sorted(set(outage["epochs"])) == list(range(1, EPOCHS + 1)), outage["epochs"]  # the outage's too
    assert len(outage["val_accuracy"]) == EPOCHS
    # delivered by rank 0's queue once the server was back, or (had training ended first) by the driver
    assert re.search(
        r"MLflow tracking server back after|delivered \d+ MLflow calls that training queued", outage["log"]
    ), outage["log"][-3000:]
    assert "LOST" not in outage["log"]
    state = torch.load(Path(outage["summary"]["checkpoint"]) / "state.pt", weights_only=True)
    assert state["epoch"] == EPOCHS - 1 and outage["summary"]["test_accuracy"] > 0.8


def test_a_killed_training_worker_restarts_from_its_last_checkpoint_and_ends_as_accurate(
    ray_local, workdir, outage, tmp_path
):
    address = ray_local.get_runtime_context().gcs_address
    calm = outage["summary"]  # the same seed, data, workers and epochs, and no worker lost
    gate = Gate(tmp_path / "gate")
    gate.hold(4)
    hit = Pipeline(address, gated({**workdir, **QUICK, "train.max_failures": 1}, gate), tmp_path / "hit.json")
    hit.wait_gate(gate, 4)  # at the first step of epoch 4: epochs 1-3 are checkpointed
    wait_logged(workdir["tracking.uri"], 3, hit)
    workers = training_worker_pids(ray_local)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    killed_in = gate.latest_epoch()
    hit.wait_for(r"training on 2 worker\(s\), \d+ rows each per step, epochs [2-9]")  # the new worker group
    restarted = training_worker_pids(ray_local)
    hit.wait_gate(gate, 4, exclude_pids=set(workers))  # the new group is at epoch 4 again
    gate.release(4)
    summary = hit.finish()

    resumed_after = int(re.search(r"resuming after epoch (\d+)/", hit.log)[1])
    report(
        f"worker killed during epoch {killed_in}/{EPOCHS}; resumed after epoch {resumed_after}; test accuracy "
        f"{summary['test_accuracy']:.4f} (undisturbed {calm['test_accuracy']:.4f})"
    )
    assert killed_in == 4 and resumed_after == 3  # only the epoch in flight is redone
    assert len(restarted) == 2 and set(restarted).isdisjoint(workers)  # a new worker group did the rest
    assert summary["test_accuracy"] == pytest.approx(calm["test_accuracy"], abs=0.01)
    epochs = train_epochs_logged(workdir["tracking.uri"], summary["train_run_id"])
    assert sorted(epochs) == list(range(1, EPOCHS + 1)), epochs  # every epoch once
    state = torch.load(Path(summary["checkpoint"]) / "state.pt", weights_only=True)
    assert state["epoch"] == EPOCHS - 1


def _snapshot_epoch(run_dir: Path) -> int | None:
    """The 1-based epoch of the latest checkpoint Ray Train's snapshot of a run names (None: none yet)."""
    from shipyard.train.checkpoints import SNAPSHOT_FILE, checkpoint_epoch

    try:
        latest = json.loads((run_dir / SNAPSHOT_FILE).read_text())["latest_checkpoint_result"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    epoch = checkpoint_epoch(run_dir / latest["checkpoint_dir_name"]) if latest else None
    return None if epoch is None else epoch + 1


def test_a_pipeline_killed_while_training_resumes_without_redoing_work(ray_local, workdir, tmp_path):
    """The driver dies during epoch 6 while Ray Train's snapshot still names epoch 2: epochs 3-5 are finished and
    in storage but not in the snapshot. --resume must go on after epoch 5.

    Ray Train's controller registers a checkpoint (and rewrites its snapshot) after the worker has uploaded it,
    so a driver killed in between leaves such a lag (seen: 2 epochs at 0.2 s an epoch). To make the lag several
    epochs long on any machine, the test keeps the snapshot taken after epoch 2 and the checkpoints it names,
    and puts them back after the kill, as a driver killed right after epoch 2's snapshot would have left them."""
    address = ray_local.get_runtime_context().gcs_address
    gate = Gate(tmp_path / "gate")
    gate.hold(3, world=2)  # the final training's 2 workers; the search's one-process trials pass
    gate.hold(6, world=2)
    settings = gated(
        {
            **workdir,
            **QUICK,
            "tune.enabled": True,
            "tune.num_samples": 2,
            "tune.grace_period": 2,
            "tune.max_concurrent_trials": 2,
        },
        gate,
    )
    first = Pipeline(address, settings, tmp_path / "summary.json")
    first.wait_gate(gate, 3, world=2)
    (run_dir,) = Path(workdir["storage_path"]).glob("digits-train-*")
    deadline = time.monotonic() + 60
    while _snapshot_epoch(run_dir) != 2:  # the controller registers epoch 2 a poll after the worker saved it
        assert time.monotonic() < deadline, f"Ray Train's snapshot never named epoch 2: {_snapshot_epoch(run_dir)}"
        time.sleep(0.1)
    lagging = tmp_path / "snapshot-after-epoch-2"
    shutil.copytree(run_dir, lagging)
    gate.release(3)
    first.wait_gate(gate, 6, world=2)
    wait_logged(workdir["tracking.uri"], 5, first)
    first.kill()
    killed_in = gate.latest_epoch(world=2)

    from shipyard.train.checkpoints import SNAPSHOT_FILE, newest_intact_checkpoint

    newest_epoch = newest_intact_checkpoint(run_dir)[1] + 1
    shutil.copy(lagging / SNAPSHOT_FILE, run_dir / SNAPSHOT_FILE)
    for folder in lagging.glob("checkpoint_*"):  # Ray Train's retention deleted them after epoch 2
        if not (run_dir / folder.name).exists():
            shutil.copytree(folder, run_dir / folder.name)
    report(
        f"driver killed during epoch {killed_in}/{EPOCHS}; finished epochs in storage: {newest_epoch}; "
        f"Ray Train's snapshot names epoch {_snapshot_epoch(run_dir)}"
    )
    assert killed_in == 6 and newest_epoch == 5 and _snapshot_epoch(run_dir) == 2

    gate.release(6)
    second = Pipeline(address, settings, tmp_path / "summary.json", "--resume")
    summary = second.finish()
    assert "resuming the search saved at" in second.log
    assert re.search(
        r"resuming after epoch 5/8 from checkpoint_\S+: the newest intact checkpoint in storage; "
        r"Ray Train's record names epoch 2, 3 finished epoch\(s\) behind",
        second.log,
    ), second.log[-3000:]

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
    assert sorted(epochs) == list(range(1, EPOCHS + 1)), epochs  # epoch 6, in flight, had logged nothing
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


def test_a_full_disk_fails_clearly_and_resume_goes_on_from_an_intact_checkpoint(
    ray_local, workdir, tmp_path, small_disk
):
    address = ray_local.get_runtime_context().gcs_address
    settings = {
        **workdir,
        **QUICK,
        "scaling.num_workers": 1,
        "train.epochs": 12,
        "train.max_failures": 1,
        "storage_path": str(small_disk / "results"),
    }
    full = Pipeline(address, settings, tmp_path / "summary.json")
    full.proc.wait(timeout=300)
    full.reader.join(timeout=10)
    assert full.proc.returncode == 2, full.log[-3000:]
    assert re.search(
        r"ERROR shipyard: training run \S+ failed: the disk holding storage_path .* is full\. The "
        r"checkpoints saved so far are intact there",
        full.log,
    ), full.log[-3000:]
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # space freed

    resumed = Pipeline(address, settings, tmp_path / "summary.json", "--resume")
    summary = resumed.finish()
    assert re.search(
        r"resuming after epoch \d+/12 from checkpoint_\S+: the newest intact checkpoint in storage", resumed.log
    ), resumed.log[-3000:]
    client = mlflow.MlflowClient(workdir["tracking.uri"], registry_uri=workdir["tracking.uri"])
    experiment = client.get_experiment_by_name("shipyard-digits").experiment_id
    assert sorted(r.data.tags.get("shipyard.kind") for r in client.search_runs([experiment], "")) == [
        "pipeline",
        "train",
    ]
    epochs = train_epochs_logged(workdir["tracking.uri"], summary["train_run_id"])
    assert sorted(set(epochs)) == list(range(1, 13)) and epochs.count(1) == 1, epochs
    assert summary["model_version"] == "1" and summary["test_accuracy"] > 0.9
