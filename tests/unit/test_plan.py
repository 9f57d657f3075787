"""`shipyard plan` and the pipeline's view of the plan, without Ray."""

from dataclasses import asdict
from pathlib import Path

import pytest

from shipyard import ConfigError, load_config, make_plan
from shipyard.perf.estimate import ScalingRow, choose_workers, trials_to_fill
from shipyard.perf.plan import worker_counts
from shipyard.pipeline_plan import auto_choices
from shipyard.train.progress import Progress
from tests.helpers import hand_made_profile as _profile

ROOT = Path(__file__).resolve().parents[2]
DIGITS = str(ROOT / "pipelines" / "configs" / "digits.yaml")


def test_local_plan_uses_the_profile_and_the_configured_workers(tmp_path):
    cfg = load_config(DIGITS, {"model.name": "cnn", "scaling.num_workers": 2})
    plan = make_plan(cfg, "local", profile=_profile(tmp_path), gpus_per_node=2)
    assert plan.step.workers == 2 and plan.step.batch_per_worker == 32
    assert plan.step.exposed_comm_ms > 0  # gloo with no overlap: the all-reduce adds to the step
    assert [r.workers for r in plan.strong] == [1, 2]
    assert plan.rows_train == round(1797 * 0.7) and plan.search_wall_s > 0
    assert plan.step.top_layers(1)[0].kind == "Conv2d"


def test_strong_scaling_stops_where_the_global_batch_runs_out():
    cfg = load_config(DIGITS, {"train.batch_size": 16})
    plan = make_plan(cfg, "h100", nodes="1..4")
    assert [r.workers for r in plan.strong][-1] == 16 and [r.workers for r in plan.weak][-1] == 32
    assert any("strong scaling stops at 16 workers" in n for n in plan.notes)
    with pytest.raises(ConfigError, match="write it low..high"):
        make_plan(cfg, "h100", nodes="8..1")


def test_worker_counts_double_within_a_node_then_step_by_nodes():
    assert worker_counts([1, 2, 3], 8) == [1, 2, 4, 8, 16, 24]
    assert worker_counts([1], 2) == [1, 2]


PRED = {"step_time_ms": 2.0, "epoch_s": 0.1, "exposed_comm_ms": 1.0, "warn_off_by": 0.25, "link": "gloo-loopback"}


def _epoch(step_ms, wait_ms=0.0, steps=10):
    return {
        "step_time_ms": step_ms,
        "data_wait_ms": wait_ms,
        "steps": steps,
        "train_time_s": steps * (step_ms + wait_ms) / 1e3,
        "data_time_s": steps * wait_ms / 1e3,
    }


@pytest.mark.parametrize(
    "metrics,world,cause",
    [
        (_epoch(2.0, wait_ms=2.0), 2, "input-bound"),
        (_epoch(4.0), 2, "communication-bound"),
        (_epoch(4.0), 1, "compute-bound"),
        (_epoch(1.0), 2, "compute-bound: the ops ran faster"),
    ],
)
def test_progress_warns_once_with_the_likely_cause(metrics, world, cause):
    p = Progress(PRED, epochs_left=5, world=world)
    p.after_epoch(dict(metrics))
    assert p.warning(metrics) is None  # the first epoch warms up: no verdict yet
    m = dict(metrics)
    p.after_epoch(m)
    assert m["predicted_step_time_ms"] == 2.0
    assert cause in p.warning(m) and p.warning(m) is None  # once


def test_progress_is_quiet_within_tolerance_and_eta_follows_measured_epochs():
    p = Progress(PRED, epochs_left=4, world=1)
    for _ in range(2):
        p.after_epoch(_epoch(2.2))
    assert p.warning(_epoch(2.2)) is None
    assert p.eta().startswith(" | ETA ")
    p.ratios = [5.0, 2.0]  # after the first, the epochs ran 2x the predicted 0.1 s: 2 left -> 0.4 s
    assert p.eta() == " | ETA 0.4 s"


def test_the_plan_prices_precision_and_gradient_accumulation():
    """bf16-mixed on a GPU at bf16 rates; 4 micro-batches: 4 forward/backward passes of a quarter of the rows
    and one optimizer step (the same training_step the loop runs, counted op by op)."""
    base = {"model.name": "cnn", "model.hidden": 256, "train.batch_size": 2048, "scaling.num_workers": 1}
    fp32 = make_plan(load_config(DIGITS, base), "h100")
    bf16 = make_plan(load_config(DIGITS, {**base, "train.precision": "bf16-mixed"}), "h100")
    accum = make_plan(load_config(DIGITS, {**base, "train.grad_accum_steps": 4}), "h100")
    assert bf16.step.forward_ms < 0.5 * fp32.step.forward_ms  # large convolutions: compute-bound, 15x the rate
    # one optimizer step, plus adding up the micro-batches' gradients; not four optimizer steps
    assert fp32.step.optimizer_ms <= accum.step.optimizer_ms < 2 * fp32.step.optimizer_ms
    assert accum.step.forward_ms > fp32.step.forward_ms  # 4 passes: the per-op overhead is paid 4 times


