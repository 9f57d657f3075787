"""Recovery pieces without Ray: rank 0's MLflow queue (a real sqlite store, and a server that is not there) and
the repair of a Ray Train snapshot a full disk left empty."""

import json

import mlflow
import torch
from ray.train import Checkpoint

from shipyard.serve.ingress import free_loopback_port
from shipyard.train.checkpoints import CHECKPOINT_FILE, SNAPSHOT_FILE, repair_run_snapshot, resume_point
from shipyard.train.mlflow_queue import UNDELIVERED_FILE, WORKER_ENV, QueuedMlflow, deliver_leftovers


def _run(uri: str) -> str:
    client = mlflow.MlflowClient(uri)
    return client.create_run(client.create_experiment("queue")).info.run_id


def _run_in(client, experiment: str) -> str:
    """Another run in an experiment _run created."""
    return client.create_run(client.get_experiment_by_name(experiment).experiment_id).info.run_id


def _keep_mlflow_env(monkeypatch):
    """A Ray Train worker runs QueuedMlflow with MLflow's retries off (WORKER_ENV, set when Ray starts the
    worker): the same here, for this test only."""
    for name, value in WORKER_ENV.items():
        monkeypatch.setenv(name, value)


def test_queued_calls_arrive_in_order_and_a_refused_one_does_not_block_the_rest(tmp_path, monkeypatch):
    _keep_mlflow_env(monkeypatch)
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = _run(uri)
    queue = QueuedMlflow(uri, run_id)
    queue.log({"val_accuracy": 0.5}, step=0)
    queue.set_tag("bad key!!", "x")  # MLflow answers INVALID_PARAMETER_VALUE: dropped, not retried forever
    queue.log({"val_accuracy": 0.75}, step=1)
    queue.log_dict({"rank": 0}, "placement.json")
    assert queue.close(timeout_s=30) == []
    client = mlflow.MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_accuracy")] == [(0, 0.5), (1, 0.75)]
    assert [f.path for f in client.list_artifacts(run_id)] == ["placement.json"]


def test_calls_a_missing_server_never_took_are_returned_kept_and_delivered_later(tmp_path, monkeypatch):
    _keep_mlflow_env(monkeypatch)
    down = f"http://127.0.0.1:{free_loopback_port()}"  # nothing listens there
    queue = QueuedMlflow(down, "0" * 32)
    queue.log({"val_accuracy": 0.5}, step=0)
    queue.log({"val_accuracy": 0.75}, step=1)
    undelivered = queue.close(timeout_s=2)
    assert [call for call, _ in undelivered] == ["log_batch", "log_batch"]

    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    (ckpt / UNDELIVERED_FILE).write_text(json.dumps(undelivered))  # as the last epoch writes them
    uri = f"sqlite:///{tmp_path}/m.db"
    run_id = _run(uri)
    assert deliver_leftovers(Checkpoint.from_directory(str(ckpt)), uri, run_id) == 2
    history = mlflow.MlflowClient(uri).get_metric_history(run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(0, 0.5), (1, 0.75)]
    assert not (ckpt / UNDELIVERED_FILE).exists()  # delivered: a resumed run does not send them again


