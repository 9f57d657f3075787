"""PBT's decisions without Ray: which space keys it may mutate, perturbed values kept in range, and when a search
whose trials errored fails."""

from pathlib import Path

import pytest

from shipyard import ConfigError, TrainingError, load_config
from shipyard.report import format_summary, format_trials
from shipyard.tune.pbt import clip_to_space, pbt_keys, shape_keys
from shipyard.tune.search import check_errored_trials, check_space

ROOT = Path(__file__).resolve().parents[2]


def pbt(space, **extra):
    return load_config(None, {"tune.scheduler": "pbt", "tune.space": space, **extra})


def test_the_digits_space_keeps_the_width_per_trial_and_mutates_the_learning_rate():
    cfg = load_config(ROOT / "pipelines/configs/digits.yaml", {"tune.scheduler": "pbt"})
    mutated, fixed = pbt_keys(cfg, 64, 10)
    assert mutated == ["train.lr"]
    assert fixed == {"model.hidden": "model.hidden=64 vs 128: 0.weight (64, 64) vs (128, 64)"}
    check_space(cfg)  # the preflight passes


def test_keys_that_keep_the_shapes_are_mutated():
    cfg = pbt(
        {
            "model.dropout": {"uniform": [0.0, 0.5]},
            "model.options.heads": {"choice": [2, 4]},
            "train.weight_decay": {"choice": [0.0, 0.01]},
            "model.depth": {"randint": [1, 2]},
        },
        **{"model.name": "transformer"},
    )
    # randint [1, 2] only ever samples 1: one depth, one shape; heads split the same width differently
    assert shape_keys(cfg, 64, 10) == {}


def test_depth_and_the_model_itself_change_the_shapes():
    cfg = pbt(
        {
            "model.depth": {"randint": [1, 4]},
            "model.name": {"choice": ["mlp", "cnn"]},
            "train.lr": {"loguniform": [1e-4, 1e-2]},
        }
    )
    fixed = shape_keys(cfg, 64, 10)
    assert set(fixed) == {"model.depth", "model.name"}
    assert fixed["model.depth"].startswith("model.depth=1 vs 3: ")
    assert "absent" in fixed["model.name"]  # the cnn has no 0.weight at all


def test_a_space_of_shape_keys_only_is_refused_before_ray_naming_the_keys_and_the_fix():
    with pytest.raises(ConfigError) as err:
        check_space(pbt({"model.hidden": {"choice": [64, 256]}}))
    message = str(err.value)
    assert "model.hidden=64 vs 256: 0.weight (64, 64) vs (256, 64)" in message
    assert "tune.scheduler=asha" in message and "train.lr" in message


def test_a_value_the_model_does_not_build_with_names_the_key():
    cfg = pbt(
        {"model.hidden": {"choice": [64, 30]}, "train.lr": {"loguniform": [1e-4, 1e-2]}},
        **{"model.name": "transformer"},
    )
    with pytest.raises(ConfigError, match=r"tune.space.model.hidden: .*model.hidden=30.*multiple of"):
        check_space(cfg)


def test_other_schedulers_do_not_build_the_model():
    check_space(
        load_config(
            None,
            {
                "tune.space": {"model.hidden": {"choice": [64, 30]}},
                "model.name": "transformer",
                "tune.scheduler": "asha",
            },
        )
    )


def test_perturbed_values_are_put_back_inside_the_given_range():
    space = {
        "model.dropout": {"uniform": [0.0, 0.9]},
        "train.lr": {"loguniform": [1e-4, 1e-2]},
        "model.hidden": {"choice": [64, 128]},
        "model.depth": {"randint": [1, 4]},
    }
    out = clip_to_space(
        {"model.dropout": 1.08, "train.lr": 5e-5, "model.hidden": 128, "model.depth": 4, "other": 1}, space
    )
    assert out == {"model.dropout": 0.9, "train.lr": 1e-4, "model.hidden": 128, "model.depth": 3, "other": 1}
    assert isinstance(out["model.depth"], int)


def test_a_search_whose_trials_mostly_errored_fails_and_names_the_first_error_and_the_logs():
    assert check_errored_trials(4, [], "/r/exp") is None
    warning = check_errored_trials(4, ["RuntimeError: boom", "ValueError: x"], "/r/exp")
    assert warning.startswith("2 of 4 trials errored; the first: RuntimeError: boom. Trial logs: /r/exp")
    with pytest.raises(TrainingError) as err:
        check_errored_trials(4, ["RuntimeError: size mismatch", "FileNotFoundError: gone", "E: 3"], "/r/exp")
    assert "3 of 4 trials errored; the first: RuntimeError: size mismatch. Trial logs: /r/exp" in str(err.value)


def test_the_summary_says_errored_trials_plainly():
    assert format_trials({"completed": 3, "stopped at rung 1": 1}) == "4: 3 completed, 1 stopped at rung 1"
    line = format_trials({"completed": 3, "errored": 1}, "/r/exp")
    assert line == "4: 3 completed, 1 errored (error.txt in each errored trial's folder under /r/exp)"
    summary = {
        "best_config": None,
        "test_accuracy": 0.9,
        "model_name": "digits",
        "model_version": 1,
        "promoted": True,
        "promotion_reason": "first",
        "champion_version": 1,
        "parent_run_id": "p",
        "stage_seconds": {"train": 1.0},
        "total_seconds": 1.0,
    }
    assert "trials             (no search)" in format_summary(summary)
