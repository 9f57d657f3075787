"""Tasks end to end: a mixed-scale table with a text column, regression on a real data set, a user's own task.

Each compares with what a scikit-learn user would get on the very same split (the test computes the baseline
itself), and checks the endpoint takes raw values and answers as the task says."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests

from shipyard import load_config
from shipyard.cli import run_pipeline
from shipyard.data.tables import to_numpy
from shipyard.tasks import make_task
from tests.helpers import report, shutdown_serve

ROOT = Path(__file__).resolve().parents[2]
TABULAR = ROOT / "pipelines" / "configs" / "tabular.yaml"
REGRESSION = ROOT / "pipelines" / "configs" / "regression.yaml"
pytestmark = pytest.mark.ray

COLOURS = {"red": 1.0, "green": -1.0, "blue": 0.0}


def mixed_scale_table(n=1500, seed=0) -> pd.DataFrame:
    """Columns four orders of magnitude apart plus a text column: the class depends on all of them."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "grams": rng.normal(size=n) * 1000 + 5000,
            "ratio": rng.normal(size=n) * 0.001,
            "score": rng.normal(size=n),
            "colour": rng.choice(list(COLOURS), size=n),
        }
    )
    z = (
        1.5 * (df.grams - 5000) / 1000
        - 1.0 * df.ratio / 0.001
        + 0.5 * df.score
        + df.colour.map(COLOURS)
        + rng.normal(size=n) * 0.5
    )
    df["label"] = np.where(z > 0, "yes", "no")
    return df


def frame_of(split, info) -> tuple[pd.DataFrame, np.ndarray]:
    """A split's rows as the file held them (text columns decoded) and its targets: a baseline's input."""
    x, y = to_numpy(split)
    frame = pd.DataFrame(x, columns=info.feature_names)
    for col, cats in info.preprocessing["categorical"].items():
        frame[col] = [cats[int(c)] for c in frame[col]]
    return frame, y


def test_a_mixed_scale_table_with_a_text_column_matches_scaled_logistic_regression(
    ray_local, workdir, tmp_path, serve_port
):
    path = tmp_path / "mixed.csv"
    mixed_scale_table().to_csv(path, index=False)
    settings = {
        **workdir,
        "data.path": path,
        "data.test_fraction": 0.2,
        "tune.enabled": False,
        "train.epochs": 20,
        "serve.port": serve_port,
        "serve.keep_running": True,
    }
    summary = run_pipeline(TABULAR, [f"{k}={v}" for k, v in settings.items()])
    try:
        check_mixed_scale_run(summary, path, workdir, tmp_path)
    finally:
        shutdown_serve()  # kept up on the session's Ray (serve.keep_running) for the checks above


