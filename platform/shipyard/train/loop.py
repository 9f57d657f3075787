"""Training: one epoch loop shared by Ray Train workers (data-parallel) and Ray Tune trials.

    result = fit(cfg, splits, mlflow_run_id)   # TorchTrainer over cfg.scaling.num_workers workers

Each epoch reports `train_loss`, `val_loss`, `val_<metric>` for each of the task's metrics (val_accuracy,
val_rmse, ...), `epoch_time_s`, `samples_per_s` and, in Ray Train, a checkpoint (weights, optimizer, epoch, RNG
state) from which a restarted worker group resumes.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shipyard.config import Config
from shipyard.errors import TrainingError
from shipyard.tasks import Task, make_task
from shipyard.train.checkpoints import (
    CHECKPOINT_FILE,
    CHECKPOINT_TMP_PREFIX,
    HISTORY_FILE,
    ResumePoint,
    repair_run_snapshot,
    resume_point,
    wait_copied,
)
from shipyard.train.epoch import VAL_BATCH, HeldRows, fits_in_memory, make_optimizer, run_epoch
from shipyard.train.mlflow_queue import FLUSH_S, UNDELIVERED_FILE, WORKER_ENV, QueuedMlflow, deliver_leftovers
from shipyard.train.progress import Progress
from shipyard.train.step import StepOptions

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: Any
    """ray.train.Checkpoint of the last epoch: weights, optimizer, epoch."""
    metrics: dict[str, Any]
    """Metrics of the last epoch."""


# -- Ray Train ----------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker. `config`: cfg tree, data shape, MLflow run to log into."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = Config.model_validate(config["cfg"])
    _log_to_driver()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    task = make_task(cfg.task, config["info"])
    model = task.build_model(cfg.model)
    start_epoch, state, leftover, history = 0, None, [], []
    point = _resume_point(config.get("run_dir"), ray.train.get_checkpoint(), rank, world)
    if point is not None:  # a restarted worker group (FailureConfig, elastic resize) or a resumed run
        checkpoint = ray.train.get_checkpoint() if point.path is None else Checkpoint.from_directory(point.path)
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")
            kept = Path(d) / UNDELIVERED_FILE  # MLflow calls still queued when it was written (requeue below)
            if rank == 0 and kept.is_file():
                try:
                    leftover = json.loads(kept.read_text())
                except ValueError as err:  # written while the disk filled up
                    log.error("LOST: MLflow calls queued before %s cannot be read (%s)", checkpoint.path, err)
            if rank == 0 and (Path(d) / HISTORY_FILE).is_file():  # the epochs before it, for the next checkpoints
                try:
                    history = json.loads((Path(d) / HISTORY_FILE).read_text())
                except ValueError as err:  # only a resumed search reads it (to log epochs it never received)
                    log.warning("metrics of the epochs before %s cannot be read (%s)", checkpoint.path, err)
        model.load_state_dict(state["model"])
        if "rng" in state:  # the dropout masks (and augmentations) an undisturbed run would have drawn next
            torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():  # their GPU draws
            torch.cuda.set_rng_state(state["cuda_rng"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            log.warning(
                "resuming after epoch %d/%d from %s: %s",
                start_epoch,
                cfg.train.epochs,
                Path(point.path or checkpoint.path).name,
                point.why,
            )
    model = ray.train.torch.prepare_model(model)  # DDP; moves the model to this worker's GPU when use_gpu
    device = ray.train.torch.get_device()
    # after prepare_model: load_state_dict moves optimizer state to where the parameters are now
    optimizer = make_optimizer(cfg, model)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    logger = QueuedMlflow(config.get("tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else None
    if logger is not None and leftover and start_epoch < cfg.train.epochs:
        log.info("resending %d MLflow call(s) the run had queued when it stopped", logger.requeue(leftover))
    placement = _worker_placement(world)  # every rank takes part (a collective)
    if logger is not None:  # the tag stays short (ranks per node); the artifact has every rank
        logger.set_tag("shipyard.worker_nodes", json.dumps(collections.Counter(p["node_id"] for p in placement)))
        logger.set_tag("shipyard.num_nodes", str(len({p["node_id"] for p in placement})))
        logger.log_dict(placement, "worker_placement.json")
    per_worker_batch = max(1, cfg.train.batch_size // world)
    if rank == 0:  # once per worker group: an elastic run says here when it shrank or grew
        log.info(
            "training on %d worker(s), %d rows each per step, epochs %d-%d",
            world,
            per_worker_batch,
            start_epoch + 1,
            cfg.train.epochs,
        )
    train_shard = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    report_s = 0.0
    # the plan priced the full worker group: an elastic run that shrank has no prediction to compare with
    prediction = config.get("prediction") if world == cfg.scaling.max_workers else None
    progress = Progress(prediction, cfg.train.epochs - start_epoch, world) if rank == 0 else None
    # rows that fit are read from Ray Data once and reshuffled here every epoch (HeldRows); validation rows are
    # read before the first step, so that every rank knows whether they are shared before it validates
    keep_train = fits_in_memory(config.get("train_rows", 0) // world, _width(task))
    train_rows = HeldRows(train_shard, per_worker_batch, device, keep=keep_train)
    keep_val = fits_in_memory(config.get("val_rows", 0), _width(task))
    val_rows = HeldRows(val_ds, VAL_BATCH, device, keep=keep_val, rank=rank, world=world)
    val_rows.load()
    options = StepOptions.of(cfg.train)
    primary = f"val_{task.primary_metric}"
    pending = None  # rank 0's last checkpoint folder, until Ray Train's upload thread has copied (and deleted) it
    for epoch in range(start_epoch, cfg.train.epochs):
        metrics = run_epoch(
            model,
            optimizer,
            train_rows.epoch(cfg.train.seed + epoch),
            val_rows.epoch(),
            task,
            world,
            options,
            gather_val=val_rows.shared,  # the same on every rank: each read the same whole split
        )
        metrics["epoch"], metrics["epochs_done"] = epoch, epoch + 1  # epochs_done: the search schedulers' clock
        metrics["report_s"] = report_s  # the previous epoch's checkpoint + ray.train.report
        report_start = time.perf_counter()
        ckpt = tmp = None
        if rank == 0:
            wait_copied(pending)  # one checkpoint at most waits for Ray Train's upload thread
            tmp = tempfile.mkdtemp(prefix=CHECKPOINT_TMP_PREFIX)
            try:
                inner = model.module if hasattr(model, "module") else model
                torch.save(
                    {
                        "model": inner.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch,
                        "rng": torch.get_rng_state(),
                        **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
                    },
                    Path(tmp) / CHECKPOINT_FILE,
                )
                ckpt = Checkpoint.from_directory(tmp)
                timing = progress.after_epoch(metrics)  # adds predicted_step_time_ms
                logger.log(metrics, epoch)
                history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
                if not config.get("quiet"):
                    log.info(
                        "epoch %d/%d | train_loss %.4f | val_loss %.4f | %s %.4f | %s | %.2f s | %.0f samples/s%s",
                        epoch + 1,
                        cfg.train.epochs,
                        metrics["train_loss"],
                        metrics["val_loss"],
                        primary,
                        metrics[primary],
                        timing,
                        metrics["epoch_time_s"],
                        metrics["samples_per_s"],
                        progress.eta(),
                    )
                try:
                    refined = progress.refine(metrics)
                except Exception as err:  # the plan is advice: training goes on without a refined one
                    log.warning("plan: not refined (%s: %s)", type(err).__name__, err)
                    refined = None
                if refined:
                    for line in refined:
                        log.info("%s", line)
                    logger.set_tag("shipyard.refined_step_time_ms", f"{progress.refined['step_time_ms']:.4f}")
                    logger.log_dict(progress.refined, "refined_plan.json")
                checked = progress.auto_check(metrics)
                if checked:
                    log.info("%s", checked)
                    logger.set_tag("shipyard.auto_check", checked)
                warning = progress.warning(metrics)
                if warning:
                    log.warning("%s", warning)
                    logger.set_tag("shipyard.plan_warning", warning)
                if epoch == cfg.train.epochs - 1:  # the last checkpoint carries what MLflow has not received
                    undelivered = logger.close(FLUSH_S)
                else:  # and each other one what is still queued: a run killed now resends it when resumed
                    undelivered = logger.undelivered()
                if undelivered:
                    (Path(tmp) / UNDELIVERED_FILE).write_text(json.dumps(undelivered))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        # a barrier: every rank calls it. ASYNC: Ray Train's upload thread copies the checkpoint into storage,
        # hands it to the controller and deletes the local folder, in report order, while this thread trains
        # on. In SYNC mode the call waits for the controller to take the previous report (a one-slot queue, read
        # once per RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): 18 % of a 1-worker MLP run's training thread (py-spy).
        # Ray Train waits for pending uploads before the worker's function ends.
        # Bounded by wait_copied above: a run that dies loses at most the epoch in flight and the one before it,
        # and at most two copies sit in rank 0's temp folder.
        try:
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        pending = tmp
        report_s = time.perf_counter() - report_start


def _resume_point(run_dir: str | None, recorded, rank: int, world: int) -> ResumePoint | None:
    """Rank 0 picks the checkpoint the group goes on from (checkpoints.resume_point) and every rank takes its
    pick: all must start at the same epoch, and only rank 0 is sure to see the whole of storage."""
    point = resume_point(run_dir, recorded.path if recorded is not None else None) if rank == 0 else None
    if world > 1:  # Ray Train set up the process group before this function started
        shared = [point]
        torch.distributed.broadcast_object_list(shared, src=0)
        point = shared[0]
    return point


def _worker_placement(world: int) -> list[dict[str, str]]:
    """Ray node id and host of every rank, rank order: where a run really trained (a tag on its MLflow run)."""
    import ray

    me = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "node_ip": ray.util.get_node_ip_address(),
    }
    if world == 1:
        return [me]
    everyone: list[Any] = [None] * world
    torch.distributed.all_gather_object(everyone, me)  # the process group Ray Train set up for DDP
    return everyone


def _log_to_driver() -> None:
    """A Train worker is a process entry point: send shipyard's INFO lines (not Ray's) to the driver log."""
    lib = logging.getLogger("shipyard")
    if not lib.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        lib.addHandler(handler)
        lib.setLevel(logging.INFO)
        lib.propagate = False
    # Ray Train V2 names some loggers by file path (logging.getLogger(__file__)), which its LoggingConfig
    # level does not reach; they print two INFO lines per report and rank.
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(".py") and "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _local_run_dir(storage: str, run_name: str) -> str | None:
    """The run's folder where storage is a file system path (local, or NFS shared by the nodes), with a snapshot
    a full disk left empty set aside; None for a remote URI (s3://, gs://), which is not scanned."""
    if "://" in storage and not storage.startswith("file://"):
        return None
    run_dir = Path(storage.removeprefix("file://")) / run_name
    repair_run_snapshot(run_dir)
    return str(run_dir)


def _width(task: Task) -> int:
    """Numbers per input row (an image's C*H*W): what an epoch of batches in memory costs."""
    return math.prod(task.info.input_shape)


def make_trainer(
    cfg: Config,
    datasets: dict[str, Any],
    info: dict[str, Any],
    run_name: str,
    *,
    storage_path: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float | None = None,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    callbacks: list | None = None,
    quiet: bool = False,
    prediction: dict[str, Any] | None = None,
):
    """A TorchTrainer over `train_loop_per_worker`: the pipeline's train stage, and each trial of a search
    with tune.workers_per_trial > 1 (then `callbacks=[TuneReportCallback()]` forwards rank 0's reports)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage = storage_path or str(cfg.storage_dir)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "info": info,
            "run_dir": _local_run_dir(storage, run_name),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id,
            "quiet": quiet,
            "prediction": prediction,
            "train_rows": datasets["train"].count() if hasattr(datasets["train"], "count") else 0,
            "val_rows": datasets["val"].count() if hasattr(datasets.get("val"), "count") else 0,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers or cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_check_s,
            resources_per_worker={"CPU": cpus_per_worker or cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        datasets=datasets,
        # every rank reads all of val (Ray Data's equal split would drop rows); once held, each evaluates a share
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage,
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # Ray Train's own INFO lines (two per report and rank) would drown the one line per epoch
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": WORKER_ENV},  # merged into the job's runtime env by Ray
        ),
    )


def fit(
    cfg: Config,
    splits,
    run_name: str,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    prediction: dict[str, Any] | None = None,
) -> TrainResult:
    """Data-parallel training with Ray Train's TorchTrainer; returns the last checkpoint and metrics.

    `prediction` (the pipeline's plan: step_time_ms, epoch_s, ...) turns on the ETA, the predicted step time
    beside the measured one in each epoch's metrics, and the warning when they differ."""
    import ray.train

    trainer = make_trainer(
        cfg,
        {"train": splits.train, "val": splits.val},
        splits.info.to_dict(),
        run_name,
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
        prediction=prediction,
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        if "No space left on device" in str(err):  # errno ENOSPC, in any worker's traceback
            raise TrainingError(
                f"training run {run_name} failed: the disk holding storage_path ({cfg.storage_dir}) or a worker's "
                "temp folder is full. The checkpoints saved so far are intact there: free space (the workers' "
                f"temp folders may hold {CHECKPOINT_TMP_PREFIX}* copies a failed upload left; delete them), or set "
                "storage_path to a larger disk, with the same path on every node, and rerun with --resume"
            ) from err
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise TrainingError(
            f"training run {run_name} failed (train.max_failures={cfg.train.max_failures}): "
            f"{first_line}. The full error is above; worker logs are under the Ray session's "
            "logs/ folder (/tmp/ray/session_latest/logs on the head node)"
        ) from err
    if result.checkpoint is None:
        raise TrainingError(f"training run {run_name} ended without a checkpoint ({result.error}); see {result.path}")
    deliver_leftovers(result.checkpoint, tracking_uri, mlflow_run_id)
    return TrainResult(result.checkpoint, dict(result.metrics))


def load_trained(cfg: Config, checkpoint, task: Task) -> nn.Module:
    """Rebuild the model on the CPU from a Ray checkpoint (local or remote storage), weights only."""
    model = task.build_model(cfg.model)
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")
    model.load_state_dict(state["model"])
    return model.eval()
