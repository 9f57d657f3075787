"""ASHA's rung maths, without Ray."""
from shipyard.tuning import asha_rungs, rung_counts, trial_status


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