def check_mixed_scale_run(summary, path, workdir, tmp_path):
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    # the baseline, on the very rows the pipeline split off (the same data stage, read again)
    cfg = load_config(TABULAR, {"data.path": str(path), "data.test_fraction": 0.2})
    splits = make_task(cfg.task).load(cfg.data)
    (train, y_train), (test, y_test) = frame_of(splits.train, splits.info), frame_of(splits.test, splits.info)
    baseline = make_pipeline(
        make_column_transformer(
            (StandardScaler(), ["grams", "ratio", "score"]), (OneHotEncoder(handle_unknown="ignore"), ["colour"])
        ),
        LogisticRegression(max_iter=1000),
    ).fit(train, y_train)
    expected = float((baseline.predict(test) == y_test).mean())
    report(
        f"mixed-scale table: Shipyard {summary['test_accuracy']:.4f}, scikit-learn StandardScaler + OneHotEncoder "
        f"+ LogisticRegression {expected:.4f} on the same {len(y_test)} test rows"
    )
    assert summary["test_accuracy"] >= expected - 0.02
    assert summary["endpoint_accuracy"] == pytest.approx(summary["test_accuracy"], abs=0.005)

    # the endpoint takes raw values by name, a category it never saw (all-zero "other"), and lists the categories
    url = summary["endpoint"]
    meta = requests.get(f"{url}/metadata", timeout=30).json()
    assert {"name": "colour", "kind": "category", "categories": ["blue", "green", "red"]} in meta["schema"]["inputs"]
    rows = [
        {"grams": 7000.0, "ratio": -0.002, "score": 1.0, "colour": "red"},
        {"grams": 3000.0, "ratio": 0.002, "score": -1.0, "colour": "green"},
        {"grams": 5000.0, "ratio": 0.0, "score": 0.0, "colour": "purple"},
    ]
    answer = requests.post(f"{url}/predict", json={"instances": rows}, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["predictions"][:2] == ["yes", "no"]
    by_position = requests.post(f"{url}/predict", json={"instances": [[7000.0, -0.002, 1.0, "red"]]}, timeout=30)
    assert by_position.json()["predictions"] == ["yes"]
    bad = requests.post(
        f"{url}/predict", json={"instances": [{"grams": 1.0, "ratio": 0, "score": 0, "colour": 3}]}, timeout=30
    )
    assert bad.status_code == 422 and "column 'colour' takes one of its text categories" in bad.text
    # the statistics were fitted on the train split and logged with the run
    logged = mlflow.MlflowClient(workdir["tracking.uri"]).download_artifacts(
        summary["parent_run_id"], "data_info.json", str(tmp_path)
    )
    numeric = json.loads(Path(logged).read_text())["preprocessing"]["numeric"]
    assert numeric["grams"]["mean"] == pytest.approx(train.grams.mean(), rel=1e-6)
    assert numeric["grams"]["std"] == pytest.approx(train.grams.std(ddof=0), rel=1e-4)


def test_regression_is_as_good_as_ridge_answers_numbers_and_a_worse_run_keeps_champion(
    ray_local, workdir, tmp_path, serve_port
):
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    bunch = load_diabetes(as_frame=True)  # ships inside scikit-learn: no download
    path = tmp_path / "diabetes.csv"
    bunch.frame.rename(columns={"target": "progression"}).to_csv(path, index=False)
    common = {
        **workdir,
        "data.path": path,
        "data.label": "progression",
        "data.test_fraction": 0.3,
        "tracking.model_name": "diabetes",
    }
    first = run_pipeline(
        REGRESSION, [f"{k}={v}" for k, v in {**common, "tune.enabled": False, "serve.port": serve_port}.items()]
    )
    cfg = load_config(REGRESSION, {"data.path": str(path), "data.label": "progression", "data.test_fraction": 0.3})
    splits = make_task(cfg.task).load(cfg.data)
    (x_train, y_train), (x_test, y_test) = to_numpy(splits.train), to_numpy(splits.test)
    ridge = r2_score(y_test, make_pipeline(StandardScaler(), Ridge()).fit(x_train, y_train).predict(x_test))
    report(
        f"diabetes: Shipyard test r2 {first['test_metrics']['r2']:.4f} (rmse {first['test_metric']:.2f}), "
        f"scikit-learn StandardScaler + Ridge r2 {ridge:.4f} on the same {len(y_test)} test rows"
    )
    assert first["test_metric_name"] == "rmse" and first["promoted"]
    assert first["test_metrics"]["r2"] >= ridge - 0.05
    answers = first["endpoint_example"]["response"]["predictions"]
    assert len(answers) == 3 and all(isinstance(a, float) for a in answers)
    assert first["endpoint_metric"] == pytest.approx(first["test_metric"], rel=1e-3)  # rmse of the answers

    # a worse model (one epoch, a tiny learning rate): a higher RMSE does not take champion
    worse = run_pipeline(
        REGRESSION,
        [
            f"{k}={v}"
            for k, v in {
                **common,
                "tune.enabled": False,
                "train.epochs": 1,
                "train.lr": 1e-5,
                "serve.enabled": False,
            }.items()
        ],
    )
    assert worse["test_metric"] > first["test_metric"]
    assert not worse["promoted"] and "does not beat champion rmse" in worse["promotion_reason"]
    client = mlflow.MlflowClient(workdir["tracking.uri"])
    assert str(client.get_model_version_by_alias("diabetes", "champion").version) == str(first["model_version"])


def test_a_user_task_outside_the_platform_runs_end_to_end(ray_local, workdir, serve_port):
    """tests/user_tasks.py: its own data, loss and metrics; searched, trained, registered and served unchanged."""
    settings = {
        **workdir,
        "name": "median",
        "task.name": "tests.user_tasks:MedianRegression",
        "task.options": json.dumps({"quantile": 0.5, "rows": 3000}),
        "train.epochs": 4,
        "tune.num_samples": 2,
        "tune.grace_period": 1,
        "tune.space": json.dumps({"train.lr": {"loguniform": [0.001, 0.01]}}),
        "serve.port": serve_port,
    }
    summary = run_pipeline(None, [f"{k}={v}" for k, v in {**settings, "serve.keep_running": True}.items()])
    try:
        # both trials ran (ASHA may stop the worse at its first rung), none errored
        assert summary["test_metric_name"] == "pinball" and sum(summary["trials"].values()) == 2
        assert "errored" not in summary["trials"], summary["trials"]
        assert summary["test_metrics"]["mae"] < 0.8  # y = 3a - b + noise: a constant guess is off by ~2.5
        answer = requests.post(
            f"{summary['endpoint']}/predict", json={"instances": [[1.0, 0.0], [0.0, 1.0]]}, timeout=30
        ).json()
        assert answer["predictions"] == pytest.approx([3.0, -1.0], abs=0.6)
    finally:
        shutdown_serve()
