"""A CSV/parquet file never seen in the repo, end to end, and bad files rejected with clear errors."""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import make_classification

from shipyard import DataError, load_config
from shipyard.cli import run_pipeline
from shipyard.data.tables import load_table
from tests.helpers import TINY

ROOT = Path(__file__).resolve().parents[2]
TABULAR = ROOT / "pipelines" / "configs" / "tabular.yaml"
pytestmark = pytest.mark.ray


def make_table(n=600, seed=0) -> pd.DataFrame:
    x, y = make_classification(n_samples=n, n_features=6, n_informative=4, n_classes=3, random_state=seed)
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)])
    df["species"] = np.array(["setosa", "versicolor", "virginica"])[y]
    return df


def test_tabular_csv_end_to_end_serves_string_labels_against_a_real_mlflow_server(
    ray_local, mlflow_server, tmp_path, serve_port, hardware_profile
):
    """One pipeline run (search, training, registry, endpoint) on a file never seen in the repo, tracked by a real
    `mlflow server` (HTTP) rather than a sqlite file: the checks of both on one run."""
    path = tmp_path / "flowers.csv"
    make_table().to_csv(path, index=False)
    settings = {
        **TINY,
        "tracking.uri": mlflow_server,
        "storage_path": tmp_path / "results",
        "serve.port": serve_port,
        "plan.profile": hardware_profile,
    }
    summary = run_pipeline(
        TABULAR, [f"data.path={path}", "data.label=species", *[f"{k}={v}" for k, v in settings.items()]]
    )
    assert summary["model_name"] == "tabular-flowers" and summary["promoted"]  # named after the file
    assert summary["test_accuracy"] > 0.6
    assert summary["endpoint_example"]["response"]["predictions"][0] in {"setosa", "versicolor", "virginica"}
    # through the server: the alias, the served version and the run tree
    assert summary["served_version"] == summary["model_version"]
    client = mlflow.MlflowClient(mlflow_server)
    assert str(client.get_model_version_by_alias("tabular-flowers", "champion").version) == summary["model_version"]
    run = client.get_run(summary["train_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]


def test_parquet_split_is_reproducible(ray_local, tmp_path):
    path = tmp_path / "t.parquet"
    make_table().to_parquet(path)
    cfg = load_config(TABULAR, {"data.path": str(path), "data.label": "species"})
    a, b = load_table(cfg.data), load_table(cfg.data)
    assert a.rows == b.rows and a.data_hash == b.data_hash
    rows = [sorted(map(tuple, np.stack(s.test.to_pandas()["x"]).tolist())) for s in (a, b)]
    assert rows[0] == rows[1]  # the same rows, whatever order the blocks came in


@pytest.mark.parametrize(
    "mutate, label, match",
    [
        (lambda df: df, "kind", r"column 'kind' not in .*; its columns are: f0"),
        (
            lambda df: df.assign(f0=[f"note {i}" for i in range(len(df))]),
            "species",
            r"text column 'f0' has \d+ distinct values in \d+ training rows: free text or an identifier",
        ),
        (
            lambda df: df.assign(f1=np.where(np.arange(len(df)) % 7 == 0, np.nan, df.f1)),
            "species",
            r"86 row\(s\) with missing or infinite values in feature columns f1 \(the first on line 2\)",
        ),
        (lambda df: df.iloc[:0], "species", r"bad.csv has no data rows"),
        (lambda df: df.assign(species="setosa"), "species", r"every row has the label 'setosa' in column 'species'"),
    ],
)
def test_bad_files_get_one_clear_error(ray_local, tmp_path, mutate, label, match):
    path = tmp_path / "bad.csv"
    mutate(make_table()).to_csv(path, index=False)
    cfg = load_config(TABULAR, {"data.path": str(path), "data.label": label})
    with pytest.raises(DataError, match=match) as err:
        load_table(cfg.data)
    assert "Traceback" not in str(err.value) and len(str(err.value).splitlines()) == 1  # one clear line


def test_train_split_statistics_match_pandas_over_many_blocks(ray_local):
    """Means, deviations and distinct values are combined from per-block parts (shipyard.data.stats): the
    same as pandas on the whole table, missing values left out, labels keeping their type."""
    from shipyard.data.stats import categories, distinct, mean_std

    frame = pd.DataFrame(
        {
            "a": [1.0, np.nan, 3.0, 4.0, 1e6, 2.5] * 50,
            "t": ["x", None, "y", "x", "z", "y"] * 50,
            "label": [0, 1, 2, 0, 1, 2] * 50,
        }
    )
    ds = ray_local.data.from_pandas(frame).repartition(7).materialize()
    assert ds.num_blocks() == 7
    stats = mean_std(ds, ["a"])["a"]
    assert stats["mean"] == pytest.approx(frame["a"].mean()) and stats["std"] == pytest.approx(frame["a"].std(ddof=0))
    assert sorted(distinct(ds, "label")) == [0, 1, 2] and all(isinstance(v, int) for v in distinct(ds, "label"))
    assert categories(ds, "t", len(frame), max_categories=10, source="t.csv") == ["x", "y", "z"]
