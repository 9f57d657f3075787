"""Training: one epoch loop shared by Ray Train workers (data-parallel) and Ray Tune trials.

    result = fit(cfg, splits, mlflow_run_id)   # TorchTrainer over cfg.scaling.num_workers workers

Each epoch reports `train_loss`, `val_loss`, `val_accuracy`, `epoch_time_s`, `samples_per_s` and, in Ray
Train, a checkpoint (weights, optimizer, epoch) from which a restarted worker group resumes.
"""
from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from shipyard.config import Config
from shipyard.errors import TrainingError
from shipyard.models import build_model

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
SHUFFLE_BUFFER_ROWS = 10_000


@dataclass
class TrainResult:
    checkpoint: Any
    """ray.train.Checkpoint of the last epoch: weights, optimizer, epoch."""
    metrics: dict[str, Any]
    """Metrics of the last epoch."""


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def _evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all batches."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["x"])
            loss_sum += nn.functional.cross_entropy(logits, b["y"], reduction="sum").item()
            correct += (logits.argmax(1) == b["y"]).sum().item()
            n += len(b["y"])
    return loss_sum / max(n, 1), correct / max(n, 1)


def run_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, train_batches, val_batches,
              world_size: int = 1) -> dict[str, float]:
    """One pass over this worker's training batches, then validation. Pure torch: no Ray inside."""
    start = time.perf_counter()
    model.train()
    loss_sum, n = 0.0, 0
    for b in train_batches:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(b["x"]), b["y"])
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(b["y"])
        n += len(b["y"])
    train_time_s = time.perf_counter() - start
    val_loss, val_acc = _evaluate(model, val_batches)
    return {"train_loss": loss_sum / max(n, 1), "val_loss": val_loss, "val_accuracy": val_acc,
            "epoch_time_s": time.perf_counter() - start,
            # all workers process similar shards in lockstep (DDP), so global throughput ~ world_size x local
            "samples_per_s": n * world_size / max(train_time_s, 1e-9)}


def iter_batches(ds, batch_size: int, seed: int | None = None, device: torch.device | str = "cpu"):
    kwargs = {"local_shuffle_buffer_size": SHUFFLE_BUFFER_ROWS, "local_shuffle_seed": seed} if seed is not None else {}
    return ds.iter_torch_batches(batch_size=batch_size, device=device, **kwargs)


# -- Ray Train ----------------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker. `config`: cfg tree, data shape, MLflow run to log into."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = Config.model_validate(config["cfg"])
    _log_to_driver()
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only Ray Data blocks
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, config["in_features"], config["num_classes"])
    start_epoch, state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group (FailureConfig) or a resumed run
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")
        model.load_state_dict(state["model"])
        start_epoch = state["epoch"] + 1
        if rank == 0:
            log.warning("resuming from the checkpoint of epoch %d", state["epoch"])
    model = ray.train.torch.prepare_model(model)  # DDP; moves the model to this worker's GPU when use_gpu
    device = ray.train.torch.get_device()
    # after prepare_model: load_state_dict moves optimizer state to where the parameters are now
    optimizer = make_optimizer(cfg, model)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    logger = _RankZeroMlflow(config.get("tracking_uri"), config.get("mlflow_run_id")) if rank == 0 else None
    per_worker_batch = max(1, cfg.train.batch_size // world)
    train_shard = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.train.epochs):
        train_batches = iter_batches(train_shard, per_worker_batch, cfg.train.seed + epoch, device)
        metrics = run_epoch(model, optimizer, train_batches, iter_batches(val_ds, 512, device=device), world)
        metrics["epoch"], metrics["epochs_done"] = epoch, epoch + 1  # epochs_done: the search schedulers' clock
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                inner = model.module if hasattr(model, "module") else model
                torch.save({"model": inner.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                           Path(tmp) / CHECKPOINT_FILE)
                ckpt = Checkpoint.from_directory(tmp)
                logger.log(metrics, epoch)
                if not config.get("quiet"):
                    log.info("epoch %d/%d | train_loss %.4f | val_loss %.4f | val_accuracy %.4f | %.2f s | "
                             "%.0f samples/s", epoch + 1, cfg.train.epochs, metrics["train_loss"], metrics["val_loss"],
                             metrics["val_accuracy"], metrics["epoch_time_s"], metrics["samples_per_s"])
            ray.train.report(metrics, checkpoint=ckpt)  # a barrier: every rank calls it


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


class _RankZeroMlflow:
    """Per-epoch metrics into the MLflow run the driver created; only rank 0 holds one of these."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        if tracking_uri and run_id:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def make_trainer(cfg: Config, datasets: dict[str, Any], in_features: int, num_classes: int, run_name: str, *,
                 storage_path: str | None = None, num_workers: int | None = None, cpus_per_worker: float | None = None,
                 tracking_uri: str | None = None, mlflow_run_id: str | None = None, callbacks: list | None = None,
                 quiet: bool = False):
    """A TorchTrainer over `train_loop_per_worker`: the pipeline's train stage, and each trial of a search
    with tune.workers_per_trial > 1 (then `callbacks=[TuneReportCallback()]` forwards rank 0's reports)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "in_features": in_features,
                           "num_classes": num_classes, "tracking_uri": tracking_uri, "mlflow_run_id": mlflow_run_id,
                           "quiet": quiet},
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers or cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker or cfg.scaling.cpus_per_worker}),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),  # every rank validates on all of val
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path or str(cfg.storage_dir), callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # Ray Train's own INFO lines (two per report and rank) would drown the one line per epoch
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )


def fit(cfg: Config, splits, run_name: str, tracking_uri: str | None = None, mlflow_run_id: str | None = None
        ) -> TrainResult:
    """Data-parallel training with Ray Train's TorchTrainer; returns the last checkpoint and metrics."""
    import ray.train

    trainer = make_trainer(cfg, {"train": splits.train, "val": splits.val}, splits.in_features, splits.num_classes,
                           run_name, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise TrainingError(f"training run {run_name} failed (train.max_failures={cfg.train.max_failures}): "
                            f"{first_line}. The full error is above; worker logs are under the Ray session's "
                            "logs/ folder (/tmp/ray/session_latest/logs on the head node)") from err
    if result.checkpoint is None:
        raise TrainingError(f"training run {run_name} ended without a checkpoint ({result.error}); "
                            f"see {result.path}")
    return TrainResult(result.checkpoint, dict(result.metrics))


def load_trained(cfg: Config, checkpoint, in_features: int, num_classes: int) -> nn.Module:
    """Rebuild the model on the CPU from a Ray checkpoint (local or remote storage), weights only."""
    model = build_model(cfg.model, in_features, num_classes)
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True, map_location="cpu")
    model.load_state_dict(state["model"])
    return model.eval()
