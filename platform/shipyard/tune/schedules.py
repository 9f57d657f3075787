"""When the search judges its trials: ASHA's rungs, HyperBand's brackets, and each trial's outcome.

Pure maths, no Ray: the rung settings are explained in the run's output before the search starts, and the
same `Schedule` names each trial's outcome (MLflow tag, progress lines, plots) afterwards.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from shipyard.config import Config

log = logging.getLogger(__name__)

EPOCHS = "epochs_done"
"""The schedulers' clock: epochs a trial has trained, reported with each epoch's metrics. Not Tune's
training_iteration, which restarts when a multi-worker trial resumes from its Train job's own checkpoint."""


def asha_rungs(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """Epochs at which ASHA compares a trial with its peers: grace * rf^k below max_t.

    Source: Li et al., "A System for Massively Parallel Hyperparameter Tuning" (MLSys 2020), Alg. 1;
    Ray's ASHAScheduler builds the same milestones (ray/tune/schedulers/async_hyperband.py, _Bracket).
    """
    rungs, t = [], float(grace_period)
    while t < max_t:
        rungs.append(int(t))
        t *= reduction_factor
    return rungs


def hyperband_brackets(max_t: int, reduction_factor: float) -> list[tuple[int, list[int], int]]:
    """HyperBand's brackets as (trials in the bracket, epochs at which it halves them, epoch at which its last
    trials stop), in the order Tune fills them: the first runs every trial to max_t, later ones start more
    trials on fewer epochs (and may end below max_t when max_t is not a power of the reduction factor).

    Source: Li et al., "Hyperband" (JMLR 2018), Alg. 1, with Ray's rounding
    (ray/tune/schedulers/hyperband.py: s_max_1, _get_n0, _get_r0, _Bracket.successive_halving).
    """
    eta = reduction_factor
    s_max_1 = int(round(math.log(max_t) / math.log(eta))) + 1
    brackets = []
    for s in range(s_max_1):
        n0, r = int(math.ceil(s_max_1 / (s + 1) * eta**s)), int(max_t * eta**-s)
        if r == 0:
            continue
        halvings = []
        for _ in range(s):
            halvings.append(r)
            r = int(min(r * eta, max_t))
        brackets.append((n0, halvings, r))
    return brackets


@dataclass(frozen=True)
class Schedule:
    """When the scheduler judges trials: the statuses of trials and the rung marks of the plots come from it."""

    max_t: int
    rungs: list[int]
    ends: tuple[int, ...] = ()
    """Epochs below max_t at which a HyperBand bracket's last trials stop: for them, that is completion."""

    def status(self, epochs_run: int, errored: bool) -> str:
        return trial_status(epochs_run, errored, self.rungs, self.max_t, self.ends)


def rung_counts(epochs_run: list[int], rungs: list[int], max_t: int) -> dict[int, int]:
    """How many trials reached each rung (and max_t) given the epochs each trial ran."""
    return {r: sum(e >= r for e in epochs_run) for r in [*rungs, max_t]}


def trial_status(epochs_run: int, errored: bool, rungs: list[int], max_t: int, ends: tuple[int, ...] = ()) -> str:
    """`completed`, `errored`, or `stopped at rung r (epoch e)` for one trial."""
    if errored:
        return "errored"
    if epochs_run >= max_t or epochs_run in ends:
        return "completed"
    reached = [i for i, r in enumerate(rungs) if epochs_run >= r]
    return f"stopped at rung {reached[-1] + 1} (epoch {epochs_run})" if reached else f"stopped at epoch {epochs_run}"


def explain_schedule(cfg: Config) -> Schedule:
    """Log which epochs the scheduler judges trials at, before the search starts."""
    t, max_t = cfg.tune, cfg.train.epochs
    if t.scheduler == "asha":
        rungs = asha_rungs(max_t, min(t.grace_period, max_t), t.reduction_factor)
        log.info(
            "ASHA: max_t %d epochs, grace_period %d, reduction_factor %g -> rungs at epochs %s: at each rung "
            "a trial goes on only if it is in the top 1/%g of the trials that reached it",
            max_t,
            t.grace_period,
            t.reduction_factor,
            rungs,
            t.reduction_factor,
        )
        return Schedule(max_t, rungs)
    if t.scheduler == "hyperband":
        brackets = hyperband_brackets(max_t, t.reduction_factor)
        first = 1
        for i, (n, halvings, last) in enumerate(brackets, 1):
            log.info(
                "HyperBand bracket %d: trials %d-%d, halved at epochs %s (the top 1/%g go on), its last "
                "trials stop at epoch %d",
                i,
                first,
                first + n - 1,
                halvings or "never",
                t.reduction_factor,
                last,
            )
            first += n
        log.info(
            "HyperBand pauses a trial at a rung until its bracket has caught up: running trials are limited "
            "by CPUs (tune.cpus_per_trial), not by tune.max_concurrent_trials"
        )
        return Schedule(
            max_t,
            sorted({h for _, hs, _ in brackets for h in hs}),
            tuple(sorted({last for _, _, last in brackets if last < max_t})),
        )
    log.info(
        "scheduler %s over %d epochs%s",
        t.scheduler,
        max_t,
        f", perturbing every {t.perturbation_interval} epochs" if t.scheduler == "pbt" else "",
    )
    return Schedule(max_t, [])
