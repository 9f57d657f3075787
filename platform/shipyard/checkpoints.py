"""Checkpoint retention across a whole search: the best K by the search metric stay, the rest go.

Running trials are pruned by Tune itself (`CheckpointConfig` in `tuning.search`: each keeps its best and its
latest, and Tune snapshots the experiment before deleting, so a resume never needs a deleted one). Finished
trials are pruned here, as the search goes and once more at its end. And `repair_run_snapshot`: a Ray Train run
whose snapshot a full disk left empty goes on from its newest checkpoint that loads.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from shipyard.config import Config

CHECKPOINT_FILE = "state.pt"
"""In every checkpoint of a trial or a training run: weights, optimizer state and epoch (torch.save of tensors)."""

log = logging.getLogger(__name__)

SNAPSHOT_GRACE_S = 30.0
"""Tune records a trial's end in its next experiment snapshot (every >= 10 s, or when it prunes a checkpoint);
until then a resume would restore the trial from its checkpoints, so they are pruned this long after its end."""


def checkpoints_to_delete(checkpoints: dict[str, float], keep_best: int, mode: str, protected: set[str]
                          ) -> list[str]:
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

    metric, mode = cfg.tune.metric, cfg.tune.mode

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
    unscored = float("-inf") if cfg.tune.mode == "max" else float("inf")
    for r in results:  # each checkpoint folder, scored by the report it was saved with
        df = r.metrics_dataframe
        if df is None or cfg.tune.metric not in df:
            continue
        by_path: dict[str, float] = {}
        if "checkpoint_dir_name" in df:  # a one-process trial: <trial>/checkpoint_*
            by_path.update({str(Path(r.path) / n): v for n, v in zip(df["checkpoint_dir_name"], df[cfg.tune.metric])
                            if isinstance(n, str)})
        if "checkpoint_path" in df:  # a Train-job trial: the path rank 0 reported
            by_path.update({p: v for p, v in zip(df["checkpoint_path"], df[cfg.tune.metric]) if isinstance(p, str)})
        for d in Path(r.path).rglob("checkpoint_*"):
            if d.is_dir():
                scores[str(d)] = float(by_path.get(str(d), unscored))
    _delete(checkpoints_to_delete(scores, cfg.tune.keep_checkpoints, cfg.tune.mode,
                                  {best_checkpoint} if best_checkpoint else set()))
    kept = [p for p in Path(results.experiment_path).rglob("checkpoint_*") if p.is_dir()]
    size = sum(f.stat().st_size for p in kept for f in p.rglob("*") if f.is_file())
    return len(kept), round(size / 2**20, 2)


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train V2's record of a run's checkpoints, read when a run of the same name starts again (a resume)."""


def repair_run_snapshot(run_dir: Path) -> str | None:
    """Ray Train writes its snapshot in place: a full disk leaves it empty, and a run of that name then cannot
    start again (CheckpointManagerInitializationError). Move such a snapshot aside and return the newest
    checkpoint whose state loads, for the workers to start from; None when there is nothing to repair (or the
    storage is remote: not looked at)."""
    snapshot = run_dir / SNAPSHOT_FILE
    if not snapshot.is_file():
        return None
    try:
        json.loads(snapshot.read_text())
        return None
    except ValueError:
        pass
    snapshot.rename(snapshot.with_suffix(".broken"))
    import torch

    for ckpt in sorted(run_dir.glob("checkpoint_*"), reverse=True):  # named by time: newest first
        try:
            epoch = torch.load(ckpt / CHECKPOINT_FILE, weights_only=True, map_location="cpu")["epoch"]
        except Exception:  # written while the disk filled up
            continue
        log.warning("Ray Train's snapshot of %s was unreadable (a full disk?): set aside as %s; going on from %s "
                    "(epoch %d)", run_dir.name, snapshot.with_suffix(".broken").name, ckpt.name, epoch + 1)
        return str(ckpt)
    log.warning("Ray Train's snapshot of %s was unreadable and no checkpoint loads: training starts over",
                run_dir.name)
    return None
