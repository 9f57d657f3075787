"""A bad data file stops the pipeline CLI before training: exit 2, one line that names the file, the column
and where, no traceback, and no MLflow run left RUNNING (the run the data stage fails in ends FAILED)."""

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray


def table(n=300) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.normal(size=(n, 3)).round(3), columns=["f0", "f1", "f2"])
    df["species"] = np.array(["setosa", "versicolor", "virginica"])[rng.integers(0, 3, n)]
    return df.astype({"f2": object, "species": object})


def with_cells(df, rows, column, value):
    df.loc[rows, column] = value
    return df


# name: (the file's table, data.label, parts of the error line, whether Ray starts: the data stage's checks).
# More cases without the CLI (missing features, one class, text in the first rows): tests/unit/test_data.py
# (no Ray) and test_bad_files_get_one_clear_error in test_tabular.py (Ray)
CASES = {
    "no-such-label": (table(), "kind", ["column 'kind' not in", "columns are: f0, f1, f2, species"], False),
    "header-only": (table().iloc[:0], "species", ["has no data rows"], False),
    "text-below-first-block": (
        with_cells(table(60_000), 59_000, "f2", "abc"),
        "species",
        ["column 'f2' holds 'abc' on line 59002, where its first rows hold numbers"],
        True,
    ),
    "missing-labels": (
        with_cells(table(), [3, 50, 51], "species", None),
        "species",
        [
            "3 row(s) have no label in column 'species' (the first on line 5)",
            "fill in their labels or drop those rows in the file",
        ],
        True,
    ),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One tracking store for the cases (its tables take seconds to create); a run is found by data.path."""
    return f"sqlite:///{tmp_path_factory.mktemp('bad-data')}/mlflow.db"


@pytest.mark.parametrize("name", list(CASES))
def test_bad_data_file_exits_2_with_one_line_and_leaves_no_running_run(ray_local, store, tmp_path, name):
    df, label, parts, starts_ray = CASES[name]
    path = tmp_path / f"{name}.csv"
    df.to_csv(path, index=False)
    settings = {
        "data.path": path,
        "data.label": label,
        "tracking.uri": store,
        "storage_path": tmp_path / "results",
        "tune.enabled": "false",
        "plan.enabled": "false",
        "serve.enabled": "false",
    }
    args = [f"{k}={v}" for k, v in settings.items()]
    out = subprocess.run(
        [sys.executable, "-m", "pipelines.tabular", *args, "--address", ray_local.get_runtime_context().gcs_address],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert str(path) in errors[0] and all(part in errors[0] for part in parts), errors[0]
    assert ("starting or attaching to Ray" in out.stderr) == starts_ray  # the cheap checks come before Ray
    if not starts_ray:
        return  # nor did it open the tracking store
    client = mlflow.MlflowClient(store)
    ids = [e.experiment_id for e in client.search_experiments()]
    assert not client.search_runs(ids, "attributes.status = 'RUNNING'")
    ours = client.search_runs(ids, f"params.`data.path` = '{path}'")
    assert [r.info.status for r in ours] == ["FAILED"]  # the pipeline's run, ended; no stage run was started
