"""The summary of a pipeline run as the `shipyard` command and the pipeline scripts print it."""

from __future__ import annotations

import json
from typing import Any


def format_trials(counts: dict[str, int], experiment_path: str | None = None) -> str:
    """`4: 3 completed, 1 errored (...)`: the trials by outcome, errored ones said plainly with where to look."""
    text = f"{sum(counts.values())}: " + ", ".join(f"{n} {outcome}" for outcome, n in counts.items())
    if counts.get("errored"):
        text += f" (error.txt in each errored trial's folder under {experiment_path or 'the search folder'})"
    return text


def _test_figures(s: dict[str, Any]) -> str:
    """`0.9711`, or for a task with several metrics `53.1204 (mae 42.0100, r2 0.4700)`."""
    name = s.get("test_metric_name", "accuracy")
    others = {k: v for k, v in (s.get("test_metrics") or {}).items() if k not in ("loss", name)}
    text = f"{s.get('test_metric', s.get('test_accuracy')):.4f}"
    return text + (f" ({', '.join(f'{k} {v:.4f}' for k, v in others.items())})" if others else "")


def format_summary(s: dict[str, Any]) -> str:
    rows = [
        ("best config", json.dumps(s["best_config"]) if s.get("best_config") else "(no search)"),
        (
            "trials",
            format_trials(s["trials"], s.get("search", {}).get("experiment_path"))
            if s.get("trials")
            else "(no search)",
        ),
        (
            "checkpoints",
            f"{s['search']['checkpoints_kept']} kept, {s['search']['checkpoint_disk_mb']} MiB; best: "
            f"{s['search']['best_checkpoint']}"
            if s.get("search")
            else "(no search)",
        ),
        (f"test {s.get('test_metric_name', 'accuracy')}", _test_figures(s)),
        ("model", f"{s['model_name']} v{s['model_version']}"),
        ("promoted", f"{'yes' if s['promoted'] else 'no'} ({s['promotion_reason']})"),
        ("champion", f"v{s['champion_version']}"),
        (
            "endpoint",
            f"{s['endpoint']} ({s.get('test_metric_name', 'accuracy')} "
            f"{s.get('endpoint_metric', s.get('endpoint_accuracy')):.4f}, v{s['served_version']})"
            if s.get("endpoint")
            else "not served",
        ),
        ("MLflow parent run", s["parent_run_id"]),
        (
            "time per stage",
            ", ".join(f"{k} {v:.1f}s" for k, v in s["stage_seconds"].items()) + f"; total {s['total_seconds']:.1f}s",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 60)
    return "\n".join([line, "Shipyard summary", line, *(f"{k:<{width}}  {v}" for k, v in rows), line])
