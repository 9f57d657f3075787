"""Rank 0's view of a training run against the plan: each epoch's step time beside the prediction, an ETA, one
warning with the likely cause when the run is off, whether an `auto` worker count's prediction held, and the plan
refined from the first steady epoch's measured step."""

from __future__ import annotations

import statistics
import time
from typing import Any


class Progress:
    """Rank 0's view of the run against the plan: step time beside the prediction, an ETA, one warning."""

    def __init__(self, prediction: dict[str, Any] | None, epochs_left: int, world: int):
        self.pred = prediction
        self.left = epochs_left
        self.world = world
        self.ratios: list[float] = []  # measured epoch wall (training, validation, report) / predicted epoch
        self.last_end = time.perf_counter()
        self.warned = self.checked = False
        self.refined: dict[str, Any] | None = None

    def after_epoch(self, metrics: dict[str, float]) -> str:
        now = time.perf_counter()
        wall_s, self.last_end = now - self.last_end, now
        self.left -= 1
        step = f"{metrics['step_time_ms']:.2f} ms/step"
        if not self.pred:
            return step
        predicted = self.pred["step_time_ms"]
        metrics["predicted_step_time_ms"] = predicted
        self.ratios.append(wall_s / max(self.pred["epoch_s"], 1e-9))
        return f"{step} (model {predicted:.2f} ms, x{metrics['step_time_ms'] / max(predicted, 1e-9):.2f})"

    def eta(self) -> str:
        """Epochs left x the predicted epoch time x how far off the epochs so far ran (the median ratio; the
        first epoch alone, which also warms up, only until there are others)."""
        if not self.pred or not self.ratios:
            return ""
        ratios = self.ratios[1:] or self.ratios
        return f" | ETA {self.left * self.pred['epoch_s'] * statistics.median(ratios):.1f} s"

    def refine(self, metrics: dict[str, float]) -> list[str] | None:
        """Once, after the first epoch past the warm-up (or the only one): the plan again from the measured step
        (refine_table: the compute scaled by measured / predicted, the all-reduce kept), with the
        epoch time measured and the strong-scaling table re-priced. Lines for the log; `self.refined` for MLflow."""
        if not self.pred or not self.pred.get("strong") or self.refined is not None:
            return None
        if len(self.ratios) < 2 and self.left > 0:
            return None
        measured = metrics["step_time_ms"]
        if measured <= 0 or self.pred["step_time_ms"] <= 0:  # no step measured (no rows) or none predicted
            return None
        k, rows = refine_table(self.pred["strong"], measured, self.pred["step_time_ms"], self.pred["exposed_comm_ms"])
        epoch_s = self.pred["epoch_s"] * self.ratios[-1]  # this epoch's wall: training, validation, report
        self.refined = {
            "after_epoch": int(metrics["epoch"]) + 1,
            "compute_factor": k,
            "step_time_ms": measured,
            "planned_step_time_ms": self.pred["step_time_ms"],
            "epoch_s": epoch_s,
            "planned_epoch_s": self.pred["epoch_s"],
            "strong": rows,
        }
        kept = _splits(measured, self.pred["step_time_ms"], self.pred["exposed_comm_ms"])
        how = f"compute x{k:.2f}, the all-reduce as planned" if kept else f"the whole step x{k:.2f}"
        lines = [
            f"plan refined after epoch {self.refined['after_epoch']} from its measured step: {measured:.2f} ms a "
            f"step (planned {self.pred['step_time_ms']:.2f} ms; {how}), {epoch_s:.2f} s an epoch (planned "
            f"{self.pred['epoch_s']:.2f} s); strong scaling from it:"
        ]
        lines += [
            f"  {r['workers']:3d} worker(s) {r['step_time_ms']:9.2f} ms/step {r['samples_per_s']:10.0f} samples/s  "
            f"speed-up {r['speedup']:5.2f}  efficiency {r['efficiency']:4.0%}"
            for r in rows
        ]
        return lines

    def auto_check(self, metrics: dict[str, float]) -> str | None:
        """Once, after the first epoch past the warm-up (or the only one): whether the measured step agrees with
        the step the plan predicted for the worker count `scaling.num_workers: auto` chose."""
        if not self.pred or not self.pred.get("auto") or self.checked or (len(self.ratios) < 2 and self.left > 0):
            return None
        self.checked = True
        predicted, steps = self.pred["step_time_ms"], max(metrics["steps"], 1)
        wall = metrics["train_time_s"] * 1e3 / steps
        off = wall / max(predicted, 1e-9) - 1
        verdict = "agrees" if abs(off) <= self.pred["warn_off_by"] else "does not agree"
        return (
            f"{self.pred['auto']}: measured {wall:.2f} ms per training step against the predicted {predicted:.2f} ms "
            f"({off:+.0%}); the measurement {verdict} (plan.warn_off_by={self.pred['warn_off_by']})"
        )

    def warning(self, metrics: dict[str, float]) -> str | None:
        """Once, from the second epoch on (the first warms up): the likely cause of a step time off the plan."""
        if not self.pred or self.warned or len(self.ratios) < 2:
            return None
        predicted, steps = self.pred["step_time_ms"], max(metrics["steps"], 1)
        wall = metrics["train_time_s"] * 1e3 / steps  # per step of the training loop, getting batches included
        off = wall / max(predicted, 1e-9) - 1
        if abs(off) <= self.pred["warn_off_by"]:
            return None
        self.warned = True
        head = (
            f"{wall:.2f} ms per training step is {off:+.0%} off the prediction ({predicted:.2f} ms, "
            f"plan.warn_off_by={self.pred['warn_off_by']}): "
        )
        data_ms = metrics["data_time_s"] * 1e3 / steps
        if data_ms > 0.25 * wall:
            return head + (
                f"likely input-bound: {data_ms:.2f} ms of it went to getting the batch from Ray Data, the "
                f"step itself took {metrics['step_time_ms']:.2f} ms (larger batches, or more CPUs for "
                "data loading, help)"
            )
        off = metrics["step_time_ms"] / max(predicted, 1e-9) - 1
        if self.world > 1 and self.pred["exposed_comm_ms"] > 0.2 * predicted and off > 0:
            return head + (
                f"likely communication-bound: {self.pred['exposed_comm_ms']:.2f} ms of each step was "
                f"predicted for the gradient all-reduce over {self.pred['link']}; the network or the "
                "workers' placement is slower than calibrated (rerun shipyard calibrate on this cluster)"
            )
        return head + (
            "likely compute-bound: the ops ran " + ("slower" if off > 0 else "faster") + " than the "
            "hardware profile says: other load on these CPUs, another machine than the one calibrated, or "
            "a stale profile (rerun shipyard calibrate)"
        )


