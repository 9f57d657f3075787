import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shipyard.config import DataConfig
from shipyard.data import _feature_columns, check_source, split_of
from shipyard.errors import DataError


def frame(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "label": rng.integers(0, 3, n)})


def test_split_is_reproducible_and_close_to_fractions():
    df = frame()
    s1, s2 = split_of(df, 0, 0.15, 0.15), split_of(df, 0, 0.15, 0.15)
    assert (s1 == s2).all()
    shares = np.bincount(s1, minlength=3) / len(df)
    assert abs(shares[1] - 0.15) < 0.03 and abs(shares[2] - 0.15) < 0.03


def test_split_does_not_depend_on_row_order_or_blocks():
    df = frame()
    whole = pd.Series(split_of(df, 3, 0.2, 0.2), index=df.index)
    shuffled = df.sample(frac=1, random_state=1)
    parts = pd.concat([pd.Series(split_of(chunk, 3, 0.2, 0.2), index=chunk.index)
                       for chunk in (shuffled.iloc[i:i + 300] for i in range(0, len(df), 300))])
    assert (parts.sort_index() == whole).all()


def test_seed_changes_the_split():
    df = frame()
    assert (split_of(df, 0, 0.15, 0.15) != split_of(df, 1, 0.15, 0.15)).any()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.csv"):
        check_source(DataConfig(path=str(tmp_path / "nope.csv")))


def test_unknown_format_is_rejected(tmp_path):
    f = tmp_path / "data.xlsx"
    f.write_text("x")
    with pytest.raises(DataError, match="neither .csv nor .parquet"):
        check_source(DataConfig(path=str(f)))


def test_missing_label_column_lists_columns():
    schema = pa.schema([("a", pa.float64()), ("target", pa.int64())])
    with pytest.raises(DataError, match=r"column 'label' not in f.csv; its columns are: a, target"):
        _feature_columns(schema, "label", "f.csv")


def test_non_numeric_features_are_named():
    schema = pa.schema([("a", pa.float64()), ("city", pa.string()), ("label", pa.string())])
    with pytest.raises(DataError, match=r"non-numeric feature columns in f.csv: city \(string\)"):
        _feature_columns(schema, "label", "f.csv")


def test_string_labels_and_numeric_features_are_fine():
    schema = pa.schema([("a", pa.float64()), ("b", pa.int32()), ("ok", pa.bool_()), ("label", pa.string())])
    assert _feature_columns(schema, "label", "f.csv") == ["a", "b", "ok"]
