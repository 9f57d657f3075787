"""The plan's measured mode (shipyard.perf.measure) and the calibration's spread: hand-computed cases, and one
real measurement of a tiny model (about a second, one thread)."""

import pytest
import torch
from torch import nn

from shipyard.perf.devices import Device, Interconnect
from shipyard.perf.estimate import estimate_step
from shipyard.perf.layers import OpWork, StepWork, count_step_work
from shipyard.perf.measure import (
    MeasuredDataParallel,
    MeasuredStep,
    match_ops,
    measure_step,
    measured_estimate,
    relative_range,
)
from shipyard.perf.probes import _time_per_call_s

# 1 TFLOP/s, 100 GB/s, 5 us per op: round numbers for hand-computed times
FLAT = Device("flat", "cpu", {"fp32": 1.0}, 100.0, 1.0, 1.0, op_overhead_us=5.0, source="hand-made")
TWICE = Device("twice", "cpu", {"fp32": 2.0}, 200.0, 1.0, 1.0, op_overhead_us=5.0, source="hand-made")
LOOPBACK = Interconnect("loopback", 1.0, 100.0, "hand-made", overlap=0.0)


def _work(batch: int) -> StepWork:
    """A matmul of 2e6 FLOPs per row (2 us a row at 1 TFLOP/s) and an element-wise op of 1 kB per row."""
    ops = (
        OpWork("aten.mm", "0", "forward", "matmul", 2_000_000 * batch, 0),
        OpWork("aten.add", "0", "backward", "elementwise", 0, 1000 * batch),
        OpWork("aten.add_", "(optimizer)", "optimizer", "elementwise", 0, 4000),
    )
    return StepWork(batch, ops, 0, 0, ())


def test_ops_are_matched_by_their_order_and_one_side_s_extra_ops_shift_nothing():
    counted = ["aten::mm", "aten::zeros_like", "aten::add", "aten::add_"]
    measured = [("aten::mm", 1.0), ("aten::empty", 9.0), ("aten::add", 2.0), ("aten::add_", 3.0)]
    assert match_ops(counted, measured) == [1.0, None, 2.0, 3.0]
    assert match_ops(["aten::mm", "aten::mm"], [("aten::mm", 1.0)]) == [1.0, None]


def test_relative_range_is_max_minus_min_over_the_median():
    assert relative_range([1.0, 1.1, 0.9]) == pytest.approx(0.2)
    assert relative_range([]) == 0.0


def test_the_measured_step_at_its_own_configuration_is_what_was_measured():
    m = MeasuredStep(_work(32), step_ms=1.0, op_ms=(0.5, 0.2, 0.1), between_ms=0.2, spread=0.02, threads=1)
    est = measured_estimate(m, _work(32), FLAT)
    assert est.step_time_ms == pytest.approx(1.0)
    # the time between ops goes to the phases by their share of the ops that ran: one op each here
    assert est.forward_ms == pytest.approx(0.5 + 0.2 / 3)


def test_each_measured_op_scales_by_its_roofline_ratio_and_an_unseen_op_keeps_its_analytical_time():
    m = MeasuredStep(_work(32), step_ms=1.0, op_ms=(0.5, 0.2, None), between_ms=0.3, spread=0.0, threads=1)
    est = measured_estimate(m, _work(64), FLAT)
    # mm: 64 us + 5 us at batch 32 -> 128 us + 5 us at 64: x 133/69; add: 32 kB at 100 GB/s -> 0.32 us + 5 us,
    # 0.64 + 5 at 64: x 5.64/5.32; the optimizer's add_ was not seen: its analytical 0.04 + 5 us
    assert est.forward_ms == pytest.approx(0.5 * 133 / 69 + 0.15)
    assert est.backward_ms == pytest.approx(0.2 * 5.64 / 5.32 + 0.15)
    assert est.optimizer_ms == pytest.approx(0.00504)
    # another device: each op by the ratio of its time there and here (mm: 64 + 5 us -> 32 + 5 us)
    there = measured_estimate(m, _work(32), FLAT, TWICE)
    assert there.forward_ms == pytest.approx(0.5 * 37 / 69 + 0.15)


def test_a_step_whose_ops_do_not_line_up_gets_the_analytical_estimate():
    m = MeasuredStep(_work(32), step_ms=1.0, op_ms=(0.5, 0.2, 0.1), between_ms=0.2, spread=0.0, threads=1)
    other = StepWork(32, _work(32).ops[:2], 0, 0, ())
    assert measured_estimate(m, other, FLAT).step_time_ms == pytest.approx(estimate_step(other, FLAT).step_time_ms)


