"""Data parallelism proven, not assumed, for every kind of task: over an epoch the Ray Train workers' shards are
disjoint and cover the training split, and 2 workers at a global batch of B rows end where one process ends
that takes the same B rows a step (DDP averages the workers' gradients: the gradient of the whole batch).
Each worker reads its rows once and holds them: the second epoch trains on the rows of the first, in a new order;
the ranks validate on halves of the validation split whose gathered metrics are those of the whole split."""

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shipyard import load_config
from shipyard.data.tables import to_numpy
from shipyard.tasks import make_task
from shipyard.train.checkpoints import CHECKPOINT_FILE
from shipyard.train.epoch import evaluate, make_optimizer
from shipyard.train.loop import fit
from shipyard.train.step import StepOptions, training_step
from tests.helpers import report

pytestmark = pytest.mark.ray


def table(path: Path, regression: bool) -> str:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 4)) * [1000, 1, 0.01, 5]
    y = x @ [0.001, 1, 100, 0.2] + rng.normal(size=700) * 0.1
    cols = {f"f{i}": x[:, i] for i in range(4)}
    cols["colour"] = rng.choice(["red", "green", "blue"], size=700)
    import pandas as pd

    pd.DataFrame({**cols, "target": y if regression else (y > 0).astype(int)}).to_csv(path, index=False)
    return str(path)


