"""Checkpoint retention across a whole search: the best K by the search metric stay, the rest go.

Running trials are pruned by Tune itself (`CheckpointConfig` in `tuning.search`: each keeps its best and its
latest, and Tune snapshots the experiment before deleting, so a resume never needs a deleted one); a PBT search
prunes nothing until it ends, since an exploit may clone any trial's checkpoint. Finished
trials are pruned here, as the search goes and once more at its end. And where a Ray Train run goes on from
(`resume_point`): the newest checkpoint in storage that loads, whatever Ray Train's lagging snapshot names, and
`repair_run_snapshot` for a snapshot a full disk left empty.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from shipyard.config import Config
from shipyard.tasks import objective

CHECKPOINT_FILE = "state.pt"
"""In every checkpoint of a trial or a training run: weights, optimizer state, epoch and, in training, the torch RNG
state (torch.save of tensors)."""
HISTORY_FILE = "metrics_history.json"
"""In every checkpoint of a training run: rank 0's metrics of each epoch so far (a JSON list, one dict an epoch).
A search trial run as a Train job resumes from its job's newest checkpoint, which may be epochs ahead of the
results its killed driver received: the resumed driver logs the epochs it never saw from this file
(shipyard.tune.trial_runs.backfill_epochs)."""

log = logging.getLogger(__name__)

SNAPSHOT_GRACE_S = 30.0
"""Tune records a trial's end in its next experiment snapshot (every >= 10 s, or when it prunes a checkpoint);
until then a resume would restore the trial from its checkpoints, so they are pruned this long after its end."""


def checkpoints_to_delete(checkpoints: dict[str, float], keep_best: int, mode: str, protected: set[str]) -> list[str]:
    """Paths (checkpoint -> its score) outside the best `keep_best` and not protected (a running trial's,
    the best trial's last)."""
    ranked = sorted(checkpoints, key=checkpoints.__getitem__, reverse=(mode == "max"))
    best = set(ranked[:keep_best])
    return [p for p in checkpoints if p not in best and p not in protected]


def _delete(paths: list[str]) -> None:
    for path in paths:
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as err:  # keep going: a checkpoint left behind costs disk, not results
            log.warning("could not delete checkpoint %s: %s", path, err)


def checkpoint_keeper(cfg: Config):
    """A Tune callback pruning finished trials' checkpoints to the best tune.keep_checkpoints of the search.

    Protected: every checkpoint of a trial still running, paused or errored (`--resume` restores errored trials
    from their latest), of a trial that ended less than SNAPSHOT_GRACE_S ago, and the best trial's last one.
    """
    from ray.tune import Callback

    metric, mode = objective(cfg)

    class CheckpointKeeper(Callback):
        def __init__(self):
            self.scores: dict[str, float] = {}
            self.by_trial: dict[str, list[str]] = {}
            self.ended: dict[str, float] = {}
            self.last_prune = 0.0

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            score = (trial.last_result or {}).get(metric)
            if score is not None:
                self.scores[checkpoint.path] = score
                self.by_trial.setdefault(trial.trial_id, []).append(checkpoint.path)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended[trial.trial_id] = time.time()

        def on_step_end(self, iteration, trials, **info):
            now = time.time()
            if now - self.last_prune < 1.0:  # called on every step of Tune's loop
                return
            self.last_prune = now
            settled = {t for t, end in self.ended.items() if now - end > SNAPSHOT_GRACE_S}
            protected = {p for t, paths in self.by_trial.items() if t not in settled for p in paths}
            scored = [t for t in trials if (t.last_result or {}).get(metric) is not None]
            if scored:
                best = (max if mode == "max" else min)(scored, key=lambda t: t.last_result[metric])
                protected.update(self.by_trial.get(best.trial_id, [])[-1:])
            self.scores = {p: v for p, v in self.scores.items() if Path(p).exists()}
            _delete(checkpoints_to_delete(self.scores, cfg.tune.keep_checkpoints, mode, protected))

    return CheckpointKeeper()


def final_prune(cfg: Config, results, best_checkpoint: str | None) -> tuple[int, float]:
    """Apply the best-K rule to every checkpoint on disk once the search is over (a resumed search's older ones
    and multi-worker trials' Train checkpoints too), never the best trial's; returns (kept, MiB they use)."""
    scores: dict[str, float] = {}
    unscored = float("-inf") if objective(cfg)[1] == "max" else float("inf")
    for r in results:  # each checkpoint folder, scored by the report it was saved with
        df = r.metrics_dataframe
        if df is None or objective(cfg)[0] not in df:
            continue
        by_path: dict[str, float] = {}
        if "checkpoint_dir_name" in df:  # a one-process trial: <trial>/checkpoint_*
            by_path.update(
                {
                    str(Path(r.path) / n): v
                    for n, v in zip(df["checkpoint_dir_name"], df[objective(cfg)[0]])
                    if isinstance(n, str)
                }
            )
        if "checkpoint_path" in df:  # a Train-job trial: the path rank 0 reported
            by_path.update({p: v for p, v in zip(df["checkpoint_path"], df[objective(cfg)[0]]) if isinstance(p, str)})
        for d in Path(r.path).rglob("checkpoint_*"):
            if d.is_dir():
                scores[str(d)] = float(by_path.get(str(d), unscored))
    _delete(
        checkpoints_to_delete(
            scores, cfg.tune.keep_checkpoints, objective(cfg)[1], {best_checkpoint} if best_checkpoint else set()
        )
    )
    kept = [p for p in Path(results.experiment_path).rglob("checkpoint_*") if p.is_dir()]
    size = sum(f.stat().st_size for p in kept for f in p.rglob("*") if f.is_file())
    return len(kept), round(size / 2**20, 2)


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train V2's record of a run's checkpoints, read when a run of the same name starts again (a resume)."""


def checkpoint_epoch(path: str | Path) -> int | None:
    """The 0-based epoch a checkpoint folder holds, or None when its state does not load (half-written when its
    process died or the disk filled, or deleted). mmap: the weights are not read, only the archive's index."""
    import torch

    try:
        return int(torch.load(Path(path) / CHECKPOINT_FILE, weights_only=True, map_location="cpu", mmap=True)["epoch"])
    except Exception:
        return None


def newest_intact_checkpoint(run_dir: str | Path) -> tuple[str, int] | None:
    """(folder, epoch) of the checkpoint with the highest epoch whose state loads in a Ray Train run folder; of
    two with the same epoch, the later one (folders are named by the time they were saved)."""
    best: tuple[str, int] | None = None
    for folder in sorted(Path(run_dir).glob("checkpoint_*")):
        epoch = checkpoint_epoch(folder) if folder.is_dir() else None
        if epoch is not None and (best is None or epoch >= best[1]):
            best = (str(folder), epoch)
    return best


@dataclass(frozen=True)
class ResumePoint:
    """Where a (re)started worker group goes on from, and why (the line the log prints)."""

    path: str | None
    """A checkpoint folder in storage, or None: the one Ray Train recorded (remote storage is not scanned)."""
    epoch: int | None
    """The 0-based epoch it holds; None where it is only known once loaded."""
    why: str


def resume_point(run_dir: str | None, recorded: str | None) -> ResumePoint | None:
    """The newest intact checkpoint in a run's storage, else the one Ray Train recorded; None: start afresh.

    Ray Train's record (its snapshot, or the checkpoint a failed worker group last reported) lags what the
    workers wrote: each worker uploads its checkpoint before the controller registers it, and the controller
    writes its snapshot after registering. A driver killed in between leaves finished epochs in storage that the
    snapshot does not name; going on from the snapshot would train them again. `run_dir`: the run's folder when
    storage is a local or shared file system (None for a remote URI); `recorded`: the path of Ray's checkpoint.
    """
    newest = newest_intact_checkpoint(run_dir) if run_dir and Path(run_dir).is_dir() else None
    if newest is None:
        if recorded is None:
            return None
        return ResumePoint(
            None,
            None,
            "the checkpoint Ray Train recorded"
            + ("" if run_dir else " (remote storage is not scanned for newer ones)"),
        )
    path, epoch = newest
    recorded_epoch = checkpoint_epoch(recorded) if recorded else None
    if recorded is None:
        why = "the newest intact checkpoint in storage; Ray Train had recorded none (no snapshot, or an unreadable one)"
    elif recorded_epoch is None:
        why = (
            f"the newest intact checkpoint in storage; the one Ray Train recorded ({Path(recorded).name}) does not load"
        )
    elif epoch > recorded_epoch:
        why = (
            f"the newest intact checkpoint in storage; Ray Train's record names epoch {recorded_epoch + 1}, "
            f"{epoch - recorded_epoch} finished epoch(s) behind (written before the driver or a worker died)"
        )
    else:
        return ResumePoint(
            recorded, recorded_epoch, "the newest intact checkpoint in storage, the one Ray Train recorded"
        )
    return ResumePoint(path, epoch, why)


def repair_run_snapshot(run_dir: Path) -> None:
    """Ray Train writes its snapshot in place: a full disk leaves it empty, and a run of that name then cannot
    start again (CheckpointManagerInitializationError). Move such a snapshot aside: Ray Train then starts the run
    with no record, and the workers go on from the newest intact checkpoint (`resume_point`). Nothing to do for a
    new run, a readable snapshot, or remote storage (not looked at)."""
    snapshot = run_dir / SNAPSHOT_FILE
    if not snapshot.is_file():
        return
    try:
        json.loads(snapshot.read_text())
        return
    except ValueError:
        pass
    snapshot.rename(snapshot.with_suffix(".broken"))
    log.warning(
        "Ray Train's snapshot of %s was unreadable (a full disk?): set aside as %s; the workers go on from "
        "the newest checkpoint that loads",
        run_dir.name,
        snapshot.with_suffix(".broken").name,
    )


CHECKPOINT_TMP_PREFIX = "shipyard-checkpoint-"
"""Rank 0's checkpoint folders in the worker's temp folder, each deleted by Ray Train once copied into storage."""
COPY_WAIT_S = 600.0


def wait_copied(folder: str | None, timeout_s: float = COPY_WAIT_S) -> None:
    """Wait until Ray Train's upload thread has copied `folder` into storage (it deletes the folder then). It
    copies one checkpoint at a time and hands each to the controller, which takes one report per poll: without
    this wait, epochs shorter than a poll (or than a copy to slow storage) would queue checkpoints without bound."""
    deadline = time.monotonic() + timeout_s
    while folder is not None and os.path.exists(folder):
        if time.monotonic() > deadline:
            log.warning("checkpoint %s not copied into storage after %.0f s: training goes on", folder, timeout_s)
            return
        time.sleep(0.002)