def test_the_counted_step_is_the_one_a_run_repeats_without_the_optimizer_s_state_creation():
    work = count_step_work(lambda: nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)), 16, 8, 2)
    optimizer_ops = [o.name for o in work.ops if o.phase == "optimizer"]
    assert "aten.zeros_like" not in optimizer_ops  # AdamW creates exp_avg and exp_avg_sq in its first step only
    assert optimizer_ops.count("aten.addcmul_") == 4  # one per parameter: the update every step runs


def test_a_real_step_is_measured_op_by_op_and_adds_up_to_its_unprofiled_time():
    def build():
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def batch(rows):
        return {"x": torch.zeros(rows, 16), "y": torch.zeros(rows, dtype=torch.long)}

    m = measure_step(build, 8, batch, nn.functional.cross_entropy, budget_s=0.3, profiled_steps=3)
    assert m.matched >= 0.8 * len(m.op_ms)  # the profile shows nearly every counted op
    assert m.step_ms > 0 and 0 <= m.between_ms < m.step_ms and m.spread >= 0
    assert sum(t for t in m.op_ms if t is not None) + m.between_ms == pytest.approx(m.step_ms)
    # priced at its own batch, the measured mode gives back the measured step (the unseen ops' analytical time
    # aside, a few microseconds each)
    own = measured_estimate(m, m.work, FLAT).step_time_ms
    assert own == pytest.approx(m.step_ms, abs=0.005 * (len(m.op_ms) - m.matched) + 1e-9)


def test_repeated_timings_report_their_spread():
    spreads: list[float] = []
    assert _time_per_call_s(lambda: sum(range(100)), 0.02, 5, spreads) > 0
    assert len(spreads) == 1 and spreads[0] >= 0


def test_a_measured_plan_keeps_the_analytical_step_beside_it_for_the_pipeline_to_log(tmp_path):
    from shipyard import load_config, make_plan
    from shipyard.perf.report import summary_lines
    from tests.helpers import hand_made_profile

    cfg = load_config(None, {"scaling.num_workers": 1})
    plan = make_plan(cfg, "local", profile=hand_made_profile(tmp_path), measure=True)
    assert plan.measured is not None and plan.analytical_step is not None
    assert plan.step.step_time_ms != plan.analytical_step.step_time_ms  # priced from the measurement
    line = next(x for x in summary_lines(plan) if "measured mode" in x)
    assert f"at {cfg.train.batch_size} rows" in line and "the analytical model alone" in line
    assert make_plan(cfg, "local", profile=hand_made_profile(tmp_path)).analytical_step is None


def test_a_measured_ddp_step_is_a_line_through_its_two_points_and_prices_two_workers_here():
    # alone 10 and 30 ms, DDP 17 and 47 ms: slope (47 - 17) / (30 - 10) = 1.5, intercept 17 - 1.5 x 10 = 2 ms
    dp = MeasuredDataParallel(2, (32, 128), (10.0, 30.0), (17.0, 47.0))
    assert dp.slowdown == pytest.approx(1.5) and dp.fixed_ms == pytest.approx(2.0)
    assert dp.step_ms(20.0) == pytest.approx(32.0)
    # a small model whose DDP step did not grow with the batch (7.9 < 8.4 ms): no slope, a fixed cost, the mean gap
    flat = MeasuredDataParallel(2, (32, 128), (1.9, 2.3), (8.4, 7.9))
    assert flat.slowdown == 1.0 and flat.fixed_ms == pytest.approx(((8.4 - 1.9) + (7.9 - 2.3)) / 2)
    # a slope under 1 is noise: a peer never makes the compute faster
    assert MeasuredDataParallel(2, (32, 128), (10.0, 30.0), (15.0, 20.0)).slowdown == 1.0
    m = MeasuredStep(_work(32), step_ms=1.0, op_ms=(0.5, 0.2, 0.1), between_ms=0.2, spread=0.0, threads=1)
    two = measured_estimate(m, _work(32), FLAT, None, 2, LOOPBACK, parallel=dp)
    assert two.step_time_ms == pytest.approx(1.5 * 1.0 + 2.0)  # 1.5 x the step alone (1 ms) + 2 ms
    assert two.exposed_comm_ms == 0.0 and two.ddp_overhead_ms == pytest.approx(2.0)
    # another worker count, or another device, than the one measured: the analytical link's costs
    four = measured_estimate(m, _work(32), FLAT, None, 4, LOOPBACK, parallel=dp)
    assert four.step_time_ms == pytest.approx(measured_estimate(m, _work(32), FLAT, None, 4, LOOPBACK).step_time_ms)
