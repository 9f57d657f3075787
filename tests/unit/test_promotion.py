from shipyard.promotion import decide


def test_first_candidate_always_wins():
    assert decide(0.10, None).promote


def test_better_candidate_takes_champion():
    d = decide(0.97, 0.95)
    assert d.promote and "beats" in d.reason


def test_worse_or_equal_candidate_keeps_champion():
    assert not decide(0.93, 0.95).promote
    assert not decide(0.95, 0.95).promote  # a tie moves nothing


def test_lower_is_better_metrics():
    assert decide(0.2, 0.3, higher_is_better=False).promote
    assert not decide(0.4, 0.3, higher_is_better=False).promote


def test_min_delta_requires_a_real_gain():
    assert not decide(0.951, 0.95, min_delta=0.005).promote
