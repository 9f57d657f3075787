"""White-box: HeldRows once it holds a worker's rows (reading them from Ray Data is proven in
tests/ray/test_data_parallel.py): each epoch a new order of the same rows, the same order for the same seed,
and validation shares that split the rows between ranks without overlap, unless there are fewer rows than ranks."""

import torch

from shipyard.train.epoch import HeldRows, share_of


def split(n: int) -> dict[str, torch.Tensor]:
    return {"x": torch.arange(n, dtype=torch.float32).unsqueeze(1), "y": torch.arange(n)}


def held(n: int, batch: int, rank: int = 0, world: int = 1) -> HeldRows:
    """What load() holds after reading n rows (x_i = i, y_i = i) in that order."""
    rows = HeldRows(ds=None, batch_size=batch, rank=rank, world=world)
    rows.rows, rows.shared = share_of(split(n), rank, world)
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
    assert ids(rows.epoch()) == list(range(10)), "no seed: the order read"


def test_validation_shares_split_the_rows_between_ranks_without_overlap():
    shares = [held(11, 3, rank, 3) for rank in range(3)]
    assert all(r.shared for r in shares)
    rows = [ids(r.epoch()) for r in shares]
    assert sorted(sum(rows, [])) == list(range(11))
    assert [len(r) for r in rows] == [4, 4, 3]


def test_a_split_with_fewer_rows_than_ranks_is_not_shared_every_rank_evaluates_all_of_it():
    """Every rank must run a forward: DDP's first after training syncs buffers, a collective."""
    for rank in range(3):
        rows, shared = share_of(split(2), rank, 3)
        assert not shared and rows["y"].tolist() == [0, 1]
    rows, shared = share_of(split(5), 0, 1)
    assert not shared and len(rows["y"]) == 5, "one rank: all rows, nothing to gather"
