"""How long a search takes: trial-epochs from the scheduler's rung maths, then waves of concurrent trials.

epochs = expected_trial_epochs("asha", num_samples=16, max_t=15, grace_period=1, reduction_factor=3)
wall_s = search_wall_s(epochs, 16, epoch_s=0.4, concurrency=2)
"""

from __future__ import annotations

import math

from shipyard.tune.schedules import asha_rungs, hyperband_brackets

TRIAL_START_S = 3.0
"""A new trial: a Python worker process and the torch import (2-4 s on 2 cores, measured with Ray 2.60 and
torch 2.13)."""


def expected_trial_epochs(
    scheduler: str, num_samples: int, max_t: int, grace_period: int = 1, reduction_factor: float = 3
) -> float:
    """Epochs all trials of a search train together.

    ASHA: every trial trains to the first rung; 1/rf of the trials reaching a rung go on to the next, and the
    survivors of the last rung to max_t (Li et al., MLSys 2020, Alg. 1: asynchronous promotion keeps the top
    1/rf of each rung). HyperBand: each bracket's n0 trials halve by rf at its rungs (Li et al., JMLR 2018,
    Alg. 1, with Ray's rounding in schedules.hyperband_brackets); brackets are filled in order until
    num_samples trials are placed. FIFO and PBT: every trial trains max_t epochs.
    """
    if scheduler == "asha":
        rungs = asha_rungs(max_t, min(grace_period, max_t), reduction_factor)
        total, alive, done = 0.0, float(num_samples), 0
        for mark in rungs:
            total += alive * (mark - done)
            done = mark
            alive = asha_survivors(alive, reduction_factor)
        return total + alive * (max_t - done)
    if scheduler == "hyperband":
        total, left = 0.0, num_samples
        while left > 0:
            for n0, halvings, last in hyperband_brackets(max_t, reduction_factor):
                n = min(n0, left)
                left -= n
                alive, done = float(n), 0
                for mark in [*halvings, last]:
                    total += alive * (mark - done)
                    done = mark
                    alive = max(1.0, alive / reduction_factor)
                if left <= 0:
                    break
        return total
    return float(num_samples * max_t)


def asha_survivors(arrivals: float, reduction_factor: float) -> float:
    """Expected trials that go on from a rung `arrivals` trials reach one after another.

    Ray's ASHA (ray/tune/schedulers/async_hyperband.py, _Bracket.on_result) stops an arriving trial whose metric is
    below the (1 - 1/rf) percentile (numpy's linear interpolation) of the metrics recorded at that rung before
    it, so early arrivals go on more often than 1/rf. With metrics in random order, the k-th arrival ranks j-th
    among the k-1 before it with probability 1/k for each j; it passes when it lies above the interpolated
    percentile at position p = (k-2)(1-1/rf): surely when j >= floor(p) + 2, with probability 1 - frac(p) when
    j = floor(p) + 1.
    """
    total = 0.0
    for k in range(1, int(round(arrivals)) + 1):
        if k == 1:
            total += 1.0  # nothing recorded yet: no cutoff
            continue
        p = (k - 2) * (1 - 1 / reduction_factor)
        base = math.floor(p)
        sure = max(0, k - (base + 2))  # j in base+2 .. k-1
        total += (sure + (1 - (p - base))) / k
    return total


def search_wall_s(trial_epochs: float, num_samples: int, epoch_s: float, concurrency: int) -> float:
    """Trial-epochs spread over `concurrency` slots, plus one trial start per trial in each slot."""
    slots = max(1, min(concurrency, num_samples))
    return trial_epochs * epoch_s / slots + math.ceil(num_samples / slots) * TRIAL_START_S