def _checkpoint(run_dir, name, epoch, truncate=False):
    d = run_dir / name
    d.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "epoch": epoch}, d / CHECKPOINT_FILE)
    if truncate:  # written while the disk filled up
        data = (d / CHECKPOINT_FILE).read_bytes()
        (d / CHECKPOINT_FILE).write_bytes(data[: len(data) // 2])
    return d


def test_an_empty_snapshot_is_set_aside_and_the_newest_loadable_checkpoint_chosen(tmp_path):
    run = tmp_path / "digits-train-1"
    _checkpoint(run, "checkpoint_2026-11-27_18-15-08.334080", epoch=3)
    _checkpoint(run, "checkpoint_2026-11-27_18-15-09.000001", epoch=4, truncate=True)
    (run / SNAPSHOT_FILE).write_text("")
    repair_run_snapshot(run)
    assert not (run / SNAPSHOT_FILE).exists() and (run / "checkpoint_manager_snapshot.broken").is_file()
    # Ray Train then starts with no record: the workers go on from the newest checkpoint that loads
    point = resume_point(str(run), recorded=None)
    assert point.path == str(run / "checkpoint_2026-11-27_18-15-08.334080") and point.epoch == 3
    assert "Ray Train had recorded none" in point.why


def test_a_readable_snapshot_or_none_is_left_to_ray(tmp_path):
    run = tmp_path / "digits-train-2"
    repair_run_snapshot(run)  # a new run: nothing there
    assert not run.exists()
    _checkpoint(run, "checkpoint_a", epoch=0)
    (run / SNAPSHOT_FILE).write_text(json.dumps({"checkpoints": []}))
    repair_run_snapshot(run)
    assert (run / SNAPSHOT_FILE).is_file()


def test_a_lagging_record_loses_to_the_newest_intact_checkpoint_in_storage(tmp_path):
    """A driver killed after the workers saved epochs 5 and 6 but before Ray Train recorded them: resume goes
    on after epoch 6, not 4; a half-written newer one (epoch 7) is skipped; names sort by save time."""
    run = tmp_path / "digits-train-3"
    recorded = _checkpoint(run, "checkpoint_2026-11-27_18-15-04.000000", epoch=3)
    _checkpoint(run, "checkpoint_2026-11-27_18-15-05.000000", epoch=4)
    newest = _checkpoint(run, "checkpoint_2026-11-27_18-15-06.000000", epoch=5)
    _checkpoint(run, "checkpoint_2026-11-27_18-15-07.000000", epoch=6, truncate=True)
    point = resume_point(str(run), str(recorded))
    assert (point.path, point.epoch) == (str(newest), 5)
    assert "Ray Train's record names epoch 4, 2 finished epoch(s) behind" in point.why


def test_the_recorded_checkpoint_is_kept_when_it_is_the_newest_or_storage_is_remote(tmp_path):
    run = tmp_path / "digits-train-4"
    _checkpoint(run, "checkpoint_2026-11-27_18-15-04.000000", epoch=3)
    recorded = _checkpoint(run, "checkpoint_2026-11-27_18-15-05.000000", epoch=4)
    point = resume_point(str(run), str(recorded))
    assert (point.path, point.epoch) == (str(recorded), 4) and "the one Ray Train recorded" in point.why
    remote = resume_point(None, "bucket/digits-train-4/checkpoint_x")  # s3:// storage: Ray's record alone
    assert remote.path is None and "not scanned" in remote.why
    assert resume_point(str(run / "missing"), None) is None  # a new run starts afresh
    deleted = resume_point(str(run), str(run / "checkpoint_gone"))
    assert deleted.path == str(recorded) and "does not load" in deleted.why


def test_a_resumed_train_run_finds_the_version_it_registered_before(tmp_path, monkeypatch):
    """What `--resume` relies on not to register a model twice: the version is found by its train run."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # tracking.setup sets them for this process
        monkeypatch.setenv(name, f"sqlite:///{tmp_path}/m.db")
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)  # undone after the test
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
    import numpy as np

    from shipyard import load_config
    from shipyard.pipeline_stages import _version_of_run
    from shipyard.tasks.models import mlp
    from shipyard.track import runs as tracking

    cfg = load_config(None, {"tracking.uri": f"sqlite:///{tmp_path}/m.db", "name": "resumed"})
    tracking.setup(cfg)
    with mlflow.start_run() as other:  # another run's version of the same model
        tracking.log_model(
            mlp(4, 3, hidden=8).eval(), np.zeros((2, 4), np.float32), cfg, ["a", "b", "c"], ["w", "x", "y", "z"], {}
        )
    with mlflow.start_run() as train:
        assert _version_of_run("resumed", train.info.run_id) is None  # nothing registered yet: register
        version = tracking.log_model(
            mlp(4, 3, hidden=8).eval(), np.zeros((2, 4), np.float32), cfg, ["a", "b", "c"], ["w", "x", "y", "z"], {}
        )
    assert version == "2" and _version_of_run("resumed", train.info.run_id) == "2"
    assert _version_of_run("resumed", other.info.run_id) == "1"


def test_a_resumed_run_resends_what_was_queued_at_its_checkpoint_without_duplicating_what_arrived(
    tmp_path, monkeypatch
):
    """The driver killed while epochs 1-2's metrics were still queued: the checkpoint written then holds them
    (undelivered()); the resumed rank 0 queues them again (requeue), less the metrics MLflow already has."""
    _keep_mlflow_env(monkeypatch)
    uri = f"sqlite:///{tmp_path}/m.db"
    client = mlflow.MlflowClient(uri)
    run_id = _run(uri)
    logger = QueuedMlflow(uri, run_id)
    with logger.cond:  # delivery held: what a checkpoint written now keeps
        logger.log({"epochs_done": 1.0}, 0)
        logger.log({"epochs_done": 2.0}, 1)
        logger.set_tag("shipyard.note", "x")
        kept = json.loads(json.dumps(logger.undelivered()))  # written into the checkpoint, read back
    assert [call for call, _ in kept] == ["log_batch", "log_batch", "set_tag"]

    # a run that received none of them (killed before delivery): all of them, once
    lost = _run_in(client, "queue")
    resumed = QueuedMlflow(uri, lost)
    assert resumed.requeue(kept) == 3
    assert resumed.close(30) == []
    assert [m.value for m in client.get_metric_history(lost, "epochs_done")] == [1.0, 2.0]
    assert client.get_run(lost).data.tags["shipyard.note"] == "x"

    # one that received epoch 1 after the checkpoint was written: epoch 2 and the tag, nothing twice
    assert logger.close(30) == []
    partial = _run_in(client, "queue")
    first_only = QueuedMlflow(uri, partial)
    first_only.requeue(kept[:1])
    first_only.close(30)
    resumed = QueuedMlflow(uri, partial)
    assert resumed.requeue(kept) == 2
    resumed.close(30)
    assert [m.value for m in client.get_metric_history(partial, "epochs_done")] == [1.0, 2.0]

    # the run that received everything: only the tag again (it overwrites)
    resumed = QueuedMlflow(uri, run_id)
    assert resumed.requeue(kept) == 1
    resumed.close(30)
    assert [m.value for m in client.get_metric_history(run_id, "epochs_done")] == [1.0, 2.0]


def test_a_resumed_search_logs_the_epochs_its_killed_driver_never_received_from_the_trials_checkpoint(tmp_path):
    """A trial run as a Train job went on from its own checkpoint of epoch 3 while MLflow had epoch 1 only (the
    driver died before the results of epochs 2-3 reached it): the first result after the restart (epoch 4) brings
    epochs 2-3 from the checkpoint's history, once, with every metric they reported. A job that had saved its last
    epoch reports nothing when resumed: at the trial's end, everything its newest checkpoint holds is logged."""
    from shipyard.train.checkpoints import HISTORY_FILE
    from shipyard.tune.trial_runs import backfill_epochs

    uri = f"sqlite:///{tmp_path}/m.db"
    client = mlflow.MlflowClient(uri)
    run_id = _run(uri)
    history = [{"epochs_done": e, "epoch": e - 1, "val_loss": 1.0 / e} for e in (1, 2, 3, 4)]
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, 0, 1) for k, v in history[0].items()])
    ckpt = tmp_path / "checkpoint_000003"
    ckpt.mkdir()
    (ckpt / HISTORY_FILE).write_text(json.dumps(history[:3]))

    assert backfill_epochs(client, run_id, str(ckpt), "trial_a", before=4) == 2
    assert [m.value for m in client.get_metric_history(run_id, "epochs_done")] == [1, 2, 3]
    val_loss = [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")]
    assert val_loss == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert backfill_epochs(client, run_id, str(ckpt), "trial_a", before=4) == 0  # nothing twice

    last = tmp_path / "checkpoint_000004"  # the trial's end: all the newest checkpoint holds
    last.mkdir()
    (last / HISTORY_FILE).write_text(json.dumps(history))
    assert backfill_epochs(client, run_id, str(last), "trial_a") == 1
    assert [m.value for m in client.get_metric_history(run_id, "epochs_done")] == [1, 2, 3, 4]

    other = _run_in(client, "queue")  # retention deleted the checkpoint, or it predates histories: a warning
    assert backfill_epochs(client, other, str(tmp_path / "pruned"), "trial_b", before=4) == 0
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / HISTORY_FILE).write_text(json.dumps([{"epoch": 0}]))
    assert backfill_epochs(client, other, str(tmp_path / "old"), "trial_b", before=4) == 0
    assert client.get_metric_history(other, "epochs_done") == []
