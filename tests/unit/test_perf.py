"""The performance model's formulas on hand-computed cases, and the catalog's units. No Ray."""

import json
import math

import pytest
import torch
from torch import nn

from shipyard.perf.comm import (
    DDP_BUCKET_BYTES,
    DDP_FIRST_BUCKET_BYTES,
    allreduce_s,
    ddp_buckets,
    exposed_comm_s,
    ps_allreduce_s,
    ring_allreduce_s,
    tree_allreduce_s,
)
from shipyard.perf.devices import (
    DEVICES,
    INTERCONNECTS,
    INTRA_NODE,
    Device,
    Interconnect,
    Profile,
    get_device,
    get_interconnect,
    load_profile,
    with_threads,
)
from shipyard.perf.estimate import estimate_step, op_time_s, recommend_workers, scaling_table
from shipyard.perf.layers import OpWork, count_ops, count_step_work
from shipyard.perf.search import asha_survivors, expected_trial_epochs, search_wall_s
from shipyard.tasks.models import cnn, mlp, transformer

LINK = Interconnect("test", bandwidth_gbps=10.0, latency_us=10.0, source="hand-made")
# 1 TFLOP/s, 100 GB/s, 5 us per op: round numbers for hand-computed times
FLAT = Device(
    "flat",
    "cpu",
    {"fp32": 1.0},
    100.0,
    matmul_fraction=1.0,
    elementwise_fraction=1.0,
    op_overhead_us=5.0,
    source="hand-made",
)


def _linear_ops(work, phase):
    return [o for o in work.ops if o.phase == phase and o.op_class == "matmul"]


def test_linear_forward_flops_are_2_batch_in_out():
    b, i, o = 32, 64, 128
    work = count_step_work(lambda: nn.Sequential(nn.Linear(i, o), nn.ReLU(), nn.Linear(o, 10)), b, i)
    first = next(lt for lt in work.by_layer() if lt.layer == "0")
    assert first.flops["forward"] == 2 * b * i * o
    # the first layer's backward needs only the weight gradient (no gradient for the input): one matmul
    assert first.flops["backward"] == 2 * b * i * o
    second = next(lt for lt in work.by_layer() if lt.layer == "2")
    # a later layer's backward: weight gradient and input gradient, two matmuls of the forward's size
    assert second.flops["backward"] == 2 * second.flops["forward"] == 2 * 2 * b * o * 10
    assert work.flops_in("optimizer") == 0  # AdamW is element-wise: bytes, no matmul FLOPs


def test_conv_flops_are_2_batch_cout_hw_cin_k2():
    work = count_step_work(lambda: cnn(64, 10, hidden=16, depth=1), 8, 64)
    conv = next(lt for lt in work.by_layer() if lt.kind == "Conv2d")
    assert conv.flops["forward"] == 2 * 8 * 16 * 8 * 8 * 1 * 3 * 3


def test_bytes_moved_count_reads_and_writes_and_views_move_nothing():
    ops = count_ops(lambda: torch.mm(torch.ones(4, 8), torch.ones(8, 2)))
    mm = next(o for o in ops if o.name == "aten.mm")
    assert mm.bytes_moved == 4 * (4 * 8 + 8 * 2 + 4 * 2)
    assert mm.flops == 2 * 4 * 8 * 2
    x = torch.ones(16)
    view = next(o for o in count_ops(lambda: x.view(4, 4)) if o.name == "aten.view")
    assert view.op_class == "view" and view.bytes_moved == 0


def test_ops_are_classed_by_kind_and_attributed_to_their_layer():
    work = count_step_work(lambda: cnn(64, 10, hidden=8, depth=1, dropout=0.5), 4, 64)
    classes = {(o.layer, o.op_class) for o in work.ops if o.phase == "forward"}
    assert ("features.0", "conv") in classes and ("features.1", "norm") in classes
    assert ("head.0", "random") in classes and ("features.3", "reduction") in classes
    assert {o.phase for o in work.ops} == {"forward", "backward", "optimizer"}
    assert work.param_bytes == sum(p.numel() for p in cnn(64, 10, hidden=8, depth=1).parameters()) * 4


def test_counting_a_transformer_on_meta_is_quick_and_has_attention():
    work = count_step_work(lambda: transformer(64, 10, hidden=32, depth=2), 16, 64)
    assert work.flops_in("forward") > 0 and any(o.op_class == "reduction" for o in work.ops)


