"""A plan as people read it: the lines the pipeline logs, `shipyard plan`'s tables and its scaling plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shipyard.config import Config

if TYPE_CHECKING:
    from shipyard.perf.plan import Plan


def summary_lines(plan: Plan, top: int = 3) -> list[str]:
    """The pipeline's lines before training: step, epoch, training time and the heaviest layers."""
    s = plan.step
    layers = ", ".join(f"{lt.layer} {lt.kind} {_ms(lt.time_ms)} ms ({lt.bound})" for lt in s.top_layers(top))
    return [
        f"plan ({plan.device.name}): step {_ms(s.step_time_ms)} ms{_uncertainty(plan)} per {s.batch_per_worker} rows "
        f"on each of {s.workers} worker(s) (forward {_ms(s.forward_ms)}, backward {_ms(s.backward_ms)}, optimizer "
        f"{_ms(s.optimizer_ms)}, all-reduce {_ms(s.exposed_comm_ms)} not hidden, other DDP costs "
        f"{_ms(s.ddp_overhead_ms)}); epoch {plan.epoch_s:.2f} s; "
        f"training ~{plan.train_s:.1f} s plus Ray's start-up",
        f"plan: heaviest layers {layers}",
    ] + (
        [
            f"plan: measured mode: the real step ran on the driver at {plan.measured.work.batch_size} rows: "
            f"{_ms(plan.measured.step_ms)} ms; the step above is priced from it (the analytical model alone: "
            f"{_ms(plan.analytical_step.step_time_ms)} ms)"
        ]
        if plan.measured is not None and plan.analytical_step is not None
        else []
    )


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def format_plan(plan: Plan, cfg: Config, top: int = 5) -> str:
    d, s = plan.device, plan.step
    link = plan.intra if s.workers <= plan.workers_per_node else plan.inter
    lines = [
        f"plan for '{cfg.name}': model {cfg.model.name} ({plan.param_count:,} parameters), "
        f"global batch {cfg.train.batch_size}, {plan.rows_train} training rows, {cfg.train.epochs} epochs",
        f"hardware: {d.name} ({d.source}); {plan.workers_per_node} workers per node"
        + (
            f"; all-reduce over {link.name} ({link.latency_us:g} us + bytes / {link.bandwidth_gbps:g} GB/s)"
            if link
            else ""
        ),
        "",
        f"top layers by time (one step, {s.workers} worker(s) x {s.batch_per_worker} rows):",
        f"  {'layer':24s} {'kind':18s} {'time_ms':>9s} {'MFLOP':>9s} {'MB moved':>9s}  bound",
    ]
    for lt in s.top_layers(top):
        lines.append(
            f"  {lt.layer:24s} {lt.kind:18s} {_ms(lt.time_ms):>9s} {lt.flops / 1e6:9.2f} "
            f"{lt.bytes_moved / 1e6:9.3f}  {lt.bound}"
        )
    lines += [
        "",
        f"predicted step time {_ms(s.step_time_ms)} ms{_uncertainty(plan)} (forward {_ms(s.forward_ms)}, backward "
        f"{_ms(s.backward_ms)}, optimizer {_ms(s.optimizer_ms)}, all-reduce {_ms(s.comm_ms)} of which "
        f"{_ms(s.exposed_comm_ms)} not hidden, other DDP costs {_ms(s.ddp_overhead_ms)}) with "
        f"scaling.num_workers={s.workers}",
        f"predicted epoch time {plan.epoch_s:.2f} s (incl. validation); {cfg.train.epochs} epochs "
        f"{plan.train_s:.1f} s of training",
    ]
    for title, rows in (
        ("strong scaling (global batch fixed)", plan.strong),
        ("weak scaling (batch per worker fixed)", plan.weak),
    ):
        lines += [
            "",
            title + ":",
            f"  {'workers':>7s} {'nodes':>5s} {'batch/w':>7s} {'step_ms':>9s} "
            f"{'comm_ms':>8s} {'samples/s':>11s} {'speedup':>7s} {'effic.':>6s} {'epoch_s':>8s}",
        ]
        for r in rows:
            lines.append(
                f"  {r.workers:7d} {r.nodes:5d} {r.batch_per_worker:7d} {_ms(r.step_time_ms):>9s} "
                f"{_ms(r.exposed_comm_ms):>8s} {r.samples_per_s:11.0f} {r.speedup:7.2f} "
                f"{r.efficiency:6.0%} {r.epoch_time_s:8.3f}"
            )
    rec = plan.recommended
    lines += [
        "",
        f"recommended: {rec.workers} worker(s) ({rec.speedup:.2f}x, efficiency {rec.efficiency:.0%}): the "
        "most workers whose strong-scaling efficiency stays >= 70 % while throughput still grows"
        + ("" if rec.workers > 1 else "; this model is too small to gain from more workers at this batch"),
    ]
    if plan.search_wall_s is not None:
        t = cfg.tune
        lines.append(
            f"search: {t.num_samples} trials, {t.scheduler}, {t.max_concurrent_trials} at a time -> "
            f"~{plan.search_trial_epochs:.0f} trial-epochs (rung maths), ~{plan.search_wall_s:.0f} s wall "
            "(incl. ~3 s to start each trial)"
        )
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def plot_scaling(plan: Plan, path: str | Path) -> Path:
    """Speed-up against workers: ideal, strong and weak scaling, the recommendation marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [r.workers for r in plan.strong]
    ax.plot(xs, xs, color="tab:gray", linestyle=":", label="ideal")
    ax.plot(xs, [r.speedup for r in plan.strong], marker="o", label="strong (global batch fixed)")
    ax.plot(xs, [r.speedup for r in plan.weak], marker="s", label="weak (batch per worker fixed)")
    rec = plan.recommended
    ax.scatter(
        [rec.workers],
        [rec.speedup],
        s=160,
        facecolors="none",
        edgecolors="tab:red",
        zorder=3,
        label=f"recommended: {rec.workers}",
    )
    if plan.workers_per_node < max(xs):
        ax.axvline(plan.workers_per_node, color="tab:gray", linewidth=0.8)
        ax.text(plan.workers_per_node, ax.get_ylim()[1] * 0.95, " one node", fontsize=8, va="top")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("workers")
    ax.set_ylabel("speed-up over 1 worker (samples/s)")
    ax.set_title(f"predicted scaling on {plan.device.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


def _uncertainty(plan: Plan) -> str:
    """` ± 4 %`: half the spread of what the plan was made from (the measured mode's last timing rounds, else
    the calibration's repeated probes); nothing for a data sheet."""
    spread = plan.measured.spread if plan.measured is not None else plan.device.spread
    return f" ± {spread / 2:.1%}" if spread > 0 else ""
