"""PNG plots of a hyperparameter search: pure matplotlib, no Ray or MLflow, so it is unit-testable.

Uses `Figure` + `FigureCanvasAgg` directly rather than pyplot: no global figure state, no GUI
backend, safe inside Ray workers and headless CI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

OUTCOME_COLOURS = {"completed": "tab:green", "stopped": "tab:orange", "errored": "tab:red", "other": "tab:gray"}
"""Fixed per outcome, so the same colour means the same thing in every plot of every search."""


@dataclass
class TrialHistory:
    trial_id: str
    config: dict[str, Any]  # sampled hyperparameters, dotted keys e.g. {"train.lr": 0.003, "model.width": 64}
    status: str  # "completed", "errored", "stopped at rung 2 (epoch 9)", "stopped at epoch 4", "paused" ...
    epochs: list[int]  # 1-based epoch numbers reported
    metric: list[float]  # objective per reported epoch (same length as epochs)
    elapsed_s: list[float]  # wall seconds since the search started, per reported epoch


def outcome(status: str) -> str:
    """Collapse a free-text trial status into one of the four colour classes of `OUTCOME_COLOURS`."""
    s = status.strip().lower()
    if s.startswith("stopped"):
        return "stopped"
    return s if s in ("completed", "errored") else "other"


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def _learning_curves_figure(histories: list[TrialHistory], metric: str, rungs: list[int]) -> Figure:
    """Rungs are the epochs where ASHA compares trials and stops the worst (Li et al. 2020, "A System
    for Massively Parallel Hyperparameter Tuning", MLSys); lines ending at a rung show its decisions."""
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    plotted = [h for h in histories if h.epochs]
    counts: dict[str, int] = {}
    for h in plotted:
        counts[outcome(h.status)] = counts.get(outcome(h.status), 0) + 1
    labelled: set[str] = set()
    for h in plotted:
        kind = outcome(h.status)
        label = f"{kind} ({counts[kind]})" if kind not in labelled else None
        labelled.add(kind)
        ax.plot(h.epochs, h.metric, color=OUTCOME_COLOURS[kind], alpha=0.8, marker=".", label=label)
    for i, epoch in enumerate(rungs, start=1):
        ax.axvline(epoch, color="black", linestyle="--", linewidth=0.8)
        ax.text(epoch, 1.0, f" rung {i}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch, {len(plotted)} trials")
    if counts:
        ax.legend(loc="best")
    return fig


def learning_curves(histories: list[TrialHistory], metric: str, rungs: list[int], path: Path) -> Path:
    """One line per trial coloured by outcome, dashed lines at the ASHA rungs; trials with no epochs are skipped."""
    return _save(_learning_curves_figure(histories, metric, rungs), path)


def _best(h: TrialHistory, mode: str) -> float | None:
    values = [v for v in h.metric if not math.isnan(v)]
    return (max(values) if mode == "max" else min(values)) if values else None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # a bool is a choice, not a magnitude


def _scatter_param(ax: Axes, key: str, points: list[tuple[Any, float, str]], metric: str) -> None:
    values = [v for v, _, _ in points]
    if all(_is_number(v) for v in values):
        xs = [float(v) for v in values]
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")  # loguniform ranges (e.g. lr 1e-4..1e-2) are unreadable on a linear axis
    else:
        categories = sorted({str(v) for v in values})
        xs = [float(categories.index(str(v))) for v in values]
        ax.set_xticks(range(len(categories)), categories, rotation=30, fontsize=8)
        ax.set_xlim(-0.5, len(categories) - 0.5)  # keep the end categories off the frame
    ax.scatter(xs, [y for _, y, _ in points], c=[OUTCOME_COLOURS[k] for _, _, k in points], alpha=0.8)
    ax.set(xlabel=key, ylabel=f"best {metric}")


def _objective_vs_params_figure(histories: list[TrialHistory], metric: str, mode: str) -> Figure:
    """Each trial's best epoch, not its last: ASHA stops trials early, so the last epoch would penalise them."""
    keys = sorted({k for h in histories for k in h.config})
    fig = Figure(figsize=(4 * max(len(keys), 1), 4), layout="constrained")
    if not keys:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no hyperparameters searched", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        points = [
            (h.config[key], best, outcome(h.status))
            for h in histories
            if key in h.config and (best := _best(h, mode)) is not None
        ]
        _scatter_param(ax, key, points, metric)
    present = [k for k in OUTCOME_COLOURS if any(outcome(h.status) == k and h.epochs for h in histories)]
    fig.legend(
        handles=[Line2D([], [], color=OUTCOME_COLOURS[k], marker="o", linestyle="", label=k) for k in present],
        loc="outside right upper",
    )
    fig.suptitle(f"best {metric} ({mode}) per hyperparameter")
    return fig


def objective_vs_params(histories: list[TrialHistory], metric: str, mode: str, path: Path) -> Path:
    """One subplot per searched key (sorted): value against the trial's best metric, coloured by outcome."""
    return _save(_objective_vs_params_figure(histories, metric, mode), path)


def write_search_plots(
    histories: list[TrialHistory], metric: str, mode: str, rungs: list[int], out_dir: Path
) -> list[Path]:
    """Write learning_curves.png and objective_vs_params.png into out_dir; returns both paths."""
    out_dir = Path(out_dir)
    return [
        learning_curves(histories, metric, rungs, out_dir / "learning_curves.png"),
        objective_vs_params(histories, metric, mode, out_dir / "objective_vs_params.png"),
    ]
