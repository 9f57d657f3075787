"""`shipyard calibrate` on a live Ray: every node measured, gloo all-reduce between two Ray workers."""

import pytest

from shipyard.perf.devices import load_profile
from shipyard.perf.layers import COMPUTE_CLASSES, OP_CLASSES

pytestmark = pytest.mark.ray


def test_calibrate_measures_each_node_and_the_allreduce_between_workers(hardware_profile):
    profile = load_profile(hardware_profile)
    d = profile.device
    assert d.kind == "cpu" and d.threads == 1 and 0.5 < d.op_overhead_us < 500
    assert set(d.curves) == set(OP_CLASSES) - {"view"}
    for op_class, points in d.curves.items():
        sizes = [x for x, _ in points]
        assert sizes == sorted(sizes) and all(rate > 0 for _, rate in points), (op_class, points)
    # a 2-core VM: matmul between 1 GFLOP/s and 1 TFLOP/s, element-wise between 0.5 and 1000 GB/s
    assert all(1e-3 < r < 1 for c in COMPUTE_CLASSES for _, r in d.curves[c])
    assert 0.5 < d.mem_bandwidth_gbps < 1000
    assert len(profile.nodes) == 1  # one Ray node, measured by a task placed on it
    link = profile.interconnect
    assert link.name == "gloo-loopback" and 1 < link.latency_us < 10_000 and 0.01 < link.bandwidth_gbps < 100
    assert link.overlap == 0.0  # the workers' own cores run the all-reduce: nothing hides behind backward