def test_each_worker_validates_its_share_of_the_validation_split(tmp_path):
    """An epoch is its steps plus validation, and after the first epoch each of N workers evaluates
    ceil(rows_val / N) rows (train.epoch.HeldRows.share): one forward pass over that share, not the split."""
    import math

    from shipyard.perf.estimate import forward_time_ms
    from shipyard.perf.layers import count_step_work
    from shipyard.perf.plan import data_shape, planned_info
    from shipyard.tasks import make_task

    profile = _profile(tmp_path)
    parts = {}
    for n in (1, 2):
        cfg = load_config(DIGITS, {"scaling.num_workers": n, "train.batch_size": 64})
        plan = make_plan(cfg, "local", profile=profile, gpus_per_node=2)
        validation_s = plan.epoch_s - math.ceil(plan.rows_train / 64) * plan.step.step_time_ms / 1e3
        task = make_task(cfg.task, planned_info(cfg, data_shape(cfg)))
        share = math.ceil(plan.rows_val / n)  # 270 rows of digits' 1797 on one worker, 135 on each of two
        work = count_step_work(
            lambda task=task, cfg=cfg: task.build_model(cfg.model),
            share,
            make_batch=task.example_batch,
            forward_only=True,
        )
        assert validation_s == pytest.approx(forward_time_ms(work, plan.device) / 1e3, rel=1e-9)
        parts[n] = validation_s
    assert parts[2] < parts[1]


def _row(workers: int, samples_per_s: float) -> ScalingRow:
    speedup = samples_per_s / 1000.0
    return ScalingRow(workers, 1, 64, 1.0, 0.0, samples_per_s, speedup, speedup / workers, 1.0)


def test_auto_workers_are_the_most_that_stay_70_percent_efficient_and_fit():
    rows = [_row(1, 1000), _row(2, 1900), _row(4, 3000), _row(8, 4000)]  # efficiency 1.0, 0.95, 0.75, 0.5
    assert choose_workers(rows, fit_workers=16).workers == 4  # 8 would be 50 % efficient
    assert choose_workers(rows, fit_workers=2).workers == 2  # 4 do not fit
    assert choose_workers(rows, fit_workers=0).workers == 1  # nothing fits: one worker
    assert choose_workers([_row(1, 1000), _row(2, 900)], fit_workers=2).workers == 1  # no faster with 2


def test_auto_trials_fill_the_cluster_up_to_the_number_of_trials():
    assert trials_to_fill(cluster_cpus=8, cpus_per_trial=1, num_samples=4) == 4
    assert trials_to_fill(cluster_cpus=8, cpus_per_trial=3, num_samples=4) == 2
    assert trials_to_fill(cluster_cpus=1, cpus_per_trial=2, num_samples=4) == 1


def test_auto_in_the_plan_and_the_pipeline_choice():
    """The plan prices the chosen count; the pipeline takes it, capped by what fits, and fills the cluster with
    trials; without a plan, auto workers are refused with the fix."""
    big = {"model.name": "cnn", "model.hidden": 256, "train.batch_size": 2048}
    cfg = load_config(DIGITS, big)
    auto = load_config(DIGITS, {**big, "scaling.num_workers": "auto", "tune.max_concurrent_trials": "auto"})
    assert auto.scaling.workers_text == "auto" and auto.scaling.max_workers is None
    plan = make_plan(auto, "h100", fit_workers=8)
    assert plan.step.workers == choose_workers(plan.strong, 8).workers > 1  # large convolutions scale on NVLink
    assert any(n.startswith("scaling.num_workers=auto") for n in plan.notes)
    assert auto_choices(auto, plan, fit_workers=2, cpus=6) == {
        "scaling.num_workers": 2,
        "tune.max_concurrent_trials": 4,
    }
    with pytest.raises(ConfigError, match="give a number instead, e.g. scaling.num_workers=2"):
        auto_choices(auto, None, fit_workers=2, cpus=6)
    assert auto_choices(cfg, None, fit_workers=2, cpus=6) == {}


def test_auto_values_are_checked_with_one_message():
    for key, bad in (("scaling.num_workers", "many"), ("tune.max_concurrent_trials", 0)):
        with pytest.raises(ConfigError, match=f"{key}.*or auto"):
            load_config(DIGITS, {key: bad})


