"""The task seam without Ray: the training step's options, preprocessing baked into the model, request parsing,
metrics and directions, and the promotion gate for a metric where lower wins."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from shipyard import ConfigError, DataInfo, RequestError, load_config
from shipyard.tasks import make_task, objective, task_of
from shipyard.tasks.models import mlp
from shipyard.track.promotion import Gate, choose, decide
from shipyard.train.step import StepOptions, training_step

TABLE = DataInfo(
    task="classification",
    input_shape=[3],
    output_width=2,
    target="label",
    feature_names=["grams", "ratio", "colour"],
    classes=["no", "yes"],
    preprocessing={
        "numeric": {"grams": {"mean": 5000.0, "std": 1000.0}, "ratio": {"mean": 0.0, "std": 0.001}},
        "categorical": {"colour": ["blue", "green", "red"]},
    },
)


def grads_after(model, batch, options):
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the gradients to compare
    loss = training_step(model, opt, batch, nn.functional.cross_entropy, options)
    return loss, [p.grad.clone() for p in model.parameters()]


def test_accumulated_micro_batches_give_the_gradients_of_one_large_batch():
    torch.manual_seed(0)
    model = mlp(8, 3, hidden=16, depth=2, dropout=0.0)
    batch = {"x": torch.randn(50, 8), "y": torch.randint(0, 3, (50,))}  # 50 rows in 4: uneven micro-batches
    loss_one, one = grads_after(model, batch, StepOptions())
    loss_acc, acc = grads_after(model, batch, StepOptions(grad_accum_steps=4))
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    for g1, g4 in zip(one, acc):
        torch.testing.assert_close(g4, g1, rtol=1e-5, atol=1e-6)


def test_bf16_mixed_runs_the_forward_in_bfloat16_on_cpu_and_keeps_weights_fp32():
    seen = []
    torch.manual_seed(0)
    model = mlp(8, 3, hidden=16, depth=1, dropout=0.0)
    model[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = {"x": torch.randn(16, 8), "y": torch.randint(0, 3, (16,))}
    loss = training_step(model, opt, batch, nn.functional.cross_entropy, StepOptions(precision="bf16-mixed"))
    assert seen == [torch.bfloat16] and np.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_gradient_clipping_bounds_the_global_norm():
    torch.manual_seed(0)
    model = mlp(8, 3, hidden=16, depth=1, dropout=0.0)
    batch = {"x": torch.randn(16, 8) * 100, "y": torch.randint(0, 3, (16,))}
    _, grads = grads_after(model, batch, StepOptions(grad_clip_norm=0.5))
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) <= 0.5 + 1e-5


def test_the_table_encoder_standardizes_numbers_and_one_hot_encodes_text_with_an_all_zero_other():
    task = make_task(load_config().task, TABLE)
    encoder = task.encoder()
    x = torch.tensor([[6000.0, 0.002, 2.0], [5000.0, 0.0, -1.0]])  # red; a colour not seen in training
    torch.testing.assert_close(encoder(x), torch.tensor([[1.0, 2.0, 0, 0, 1], [0.0, 0.0, 0, 0, 0]]))
    assert task.net_shape() == (5, 2)
    model = task.build_model(load_config(None, {"model.hidden": 8}).model)
    exported = torch.export.export(model.eval(), (x,))  # the registered form: preprocessing included
    torch.testing.assert_close(exported.module()(x), model(x))


def test_requests_by_position_or_by_name_parse_to_the_same_row_and_bad_ones_name_the_problem():
    task = task_of(TABLE)
    by_position = task.parse_instances([[6000, 0.002, "red"], [5000.0, 0.0, "purple"]])
    by_name = task.parse_instances(
        [{"colour": "red", "ratio": 0.002, "grams": 6000}, {"grams": 5000.0, "ratio": 0.0, "colour": "purple"}]
    )
    np.testing.assert_array_equal(by_position, by_name)
    np.testing.assert_array_equal(by_position[:, 2], [2, -1])  # "purple": the all-zero "other" encoding
    assert task.instances(by_position)[0] == [6000.0, pytest.approx(0.002), "red"]
    for bad, match in [
        ([[1, 2]], r"instances\[0\] has 2 features; the model takes 3 \(grams, ratio, colour\)"),
        ([{"grams": 1, "ratio": 2}], r"instances\[0\]: missing colour"),
        ([{"grams": 1, "ratio": 2, "colour": "red", "size": 3}], r"unknown size"),
        ([[1, "2", "red"]], r"column 'ratio': Input should be a valid number, got '2'"),
        ([[True, 2, "red"]], r"column 'grams': Input should be a valid number, got True"),
        ([[1, 2, 3]], r"column 'colour' takes one of its text categories \(blue, green, red\)"),
        ([[1e39, 2, "red"]], r"instances\[0\] holds NaN or Infinity"),
    ]:
        with pytest.raises(RequestError, match=match):
            task.parse_instances(bad)
    assert task.answers(np.array([[0.1, 0.9], [2.0, 1.0]])) == ["yes", "no"]


def test_regression_scales_back_to_the_target_units_and_reports_rmse_mae_r2():
    info = DataInfo(
        task="regression",
        input_shape=[1],
        output_width=1,
        target="price",
        feature_names=["size"],
        preprocessing={"numeric": {"size": {"mean": 0.0, "std": 1.0}}, "target": {"mean": 100.0, "std": 10.0}},
    )
    task = make_task(load_config(None, {"task.name": "regression"}).task, info)
    torch.testing.assert_close(task.decoder()(torch.tensor([[1.5], [-2.0]])), torch.tensor([115.0, 80.0]))
    pred, y = torch.tensor([110.0, 90.0, 100.0]), torch.tensor([100.0, 100.0, 100.0])
    m = task.metrics(pred, y)
    assert m["rmse"] == pytest.approx(np.sqrt(200 / 3)) and m["mae"] == pytest.approx(20 / 3)
    assert task.loss(pred, y).item() == pytest.approx(200 / 3 / 100)  # MSE in standardized units
    assert task.answers(np.array([115.0, 80.0], np.float32)) == [115.0, 80.0]
    assert objective(load_config(None, {"task.name": "regression"})) == ("val_rmse", "min")
    assert objective(load_config(None, {"task.name": "regression", "tune.metric": "val_r2"})) == ("val_r2", "max")


def test_an_unknown_task_or_metric_is_named_with_what_exists():
    with pytest.raises(
        ConfigError,
        match=r"tune.metric=val_accuracy: task regression reports val_loss, val_rmse, "
        r"val_mae, val_r2",
    ):
        objective(load_config(None, {"task.name": "regression", "tune.metric": "val_accuracy"}))
    with pytest.raises(ConfigError, match="neither a built-in task .*classification, regression"):
        make_task(load_config(None, {"task.name": "images"}).task)
    with pytest.raises(ConfigError, match="cannot import module 'nope'"):
        make_task(load_config(None, {"task.name": "nope:Task"}).task)
    with pytest.raises(ConfigError, match="is not a subclass of shipyard.tasks.Task"):
        make_task(load_config(None, {"task.name": "shipyard.tasks.models:mlp"}).task)


def test_the_promotion_gate_promotes_a_lower_rmse_and_keeps_a_champion_it_does_not_beat():
    rmse = Gate("rmse", "min")
    assert decide(40.0, 50.0, rmse).promote
    keep = decide(55.0, 50.0, rmse)
    assert not keep.promote and keep.reason == (
        "candidate rmse 55.0000 does not beat champion rmse 50.0000 on the same test split"
    )
    assert choose("1", {"1": 50.0, "2": 45.0, "3": 60.0}, rmse) == "2"
    assert choose("1", {"1": 50.0, "2": 50.0}, rmse) == "1"  # a tie keeps the champion


def test_regression_answers_keep_fp32_precision_under_bf16_autocast():
    """A target far from zero (years: mean 2000, deviation 10) scaled back in bf16 would move in steps of ~8."""
    from shipyard.tasks.tabular import TargetScale

    scale = TargetScale(mean=2000.0, std=10.0)
    z = torch.tensor([[0.123], [-0.456]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = scale(z.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([2001.23, 1995.44]), atol=0.05)
