"""White-box: HeldRows once it holds a worker's rows (the first pass through Ray Data is proven in
tests/ray/test_data_parallel.py): each epoch a new order of the same rows, the same order for the same seed, and
validation shares that split the rows between ranks without overlap."""

import torch

from shipyard.train.epoch import HeldRows


def held(n: int, batch: int) -> HeldRows:
    rows = HeldRows(ds=None, batch_size=batch)
    rows.rows = {"x": torch.arange(n, dtype=torch.float32).unsqueeze(1), "y": torch.arange(n)}
    return rows


def ids(batches) -> list[int]:
    return [int(v) for b in batches for v in b["y"]]


def test_each_epoch_is_a_new_order_of_the_same_rows_in_full_batches_and_a_short_last_one():
    rows = held(10, 4)
    batches = list(rows.epoch(seed=1))
    assert [len(b["y"]) for b in batches] == [4, 4, 2]
    assert all(torch.equal(b["x"].squeeze(1).long(), b["y"]) for b in batches), "x and y rows kept together"
    first, second = ids(rows.epoch(seed=1)), ids(rows.epoch(seed=2))
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert ids(rows.epoch(seed=1)) == first, "the same seed gives the same order"


def test_validation_shares_split_the_rows_between_ranks_without_overlap():
    rows = held(11, 3)
    shares = [ids(rows.share(rank, 3)) for rank in range(3)]
    assert sorted(sum(shares, [])) == list(range(11))
    assert [len(s) for s in shares] == [4, 4, 3]
    assert ids(rows.share(0, 1)) == list(range(11)), "one rank evaluates every row, in order"
