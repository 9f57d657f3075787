from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shipyard import DataError
from shipyard.config import DataConfig
from shipyard.data.explain import explain_csv, first_missing, missing_mask
from shipyard.data.tables import _csv_convert, _feature_columns, check_source, split_of


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
    parts = pd.concat(
        [
            pd.Series(split_of(chunk, 3, 0.2, 0.2), index=chunk.index)
            for chunk in (shuffled.iloc[i : i + 300] for i in range(0, len(df), 300))
        ]
    )
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


def test_text_among_numbers_is_named_and_a_column_of_words_is_a_categorical_feature(tmp_path):
    numbers = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": ["1", "2", "x", "4"], "label": [0, 1, 0, 1]})
    path = write(numbers, tmp_path / "typo.csv")
    with pytest.raises(
        DataError,
        match=r"non-numeric values in numeric feature columns of .*typo.csv: "
        r"b \(string, e.g. 'x' on line 4\)",
    ):
        check_source(DataConfig(path=path))
    words = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "city": ["Oslo", "Lima", "Oslo", "Pune"], "label": [0, 1, 0, 1]})
    assert check_source(DataConfig(path=write(words, tmp_path / "words.csv"))).names == ["a", "city", "label"]
    schema = pa.schema([("a", pa.float64()), ("city", pa.string()), ("label", pa.string())])
    assert _feature_columns(schema, "label", "f.csv") == ["a", "city"]


def test_string_labels_and_numeric_features_are_fine():
    schema = pa.schema([("a", pa.float64()), ("b", pa.int32()), ("ok", pa.bool_()), ("label", pa.string())])
    assert _feature_columns(schema, "label", "f.csv") == ["a", "b", "ok"]


def write(df: pd.DataFrame, path):
    df.to_parquet(path) if path.suffix == ".parquet" else df.to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("name", ["header.csv", "empty.parquet"])
def test_a_file_with_no_data_rows_fails_before_ray(tmp_path, name):
    path = write(frame().iloc[:0], tmp_path / name)
    with pytest.raises(DataError, match=rf"^{path} has no data rows \(at most a header\)"):
        check_source(DataConfig(path=path))
    (tmp_path / "blank.csv").write_text("")  # not even a header
    with pytest.raises(DataError, match="blank.csv has no data rows"):
        check_source(DataConfig(path=str(tmp_path / "blank.csv")))


def test_a_label_column_not_in_the_file_fails_before_ray(tmp_path):
    path = write(frame(50), tmp_path / "f.csv")
    with pytest.raises(DataError, match=r"column 'species' not in .*f.csv; its columns are: a, b, label"):
        check_source(DataConfig(path=path, label="species"))


def test_text_among_numbers_names_the_column_the_value_and_its_line(tmp_path):
    df = frame(50).astype({"b": object})
    df.loc[5, "b"] = "n/a?"
    path = write(df, tmp_path / "f.csv")
    with pytest.raises(DataError, match=r"feature columns of .*f.csv: b \(string, e.g. 'n/a\?' on line 7\)"):
        check_source(DataConfig(path=path))


def test_text_below_the_first_block_is_explained_with_column_value_and_line(tmp_path):
    """Ray Data types a CSV column from the file's first block (1 MiB) and then fails with "Failed to read CSV
    file" only: the driver reads it again with pyarrow to say which column, value and line."""
    df = frame(40_000).astype({"b": object})
    df.loc[39_990, "b"] = "abc"
    path = write(df, tmp_path / "f.csv")
    head = check_source(DataConfig(path=path))  # the first block holds only numbers: fine so far
    ray_error = ValueError(f"Failed to read CSV file: {path}. Please check the CSV file has correct format")
    assert explain_csv(ray_error, path, _csv_convert(head, "label")) == (
        f"{path}: column 'b' holds 'abc' on line 39992, where its first rows hold numbers; fix or delete "
        "that value, or drop the column"
    )


def test_whole_number_features_are_read_as_floats_and_an_empty_text_cell_as_missing(tmp_path):
    path = write(pd.DataFrame({"n": [1, 2], "x": [0.5, 1.0], "label": ["a", None]}), tmp_path / "f.csv")
    convert = _csv_convert(check_source(DataConfig(path=path)), "label")
    assert convert.column_types == {"n": pa.float64(), "x": pa.float64()}  # a later 2.5 in `n` reads fine
    assert convert.strings_can_be_null  # the label of line 3 is missing, not the class ""


@pytest.mark.parametrize("name, where", [("f.csv", "line 5"), ("f.parquet", "row index 3")])
def test_the_first_row_with_a_missing_value_is_found(tmp_path, name, where):
    df = frame(50)
    df.loc[[3, 30], "a"] = np.nan
    df.loc[7, "b"] = np.inf
    path = write(df, tmp_path / name)
    fmt = name.rsplit(".", 1)[1]
    assert first_missing([Path(path)], fmt, ["a", "b", "label"], path) == where
    assert first_missing([Path(path)], fmt, ["label"], path) is None


def test_missing_and_infinite_values_are_found_per_row():
    df = pd.DataFrame({"a": [1.0, np.nan, 3.0, 4.0], "b": [1.0, 2.0, -np.inf, 4.0], "y": ["x", "y", "z", None]})
    assert missing_mask(df).tolist() == [False, True, True, True]


def test_moments_of_parts_combine_to_those_of_the_whole():
    """Chan, Golub and LeVeque's pairwise update: the parts' (count, mean, M2) give the whole's exactly, also where
    sum(x^2)/n - mean^2 would cancel (values near 1e9 that differ by units)."""
    from shipyard.data.stats import combine_moments

    x = np.array([1e9 + 1, 1e9 + 2, 1e9 + 3, 1e9 + 4, 1e9 + 6])
    parts = [x[:2], x[2:3], x[3:]]
    whole = (0, 0.0, 0.0)
    for p in parts:
        whole = combine_moments(whole, (len(p), float(p.mean()), float(((p - p.mean()) ** 2).sum())))
    n, mean, m2 = whole
    assert n == 5 and mean == pytest.approx(x.mean(), abs=1e-6)
    assert m2 / n == pytest.approx(x.var(), rel=1e-9)  # 2.96: population variance
    assert combine_moments((0, 0.0, 0.0), (0, 0.0, 0.0)) == (0, 0.0, 0.0)
