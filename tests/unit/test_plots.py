"""Search plots: real PNGs on disk, and the figure contents that make them readable."""

from pathlib import Path

import matplotlib.image
import pytest

from shipyard.tune.plots import (
    TrialHistory,
    _learning_curves_figure,
    _objective_vs_params_figure,
    learning_curves,
    objective_vs_params,
    outcome,
    write_search_plots,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _trial(i: int, status: str, config: dict, metric: list[float]) -> TrialHistory:
    epochs = list(range(1, len(metric) + 1))
    return TrialHistory(f"t{i}", config, status, epochs, metric, [2.0 * e for e in epochs])


def _search() -> list[TrialHistory]:
    return [
        _trial(0, "completed", {"train.lr": 1e-4, "model.name": "mlp"}, [0.5, 0.7, 0.8, 0.85]),
        _trial(1, "completed", {"train.lr": 3e-3, "model.name": "cnn"}, [0.6, 0.8, 0.9, 0.95]),
        _trial(2, "stopped at rung 1 (epoch 1)", {"train.lr": 1e-2, "model.name": "mlp"}, [0.2]),
        _trial(3, "stopped at epoch 2", {"train.lr": 5e-2, "model.name": "cnn"}, [0.3, 0.35]),
        _trial(4, "errored", {"train.lr": 1e-3, "model.name": "mlp"}, [0.4]),
        _trial(5, "errored", {"train.lr": 2e-3, "model.name": "cnn"}, []),  # died before its first report
    ]


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # something was drawn, not a blank canvas


@pytest.mark.parametrize(
    "status, expected",
    [
        ("completed", "completed"),
        ("errored", "errored"),
        ("stopped at rung 2 (epoch 9)", "stopped"),
        ("stopped at epoch 4", "stopped"),
        ("stopped", "stopped"),
        ("paused", "other"),
        ("running", "other"),
        ("", "other"),
    ],
)
def test_outcome_maps_statuses(status, expected):
    assert outcome(status) == expected


def test_write_search_plots_writes_two_valid_pngs(tmp_path):
    out_dir = tmp_path / "nested" / "plots"  # parent does not exist yet
    paths = write_search_plots(_search(), "val_accuracy", "max", [1, 3], out_dir)
    assert [p.name for p in paths] == ["learning_curves.png", "objective_vs_params.png"]
    for p in paths:
        assert p.parent == out_dir
        _assert_png(p)


def test_legend_counts_outcomes_and_skips_trials_without_epochs():
    fig = _learning_curves_figure(_search(), "val_accuracy", [1, 3])
    ax = fig.axes[0]
    labels = sorted(t.get_text() for t in ax.get_legend().get_texts())
    assert labels == ["completed (2)", "errored (1)", "stopped (2)"]  # the epoch-less errored trial is skipped
    assert len(ax.get_lines()) == 5 + 2  # five trial curves + two rung lines
    assert "val_accuracy" in ax.get_title()


def test_rung_lines_are_dashed_and_labelled():
    ax = _learning_curves_figure(_search(), "loss", [1, 3, 9]).axes[0]
    rung_lines = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert sorted(line.get_xdata()[0] for line in rung_lines) == [1, 3, 9]
    assert [t.get_text().strip() for t in ax.texts] == ["rung 1", "rung 2", "rung 3"]


def test_empty_rungs_draw_no_rung_lines(tmp_path):
    ax = _learning_curves_figure(_search(), "loss", []).axes[0]
    assert not [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert not ax.texts
    _assert_png(learning_curves(_search(), "loss", [], tmp_path / "lc.png"))


def test_single_trial(tmp_path):
    one = [_trial(0, "completed", {"train.lr": 1e-3}, [0.9, 0.8])]
    fig = _learning_curves_figure(one, "loss", [2])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["completed (1)"]
    paths = write_search_plots(one, "loss", "min", [2], tmp_path)
    for p in paths:
        _assert_png(p)


def test_only_trials_without_epochs_still_write(tmp_path):
    empty = [_trial(0, "errored", {"train.lr": 1e-3}, [])]
    assert _learning_curves_figure(empty, "loss", [1]).axes[0].get_legend() is None
    assert len(write_search_plots(empty, "loss", "min", [1], tmp_path)) == 2


def test_subplots_are_sorted_keys_with_log_x_for_wide_positive_ranges():
    fig = _objective_vs_params_figure(_search(), "val_accuracy", "max")
    assert [ax.get_xlabel() for ax in fig.axes] == ["model.name", "train.lr"]
    by_key = {ax.get_xlabel(): ax for ax in fig.axes}
    assert by_key["train.lr"].get_xscale() == "log"  # 1e-4..5e-2: ratio 500
    assert by_key["model.name"].get_xscale() == "linear"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["completed", "stopped", "errored"]


def test_narrow_or_nonpositive_ranges_stay_linear():
    narrow = [_trial(i, "completed", {"model.width": w}, [0.5]) for i, w in enumerate([16, 32, 64])]
    signed = [_trial(i, "completed", {"train.shift": s}, [0.5]) for i, s in enumerate([-1.0, 0.01, 100.0])]
    assert _objective_vs_params_figure(narrow, "loss", "min").axes[0].get_xscale() == "linear"
    assert _objective_vs_params_figure(signed, "loss", "min").axes[0].get_xscale() == "linear"


def test_categorical_values_get_tick_labels(tmp_path):
    trials = [
        _trial(i, "completed", {"model.name": name, "train.amp": amp}, [0.1 * (i + 1)])
        for i, (name, amp) in enumerate([("mlp", True), ("cnn", False), ("resnet", True)])
    ]
    fig = _objective_vs_params_figure(trials, "loss", "min")
    by_key = {ax.get_xlabel(): ax for ax in fig.axes}
    assert [t.get_text() for t in by_key["model.name"].get_xticklabels()] == ["cnn", "mlp", "resnet"]
    assert [t.get_text() for t in by_key["train.amp"].get_xticklabels()] == ["False", "True"]  # bools are choices
    _assert_png(objective_vs_params(trials, "loss", "min", tmp_path / "obj.png"))


@pytest.mark.parametrize("mode, expected", [("max", [0.85, 0.95]), ("min", [0.5, 0.6])])
def test_objective_is_best_over_reported_epochs(mode, expected):
    completed = [h for h in _search() if h.status == "completed"]
    ax = _objective_vs_params_figure(completed, "val_accuracy", mode).axes[0]
    ys = sorted(float(y) for y in ax.collections[0].get_offsets()[:, 1])
    assert ys == pytest.approx(expected)


def test_no_hyperparameters_says_so(tmp_path):
    trials = [_trial(0, "completed", {}, [0.5, 0.6])]
    fig = _objective_vs_params_figure(trials, "loss", "min")
    assert len(fig.axes) == 1
    assert [t.get_text() for t in fig.axes[0].texts] == ["no hyperparameters searched"]
    _assert_png(objective_vs_params(trials, "loss", "min", tmp_path / "obj.png"))