def test_progress_says_whether_the_auto_choice_held():
    p = Progress({**PRED, "auto": "scaling.num_workers=auto chose 2 worker(s)"}, epochs_left=3, world=2)
    p.after_epoch(_epoch(2.1))
    assert p.auto_check(_epoch(2.1)) is None  # the first epoch warms up
    p.after_epoch(_epoch(2.1))
    line = p.auto_check(_epoch(2.1))
    assert line.startswith("scaling.num_workers=auto chose 2 worker(s): measured 2.10 ms") and "agrees" in line
    assert p.auto_check(_epoch(2.1)) is None  # once
    off = Progress({**PRED, "auto": "auto"}, epochs_left=1, world=2)
    off.after_epoch(_epoch(5.0))  # the only epoch: said at once
    assert "does not agree" in off.auto_check(_epoch(5.0))
    assert Progress(PRED, epochs_left=1, world=2).auto_check(_epoch(5.0)) is None  # not chosen by auto


def test_progress_refines_the_plan_once_from_the_first_steady_epoch():
    """Planned 2 ms a step, 1 ms of it all-reduce; the first steady epoch measures 3 ms: compute x2. The table
    re-priced from it: 1 worker 2 ms of compute -> 4 ms; 2 workers 1 ms compute + 1 ms comm -> 2 + 1 = 3 ms."""
    strong = [
        {"workers": 1, "nodes": 1, "batch_per_worker": 64, "step_time_ms": 2.0, "exposed_comm_ms": 0.0,
         "samples_per_s": 32000.0, "speedup": 1.0, "efficiency": 1.0, "epoch_time_s": 0.2},
        {"workers": 2, "nodes": 1, "batch_per_worker": 32, "step_time_ms": 2.0, "exposed_comm_ms": 1.0,
         "samples_per_s": 32000.0, "speedup": 1.0, "efficiency": 0.5, "epoch_time_s": 0.1},
    ]  # fmt: skip
    p = Progress({**PRED, "strong": strong}, epochs_left=4, world=2)
    m = {**_epoch(3.0), "epoch": 0}
    p.after_epoch(m)
    assert p.refine(m) is None  # the first epoch warms up
    m = {**_epoch(3.0), "epoch": 1}
    p.after_epoch(m)
    lines = p.refine(m)
    assert lines[0].startswith("plan refined after epoch 2 from its measured step: 3.00 ms a step (planned 2.00 ms")
    assert "compute x2.00" in lines[0]
    assert [r["step_time_ms"] for r in p.refined["strong"]] == pytest.approx([4.0, 3.0])
    assert "2 worker(s)      3.00 ms/step" in lines[2] and "efficiency  67%" in lines[2]
    assert p.refine(m) is None  # once
    assert Progress(PRED, epochs_left=4, world=2).refine(m) is None  # no table in the prediction: nothing to refine


def test_a_measured_step_refines_the_scaling_table_by_scaling_compute_and_keeping_the_all_reduce():
    """Hand-computed: planned 2 workers at 10 ms (4 ms of it exposed all-reduce), measured 16 ms: compute x2
    (k = (16 - 4) / (10 - 4)). 1 worker, 8 ms of compute: 16 ms, 64 rows / 16 ms = 4000 samples/s. 2 workers:
    6 x 2 + 4 = 16 ms, 64 rows / 16 ms = 4000 samples/s: speed-up 1.0, efficiency 0.5."""
    from shipyard.perf.estimate import ScalingRow
    from shipyard.train.progress import refine_table

    planned = [
        asdict(ScalingRow(1, 1, 64, 8.0, 0.0, 8000.0, 1.0, 1.0, 0.8)),
        asdict(ScalingRow(2, 1, 32, 10.0, 4.0, 6400.0, 0.8, 0.4, 0.5)),
    ]
    k, rows = refine_table(planned, measured_step_ms=16.0, predicted_step_ms=10.0, predicted_comm_ms=4.0)
    assert k == pytest.approx(2.0)
    one, two = rows
    assert (one["step_time_ms"], one["samples_per_s"], one["epoch_time_s"]) == pytest.approx((16.0, 4000.0, 1.6))
    assert (two["step_time_ms"], two["exposed_comm_ms"], two["samples_per_s"]) == pytest.approx((16.0, 4.0, 4000.0))
    assert (two["speedup"], two["efficiency"], two["epoch_time_s"]) == pytest.approx((1.0, 0.5, 0.8))
    # a step shorter than the predicted all-reduce: the split is not trusted, the whole step scales
    k, rows = refine_table(planned, measured_step_ms=3.0, predicted_step_ms=10.0, predicted_comm_ms=4.0)
    assert k == pytest.approx(0.3) and rows[1]["step_time_ms"] == pytest.approx(3.0)
    assert rows[1]["exposed_comm_ms"] == pytest.approx(1.2)