def test_ring_allreduce_for_known_alpha_beta():
    # 2(N-1)/N * bytes / bw + 2(N-1) * alpha with N=4, 100 MB, 10 GB/s, 10 us
    assert ring_allreduce_s(100e6, 4, LINK) == pytest.approx(2 * 3 / 4 * 100e6 / 10e9 + 2 * 3 * 10e-6)
    assert ring_allreduce_s(100e6, 4, LINK) == pytest.approx(0.01506)
    assert ring_allreduce_s(100e6, 1, LINK) == 0.0


def test_tree_and_parameter_server_for_known_alpha_beta():
    assert tree_allreduce_s(100e6, 8, LINK) == pytest.approx(2 * 3 * 10e-6 + 2 * 100e6 / 10e9)
    assert ps_allreduce_s(100e6, 4, LINK) == pytest.approx(2 * 4 * 100e6 / 10e9 + 2 * 10e-6)
    with pytest.raises(KeyError, match="known: ring, tree, ps"):
        allreduce_s(1, 2, LINK, "butterfly")


def test_ddp_buckets_fill_in_reverse_order_first_one_mib_then_25_mib_as_torch_does():
    mib = 1024 * 1024
    sizes = [10 * mib, 10 * mib, 10 * mib, 512 * 1024, 512 * 1024, 512 * 1024]
    assert DDP_FIRST_BUCKET_BYTES == mib and DDP_BUCKET_BYTES == 25 * mib
    # a bucket closes once it holds at least its cap: 0.5 + 0.5 MiB fills the first; 0.5 + 3 x 10 the second
    assert ddp_buckets(sizes) == [[5, 4], [3, 2, 1, 0]]
    assert ddp_buckets([4 * mib] * 10) == [[9], [8, 7, 6, 5, 4, 3, 2], [1, 0]]  # torch: 1 / 7 / 2


def test_allreduce_overlaps_backward_bucket_by_bucket():
    mib = 1024 * 1024
    fast = Interconnect("fast", bandwidth_gbps=mib / 1e9 * 1000, latency_us=0.0, source="hand-made")  # 1 ms per MiB
    # two buckets of 1 MiB (first) and 2 MiB; ready at 2 ms and 10 ms of a 10 ms backward, 2 workers:
    # each costs 2(N-1)/N = 1 x bytes / bw: bucket 1 runs 2-3 ms (hidden), bucket 2 runs 10-12 ms: 2 ms exposed
    total, exposed = exposed_comm_s(0.010, [0.010, 0.002], [2 * mib, mib], 2, fast)
    assert total == pytest.approx(0.003) and exposed == pytest.approx(0.002)
    no_overlap = Interconnect("cpu", fast.bandwidth_gbps, 0.0, "hand-made", overlap=0.0)
    assert exposed_comm_s(0.010, [0.010, 0.002], [2 * mib, mib], 2, no_overlap)[1] == pytest.approx(0.003)


def test_roofline_takes_the_max_of_compute_and_memory_not_the_sum():
    compute_bound = OpWork("aten.mm", "0", "forward", "matmul", flops=10**9, bytes_moved=10**6)
    assert op_time_s(compute_bound, FLAT) == pytest.approx(1e9 / 1e12 + 5e-6)  # 1 ms compute > 10 us memory
    memory_bound = OpWork("aten.mm", "0", "forward", "matmul", flops=10**6, bytes_moved=10**9)
    assert op_time_s(memory_bound, FLAT) == pytest.approx(1e9 / 100e9 + 5e-6)
    add = OpWork("aten.add", "0", "forward", "elementwise", flops=0, bytes_moved=12 * 10**6)
    assert op_time_s(add, FLAT) == pytest.approx(12e6 / 100e9 + 5e-6)


def test_step_estimate_sums_ops_and_adds_exposed_allreduce():
    work = count_step_work(lambda: mlp(64, 10, 128, 2), 64, 64)
    one = estimate_step(work, FLAT)
    assert one.step_time_ms == pytest.approx(sum(op_time_s(o, FLAT) for o in work.ops) * 1e3)
    two = estimate_step(work, FLAT, 2, LINK)
    # one bucket (under 1 MiB), ready only at the end of backward: none of it hidden
    assert two.exposed_comm_ms == pytest.approx(ring_allreduce_s(work.grad_bytes, 2, LINK) * 1e3)
    assert two.step_time_ms == pytest.approx(one.step_time_ms + two.exposed_comm_ms)
    with pytest.raises(ValueError, match="interconnect"):
        estimate_step(work, FLAT, 2, None)


