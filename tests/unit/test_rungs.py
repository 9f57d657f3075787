"""Scheduler maths, checkpoint retention and trial sizing, without Ray."""

import pytest

from shipyard import ConfigError, load_config
from shipyard.train.checkpoints import checkpoints_to_delete
from shipyard.tune.schedules import Schedule, asha_rungs, hyperband_brackets, rung_counts, trial_status
from shipyard.tune.search import check_space
from shipyard.tune.trials import trials_at_once


def test_rungs_grow_by_the_reduction_factor_below_max_t():
    assert asha_rungs(15, 3, 3) == [3, 9]
    assert asha_rungs(6, 1, 2) == [1, 2, 4]
    assert asha_rungs(3, 3, 3) == []  # grace period == max_t: nobody is judged early


def test_rung_counts_and_statuses():
    rungs = asha_rungs(15, 3, 3)
    assert rung_counts([3, 3, 9, 15], rungs, 15) == {3: 4, 9: 2, 15: 1}
    assert trial_status(3, False, rungs, 15) == "stopped at rung 1 (epoch 3)"
    assert trial_status(9, False, rungs, 15) == "stopped at rung 2 (epoch 9)"
    assert trial_status(15, False, rungs, 15) == "completed"
    assert trial_status(2, True, rungs, 15) == "errored"


def test_hyperband_brackets_match_rays_rounding():
    # max_t 9, eta 3: Ray fills a bracket of 3 trials run to 9 epochs, then 5 halved at 3, then 9 halved at 1 and 3
    assert hyperband_brackets(9, 3) == [(3, [], 9), (5, [3], 9), (9, [1, 3], 9)]
    assert hyperband_brackets(3, 3) == [(2, [], 3), (3, [1], 3)]
    # max_t not a power of eta: the last bracket starts at int(15/9) = 1 epoch and its survivors stop at 9
    assert hyperband_brackets(15, 3) == [(3, [], 15), (5, [5], 15), (9, [1, 3], 9)]


def test_a_hyperband_trial_that_ends_its_bracket_below_max_t_is_completed():
    schedule = Schedule(15, [1, 3, 5], ends=(9,))
    assert schedule.status(9, False) == "completed"
    assert schedule.status(3, False) == "stopped at rung 2 (epoch 3)"
    assert schedule.status(15, False) == "completed"


def test_keep_the_best_k_checkpoints_and_the_protected_ones():
    scores = {"a/1": 0.5, "a/2": 0.9, "b/1": 0.7, "c/1": 0.2, "c/2": 0.3}
    assert sorted(checkpoints_to_delete(scores, 2, "max", set())) == ["a/1", "c/1", "c/2"]
    assert sorted(checkpoints_to_delete(scores, 2, "max", {"c/2"})) == ["a/1", "c/1"]
    assert sorted(checkpoints_to_delete(scores, 2, "min", set())) == ["a/1", "a/2", "b/1"]  # val_loss
    assert checkpoints_to_delete(scores, 10, "max", set()) == []


def cfg(**tune):
    return load_config(None, {f"tune.{k}": v for k, v in tune.items()})


def test_trials_at_once_is_capped_by_cpus_and_max_concurrent_trials():
    assert trials_at_once(cfg(max_concurrent_trials=4, num_samples=8), [2.0]) == 2
    assert trials_at_once(cfg(max_concurrent_trials=1), [2.0, 2.0]) == 1
    assert trials_at_once(cfg(max_concurrent_trials=4, num_samples=8), [2.0, 2.0]) == 4
    assert trials_at_once(cfg(max_concurrent_trials=4, workers_per_trial=2, cpus_per_trial=2), [2.0]) == 1
    assert trials_at_once(cfg(max_concurrent_trials=4, workers_per_trial=2, cpus_per_trial=2), [1.0, 1.0]) == 1


@pytest.mark.parametrize(
    "tune, nodes, match",
    [
        ({"cpus_per_trial": 4}, [2.0, 2.0], r"tune.cpus_per_trial=4, but the largest Ray node has 2 CPUs"),
        ({"workers_per_trial": 3, "cpus_per_trial": 6}, [2.0, 2.0], r"tune.workers_per_trial=3 workers of 2 CPUs"),
        ({"workers_per_trial": 2, "cpus_per_trial": 0.01}, [2.0], r"tune.cpus_per_trial=0.01 is too small for 2"),
    ],
)
def test_a_trial_that_can_never_fit_is_refused(tune, nodes, match):
    with pytest.raises(ConfigError, match=match):
        trials_at_once(cfg(**tune), nodes)


def test_multi_worker_trials_refuse_schedulers_that_pause_or_clone():
    for scheduler in ("pbt", "hyperband"):
        with pytest.raises(ConfigError, match=f"tune.scheduler={scheduler} pauses or clones"):
            check_space(cfg(scheduler=scheduler, workers_per_trial=2))