def refine_table(
    rows: list[dict[str, Any]], measured_step_ms: float, predicted_step_ms: float, predicted_comm_ms: float
) -> tuple[float, list[dict[str, Any]]]:
    """The plan's strong-scaling table (rows of shipyard.perf.estimate.ScalingRow as dicts) re-priced from a step
    measured in training.

    One measured step at the planned worker count says how far off the compute was: k = (measured - exposed
    all-reduce) / (predicted - exposed all-reduce), both at that worker count. Every row's compute (its step
    less its exposed all-reduce) is scaled by k; the all-reduce, calibrated on its own, stays as predicted.
    When the measured step is shorter than the predicted all-reduce, the split cannot be trusted and the whole
    step is scaled (k = measured / predicted, all-reduce included). Returns k and the new rows; speed-up and
    efficiency are against the new 1-worker row, as the plan's are (perf.estimate.scaling_table).
    """
    split = _splits(measured_step_ms, predicted_step_ms, predicted_comm_ms)
    k = (
        (measured_step_ms - predicted_comm_ms) / (predicted_step_ms - predicted_comm_ms)
        if split
        else measured_step_ms / predicted_step_ms
    )
    comm_k = 1.0 if split else k
    new = []
    for r in rows:
        comm = r["exposed_comm_ms"] * comm_k
        step = (r["step_time_ms"] - r["exposed_comm_ms"]) * k + comm
        new.append(
            {
                **r,
                "step_time_ms": step,
                "exposed_comm_ms": comm,
                "samples_per_s": r["batch_per_worker"] * r["workers"] / (step / 1e3),
                "epoch_time_s": r["epoch_time_s"] * step / r["step_time_ms"],  # the same number of steps an epoch
            }
        )
    one = next((r for r in new if r["workers"] == 1), None)  # the plan's tables always start at 1 worker
    base = one["samples_per_s"] if one else (new[0]["samples_per_s"] / new[0]["workers"] if new else 1.0)
    for r in new:
        r["speedup"] = r["samples_per_s"] / base
        r["efficiency"] = r["speedup"] / r["workers"]
    return k, new


def _splits(measured_step_ms: float, predicted_step_ms: float, predicted_comm_ms: float) -> bool:
    """Whether a measured step can be split into compute and the predicted all-reduce (refine_table)."""
    return measured_step_ms > predicted_comm_ms and predicted_step_ms > predicted_comm_ms
