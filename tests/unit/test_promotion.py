import random

import pytest

from shipyard.track.promotion import (
    Claim,
    Decision,
    Mark,
    Move,
    Read,
    Release,
    Score,
    Sleep,
    View,
    WriteHistory,
    choose,
    decide,
    next_history,
    outcome,
    steps,
)


def test_first_candidate_always_wins():
    assert decide(0.10, None).promote


def test_better_candidate_takes_champion():
    d = decide(0.97, 0.95)
    assert d.promote and "beats" in d.reason


def test_worse_or_equal_candidate_keeps_champion():
    assert not decide(0.93, 0.95).promote
    assert not decide(0.95, 0.95).promote  # a tie moves nothing


# -- choosing among concurrent candidates ----------------------------------------------------------------------


def test_choose_takes_the_best_contender_only_if_it_strictly_beats_the_champion():
    assert choose(None, {"2": 0.80, "3": 0.90}) == "3"
    assert choose("1", {"1": 0.85, "2": 0.80, "3": 0.90}) == "3"
    assert choose("1", {"1": 0.95, "2": 0.80, "3": 0.90}) == "1"  # a worse candidate never takes champion
    assert choose("1", {"1": 0.90, "3": 0.90}) == "1"  # a tie keeps the champion
    assert choose(None, {"4": 0.90, "3": 0.90, "2": 0.5}) == "3"  # contenders tied: the lower version


def test_choose_leaves_an_unscorable_champion_and_skips_unscorable_contenders():
    assert choose("1", {"1": None, "2": 0.99}) == "1"
    assert choose("1", {"1": 0.5, "2": None}) == "1"
    assert choose(None, {"2": None}) is None


def test_next_history_records_a_move_made_outside_shipyard_and_never_repeats_the_last_entry():
    assert next_history([], None, "1") == ["1"]
    assert next_history(["1"], "1", "2") == ["1", "2"]
    assert next_history(["1"], "3", "2") == ["1", "3", "2"]  # the alias was on 3 without a history entry
    assert next_history(["1", "2"], None, "2") == ["1", "2"]
    assert next_history([str(i) for i in range(50)], "49", "x")[-2:] == ["49", "x"]
    assert len(next_history([str(i) for i in range(50)], "49", "x")) == 50


def test_outcome_names_the_concurrent_winner():
    assert outcome("2", 0.9, "1", 0.8, "2", 0.9) == Decision(True, decide(0.9, 0.8).reason)
    lost = outcome("2", 0.9, "1", 0.8, "3", 0.95)
    assert not lost.promote and "does not beat v3 (0.9500)" in lost.reason and "concurrent" in lost.reason
    assert outcome("2", 0.7, "1", 0.8, "3", 0.95) == Decision(False, decide(0.7, 0.8).reason)
    assert "cannot be scored" in outcome("2", 0.9, "1", None, "1", None).reason
    assert "holds the alias again" in outcome("2", 0.9, "1", 0.8, "1", 0.8).reason
    assert "other rows" in outcome("2", 0.9, "1", 0.8, "3", 0.85).reason


# -- the protocol under adversarial interleavings -----------------------------------------------------------------


class FakeRegistry:
    """The registry as a promoter sees it through MLflow: each request is atomic except those the driver makes
    in two MLflow calls (a Read: the claims, then the alias and history; a Move: the alias, then the history),
    which other promoters can interleave."""

    def __init__(self, champion=None, history=(), claims=None):
        self.champion, self.history = champion, list(history)
        self.claims = dict(claims or {})  # version -> (phase, heartbeat)
        self.reasons, self.now = {}, 1000.0