def image_folder(root: Path) -> str:
    """3 classes of 6x6 grayscale PNGs, 120 each: class k is brighter in band k."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("low", "mid", "high")):
        (root / name).mkdir(parents=True)
        for i in range(120):
            pixels = rng.integers(0, 120, size=(6, 6))
            pixels[2 * k : 2 * k + 2] += 120
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return str(root)


CASES = {
    "classification": lambda tmp: {"data.builtin": "digits"},
    "regression": lambda tmp: {
        "task.name": "regression",
        "data.builtin": None,
        "data.path": table(tmp / "r.csv", True),
        "data.label": "target",
    },
    "user task": lambda tmp: {"task.name": "tests.user_tasks:MedianRegression", "task.options": {"rows": 1200}},
    "image folder": lambda tmp: {
        "task.name": "image_classification",
        "data.builtin": None,
        "data.path": image_folder(tmp / "images"),
        "data.image_size": 6,
        "data.channels": 1,
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_workers_see_disjoint_shards_covering_the_split_and_match_one_process_on_the_same_rows(
    ray_local, tmp_path, case
):
    record = tmp_path / "record"
    record.mkdir()
    cfg = load_config(
        None,
        {
            **CASES[case](tmp_path),
            "model.name": "tests.dp_hooks:recording_mlp",
            "model.options": {"record_dir": str(record)},
            "model.hidden": 16,
            "model.depth": 1,
            "train.epochs": 2,
            "train.batch_size": 64,
            "scaling.num_workers": 2,
            "plan.enabled": False,
            "storage_path": str(tmp_path / "results"),
        },
    )
    task = make_task(cfg.task)
    splits = task.load(cfg.data)
    task.bind(splits.info)
    result = fit(cfg, splits, "dp-proof")

    # what each rank trained on, step by step (the encoder's output: the network's input)
    steps = {r: sorted(record.glob(f"rank{r}-step*.npy")) for r in (0, 1)}
    assert len(steps[0]) == len(steps[1]) > 2
    per_epoch = len(steps[0]) // 2
    seen = {r: [np.load(f) for f in files] for r, files in steps.items()}
    x_train, y_train = to_numpy(splits.train)
    with torch.no_grad():
        encoded = task.encoder()(torch.from_numpy(x_train)).numpy()

    def key(row: np.ndarray) -> bytes:
        return np.round(row, 4).tobytes()

    def rows_of(r: int, epoch: int) -> list[bytes]:
        return [key(row) for batch in seen[r][epoch * per_epoch : (epoch + 1) * per_epoch] for row in batch]

    split_rows = collections.Counter(key(r) for r in encoded)
    shard = {r: collections.Counter(rows_of(r, 0)) for r in (0, 1)}
    both = shard[0] + shard[1]
    assert all(both[k] <= split_rows[k] for k in both), "a row was trained on twice in one epoch"
    assert sum(both.values()) == sum(shard[0].values()) * 2  # equal shards (Ray Train's split(equal=True))
    dropped = len(encoded) - sum(both.values())
    # equal shards drop the rows beyond a multiple of the worker count: at most N - 1 an epoch
    assert 0 <= dropped <= 1, f"{dropped} training rows never seen"
    for r in (0, 1):  # epoch 2: the rows this rank held from epoch 1, in a new order
        assert collections.Counter(rows_of(r, 1)) == shard[r], f"rank {r} trained on other rows in epoch 2"
        assert rows_of(r, 1) != rows_of(r, 0), f"rank {r} did not reshuffle its rows in epoch 2"

    # one process, same initial weights, each step on the two ranks' rows together
    by_row = collections.defaultdict(list)
    for i, row in enumerate(encoded):
        by_row[key(row)].append(i)
    torch.manual_seed(cfg.train.seed)
    replay_task = make_task(cfg.task, splits.info)
    model = replay_task.build_model(cfg.model)
    model.net.record_dir = None  # the replay records nothing
    optimizer = make_optimizer(cfg, model)
    used = collections.Counter()
    for step in range(len(seen[0])):
        if step == per_epoch:
            used.clear()  # every row again
        rows = []
        for r in (0, 1):
            for row in seen[r][step]:
                k = key(row)
                rows.append(by_row[k][used[k]])  # duplicates in the split: take them in turn
                used[k] += 1
        batch = {"x": torch.from_numpy(x_train[rows]), "y": torch.as_tensor(y_train[rows])}
        training_step(model, optimizer, batch, replay_task.loss, StepOptions.of(cfg.train))
    with result.checkpoint.as_directory() as d:
        trained = torch.load(Path(d) / CHECKPOINT_FILE, weights_only=True)["model"]
    worst = max((trained[k] - v).abs().max().item() for k, v in model.state_dict().items())
    # the last epoch's validation ran on two shares, gathered: the metrics of the whole split in one process
    model.load_state_dict(trained)
    x_val, y_val = to_numpy(splits.val)
    whole = evaluate(model, [{"x": torch.tensor(x_val), "y": torch.tensor(y_val)}], replay_task)
    report(
        f"{case}: {len(seen[0])} steps of 2 x {len(seen[0][0])} rows over 2 epochs, {dropped} row(s) left out by "
        f"the equal split; largest weight difference to one process on the same rows {worst:.2e}; val_loss of "
        f"the gathered shares {result.metrics['val_loss']:.6f}, of the whole split here {whole['loss']:.6f}"
    )
    assert worst < 1e-4, json.dumps({k: (trained[k] - v).abs().max().item() for k, v in model.state_dict().items()})
    assert whole.pop("rows") == len(y_val)
    assert result.metrics["val_rows"] == (len(y_val) + 1) // 2, "rank 0 validated all of the split, not its half"
    for name, value in whole.items():
        assert result.metrics[f"val_{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_bf16_mixed_with_four_micro_batches_on_two_workers_is_fp32s_model_within_rounding(ray_local, workdir):
    """The same digits run twice on 2 workers: fp32, then bf16 autocast with each worker's 32 rows a step taken
    as 4 micro-batches of 8 (DDP syncs once, on the last). Same optimizer steps, same data: bf16's rounding moves
    the trajectory, but not what is learned. Checked row by row on all 1,797 digits (three quarters of them
    training rows, which both fit): the two give the same answer on at least 97 % of them, and McNemar's test
    finds neither right significantly more often (|b - c| <= 3 sqrt(b + c), b and c the rows only one of them gets
    right; with few differing rows it has little power, so the agreement bar carries most of the proof). Test
    accuracies alone would be noise: one point of the 242-row test split is 2.4 rows."""
    import mlflow
    from sklearn.datasets import load_digits

    from shipyard.cli import run_pipeline
    from shipyard.track.registry import load

    digits = Path(__file__).resolve().parents[2] / "pipelines" / "configs" / "digits.yaml"
    common = {
        **workdir,
        "tune.enabled": False,
        "serve.enabled": False,
        "scaling.num_workers": 2,
        "train.epochs": 8,
        "train.lr": 0.003,
    }
    fp32 = run_pipeline(digits, [f"{k}={v}" for k, v in common.items()])
    mixed = run_pipeline(
        digits,
        [f"{k}={v}" for k, v in {**common, "train.precision": "bf16-mixed", "train.grad_accum_steps": 4}.items()],
    )
    mlflow.set_tracking_uri(workdir["tracking.uri"])
    rows = load_digits()
    truth = np.asarray([str(t) for t in rows.target])
    answers, right = {}, {}
    for name, summary in {"fp32": fp32, "bf16-mixed": mixed}.items():
        model = load(summary["model_name"], summary["model_version"])
        answers[name] = np.asarray([str(a) for a in model.predict(rows.data.astype(model.dtype))])
        right[name] = answers[name] == truth
    b = int((right["fp32"] & ~right["bf16-mixed"]).sum())  # only fp32 right
    c = int((right["bf16-mixed"] & ~right["fp32"]).sum())  # only bf16-mixed right
    agree = float((answers["fp32"] == answers["bf16-mixed"]).mean())  # the same answer
    report(
        f"digits on 2 workers: fp32 test accuracy {fp32['test_accuracy']:.4f}, bf16-mixed with 4 micro-batches "
        f"{mixed['test_accuracy']:.4f}; on all {len(truth)} digits: fp32 {right['fp32'].mean():.4f}, bf16-mixed "
        f"{right['bf16-mixed'].mean():.4f}, same answer on {agree:.4f}, only fp32 right {b}, only bf16 right {c}"
    )
    assert fp32["test_accuracy"] > 0.9 and mixed["test_accuracy"] > 0.9
    assert agree >= 0.97
    assert abs(b - c) <= 3 * (b + c) ** 0.5
