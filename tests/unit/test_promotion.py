from shipyard.promotion import decide


def test_first_candidate_always_wins():
    assert decide(0.10, None).promote


def test_better_candidate_takes_champion():
    d = decide(0.97, 0.95)
    assert d.promote and "beats" in d.reason


def test_worse_or_equal_candidate_keeps_champion():
    assert not decide(0.93, 0.95).promote
    assert not decide(0.95, 0.95).promote  # a tie moves nothing