def simulate(reg, promoters, seed, **kw):
    """Run promoters {version: scores on its rows} as steps() generators; a random one runs a burst of 1-20
    requests at a time, so any promoter may stall between a read and its write while the others finish."""
    rng = random.Random(seed)
    gens = {v: steps(v, table[v], **kw) for v, table in promoters.items()}
    todo = {v: next(g) for v, g in gens.items()}
    half, results = {}, {}
    while todo:
        v = rng.choice(sorted(todo))
        for _ in range(rng.choice([1, 1, 2, 3, 5, 8, 20])):
            if v not in todo:
                break
            request, answer, done = todo[v], None, True
            match request:
                case Read() if v not in half:
                    half[v], done = tuple(Claim(k, p, t) for k, (p, t) in reg.claims.items()), False
                case Read():
                    answer = View(reg.champion, tuple(reg.history), half.pop(v), reg.now)
                case Score(version=other):
                    answer = promoters[v].get(other)
                case Mark(phase=phase):
                    reg.claims[v] = (phase, reg.now)
                case Move(version=target) if v not in half:
                    reg.champion, half[v], done = target, "moved", False
                case Move(history=history) | WriteHistory(history=history):
                    half.pop(v, None)
                    reg.history = list(history)
                case Sleep(seconds=s):
                    reg.now += s
                case Release(reason=reason):
                    del reg.claims[v]
                    reg.reasons[v] = reason
            reg.now += 0.01
            if done:
                try:
                    todo[v] = gens[v].send(answer)
                except StopIteration as stop:
                    results[v] = stop.value
                    del todo[v]
    return results


@pytest.mark.parametrize("seeds", [range(i, 3000, 4) for i in range(4)], ids=lambda r: f"seeds{r.start}")
def test_concurrent_promoters_leave_the_best_version_champion_and_a_consistent_history(seeds, caplog):
    for seed in seeds:
        check_one_race(seed)
    assert "still moved after" not in caplog.text


def check_one_race(seed):
    rng = random.Random(seed)
    versions = [str(v) for v in range(1, 6)]
    scores = dict(zip(versions, rng.sample([0.1, 0.5, 0.7, 0.8, 0.9, 0.95], 5)))
    champion = rng.choice([None, *versions[:2]])
    candidates = rng.sample([v for v in versions if v != champion], rng.choice([2, 3, 3, 4]))
    history = ["9", champion] if champion else []
    reg = FakeRegistry(champion, history)
    results = simulate(reg, {v: scores for v in candidates}, seed)

    best = max([*candidates, *([champion] if champion else [])], key=scores.get)
    assert reg.champion == best
    assert reg.history[: len(history)] == history and reg.history[-1] == best
    assert all(a != b for a, b in zip(reg.history, reg.history[1:]))
    assert set(reg.history) <= {"9", *candidates, *([champion] if champion else [])}
    assert not reg.claims and set(reg.reasons) == set(candidates)
    # promoted: held the alias when its promoter left (a later promoter may have beaten it since)
    assert best not in candidates or results[best][0].promote
    assert all(scores[v] > (found or 0) for v, (decision, found) in results.items() if decision.promote), seed


def test_a_promoter_that_died_holding_a_claim_is_waited_for_only_until_its_claim_goes_stale():
    fresh = FakeRegistry("1", ["1"], claims={"7": ("deciding", 1000.0)})
    simulate(fresh, {"2": {"1": 0.5, "2": 0.9, "7": 0.99}}, seed=0, stale_claim_s=30)
    assert fresh.champion == "7" and fresh.now > 1030  # a claim is a contender; waited for until stale
    old = FakeRegistry("1", ["1"], claims={"7": ("deciding", 0.0)})
    simulate(old, {"2": {"1": 0.5, "2": 0.9, "7": 0.99}}, seed=0, stale_claim_s=30)
    assert old.champion == "2" and old.now < 1010


def test_promoters_that_disagree_on_the_scores_both_finish_and_release_their_claims():
    for seed in range(20):
        reg = FakeRegistry()
        results = simulate(reg, {"1": {"1": 0.9, "2": 0.8}, "2": {"1": 0.8, "2": 0.9}}, seed)
        assert set(results) == {"1", "2"} and not reg.claims and reg.history[-1] == reg.champion


def test_a_promoter_whose_moves_keep_being_undone_stops_after_max_rounds_and_says_so(caplog):
    protocol, moves = steps("2", 0.9, max_rounds=3), 0
    request = next(protocol)
    while True:
        answer = None
        match request:
            case Read():  # the alias is back on v1 at every read: moved by hand, or by a promoter on other rows
                answer = View("1", ("1", "2", "1"), (Claim("2", "deciding", 10.0),), 10.0)
            case Score():
                answer = 0.5
            case Move():
                moves += 1
        try:
            request = protocol.send(answer)
        except StopIteration as stop:
            decision, found = stop.value
            break
    assert moves == 3 and "still moved after 3 rounds" in caplog.text
    assert not decision.promote and "holds the alias again" in decision.reason and found == 0.5