def test_scaling_weak_is_ideal_without_communication_and_strong_is_not():
    free = Interconnect("free", 1e9, 0.0, "hand-made")
    rows = scaling_table(
        lambda b: count_step_work(lambda: mlp(64, 10), b, 64),
        FLAT,
        [1, 2, 4],
        lambda n: (1, free),
        global_batch=64,
        rows_per_epoch=1000,
        weak=True,
    )
    assert [round(r.efficiency, 6) for r in rows] == [1.0, 1.0, 1.0]
    strong = scaling_table(
        lambda b: count_step_work(lambda: mlp(64, 10), b, 64),
        FLAT,
        [1, 2, 4],
        lambda n: (1, LINK),
        global_batch=64,
        rows_per_epoch=1000,
    )
    assert [r.batch_per_worker for r in strong] == [64, 32, 16]
    assert all(r.efficiency < 1 for r in strong[1:])  # per-op overhead does not shrink with the batch
    assert recommend_workers(strong).workers == 1  # a tiny MLP: nothing to gain


def test_catalog_units_and_sources():
    h100 = get_device("H100")
    assert h100.peak_tflops["fp32"] == 67.0 and h100.mem_bandwidth_gbps == 3350.0  # TFLOP/s, GB/s (data sheet)
    assert get_device("a100").peak_tflops["bf16"] == 312.0 and get_device("h200").mem_bandwidth_gbps == 4800.0
    for d in DEVICES.values():
        assert d.source and 0 < d.matmul_fraction <= 1 and 0 < d.elementwise_fraction <= 1
        assert 1 <= d.peak_tflops["fp32"] <= 1000 and 100 <= d.mem_bandwidth_gbps <= 10_000  # units, not bytes/s
        assert d.name in INTRA_NODE
    for link in INTERCONNECTS.values():
        assert link.source and 0.5 <= link.bandwidth_gbps <= 1000 and 0.1 <= link.latency_us <= 1000
    assert get_interconnect("ib-200").bandwidth_gbps == pytest.approx(25 * 0.9)  # 200 Gb/s = 25 GB/s
    with pytest.raises(KeyError, match="known: a100, h100, h200"):
        get_device("tpu")


def test_calibrated_curves_interpolate_and_scale_with_threads():
    d = Device(
        "cpu",
        "cpu",
        {"fp32": 0.1},
        10.0,
        1.0,
        1.0,
        3.0,
        "hand-made",
        threads=1,
        curves={"matmul": ((1e3, 0.01), (1e7, 0.1))},
    )
    assert d.compute_tflops("matmul", 1e5) == pytest.approx(math.sqrt(0.01 * 0.1))  # log-log midpoint
    assert d.compute_tflops("matmul", 1e9) == 0.1 and d.compute_tflops("matmul", 1.0) == 0.01  # flat at the ends
    assert d.compute_tflops("conv", 1e5) == pytest.approx(0.1)  # no conv curve: peak x fraction
    assert with_threads(d, 2).compute_tflops("matmul", 1e9) == pytest.approx(0.2)


def test_profile_round_trips_and_a_broken_one_says_how_to_fix(tmp_path):
    p = Profile(FLAT, LINK, "host", "2026-11-27T00:00:00+00:00", {"n1": {}})
    (tmp_path / "hw.json").write_text(p.to_json())
    assert load_profile(tmp_path / "hw.json") == p
    (tmp_path / "bad.json").write_text(json.dumps({"schema_version": 1, "device": {}}))
    with pytest.raises(ValueError, match="run `shipyard calibrate` again"):
        load_profile(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="run `shipyard calibrate`"):
        load_profile(tmp_path / "none.json")


def test_search_rung_maths():
    assert expected_trial_epochs("fifo", 16, 15) == 240
    assert asha_survivors(1, 3) == 1.0
    assert asha_survivors(2, 3) == pytest.approx(1.5)  # the 2nd arrival goes on if it beats the 1st: 1/2
    # 4 trials, rungs at 3 (grace 3, rf 3, max_t 15 -> [3, 9]): 4 x 3 + s1 x 6 + s2 x 6
    s1 = asha_survivors(4, 3)
    s2 = asha_survivors(s1, 3)
    assert expected_trial_epochs("asha", 4, 15, 3, 3) == pytest.approx(4 * 3 + s1 * 6 + s2 * 6)
    assert expected_trial_epochs("asha", 16, 15, 1, 3) < 240
    assert search_wall_s(100, 10, 0.5, 2) == pytest.approx(100 * 0.5 / 2 + 5 * 3.0)
