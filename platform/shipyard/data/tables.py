"""Tables for the tabular tasks: a built-in set or a parquet/CSV file read with Ray Data, split reproducibly.

    splits = load_table(cfg.data)       # after ray.init(); splits.train/val/test are materialized
    for batch in splits.train.iter_torch_batches(batch_size=64): batch["x"], batch["y"]

The split is decided by a hash of each row's content mixed with `data.seed`, not by row order or block
layout, so the same file and seed give the same split whatever the parallelism or cluster.

A bad file fails with one DataError line that names the file, the column and the line: no rows, no such label
column or text among the features (its first block) before Ray starts; missing values, text further down and a
single class in the data stage. Rows are never dropped silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shipyard.config import DataConfig
from shipyard.data.explain import explain_csv, first_missing, not_numbers, row_position
from shipyard.data.ray_errors import clear_errors as _clear_errors
from shipyard.data.splits import DataInfo, Splits
from shipyard.data.stats import categories as _categories
from shipyard.data.stats import distinct as _distinct
from shipyard.data.stats import is_missing
from shipyard.data.stats import mean_std as _mean_std
from shipyard.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = {".csv": "csv", ".parquet": "parquet"}
NO_ROWS = "{source} has no data rows (at most a header); give a file with a header and data rows"


def _files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    return files


def check_source(cfg: DataConfig):
    """Cheap checks that need no Ray: the file exists, has a format we read and data rows, holds the label
    column, and its other columns are numbers (typed from its first block, as Ray Data types them). Raises
    DataError. Returns that block's pyarrow schema (None for built-in and remote data)."""
    if cfg.path is None:
        return None
    p = Path(cfg.path).expanduser()
    if "://" in cfg.path:  # remote storage (s3://, gs://, ...): Ray Data reports problems itself
        return None
    if not p.exists():
        raise DataError(f"data.path: file not found: {p} (give a .csv or .parquet file, or a folder of them)")
    files = _files(p)
    if not files:
        raise DataError(f"data.path: {p} holds no .csv or .parquet files")
    bad = [f for f in files if f.suffix not in SUFFIXES]
    if bad:
        raise DataError(f"data.path: {bad[0]} is neither .csv nor .parquet; convert it or rename its suffix")
    if len({f.suffix for f in files}) > 1:
        raise DataError(f"data.path: {p} mixes .csv and .parquet files; keep one format per folder")
    fmt = SUFFIXES[files[0].suffix]
    first = None
    for f in files:  # the first block of the first file that has rows: a folder may hold empty parts
        blocks = contextlib.closing(_batches(f, fmt))
        with _clear_errors(f"data.path: cannot read {f} as {fmt}"), blocks as batches:
            first = next((b for b in batches if b.num_rows), None)
        if first is not None:
            break
    if first is None:
        raise DataError(NO_ROWS.format(source=cfg.path))
    examples = {
        name: f"{value!r} on {row_position(f, fmt, row, cfg.path)}"
        for name, (row, value) in not_numbers(first.to_pandas()).items()
    }
    _feature_columns(first.schema, cfg.label, cfg.path, examples)
    return first.schema


def _batches(file: Path | str, fmt: str, convert=None):
    """A local file's pyarrow RecordBatches in order, streamed (a block at a time), as Ray Data reads them."""
    import pyarrow as pa
    from pyarrow import csv, parquet

    if fmt == "parquet":
        with parquet.ParquetFile(file) as pf:
            yield from pf.iter_batches()
        return
    try:  # Ray Data's CSV reader: open_csv without threads, types inferred from the first block
        reader = csv.open_csv(
            file, read_options=csv.ReadOptions(use_threads=False), convert_options=convert or _csv_convert()
        )
    except pa.ArrowInvalid as err:
        if "Empty CSV file" in str(err):  # not even a header
            return
        raise
    with reader:
        yield from reader


def _csv_convert(schema=None, label: str | None = None):
    """How CSV cells become values, for Ray Data and the driver's checks alike. An empty cell in a text column
    (a label) is missing, as in a numeric one, not the class "". Given the first block's schema, numeric
    features are read as float64: a column of whole numbers up there may hold 0.5 further down."""
    import pyarrow as pa
    from pyarrow import csv

    numeric = (
        {}
        if schema is None
        else {
            n: pa.float64()
            for n, t in zip(schema.names, schema.types)
            if n != label and (pa.types.is_integer(t) or pa.types.is_floating(t))
        }
    )
    return csv.ConvertOptions(strings_can_be_null=True, column_types=numeric)


def _hash_files(path: str) -> str:
    if "://" in path:
        return "remote:" + hashlib.sha256(path.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in _files(Path(path).expanduser()):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read(cfg: DataConfig, convert=None):
    import ray.data

    if cfg.builtin == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits(as_frame=True)  # ships inside scikit-learn: no download
        frame = bunch.frame.rename(columns={"target": "label"})
        digest = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes()).hexdigest()
        return ray.data.from_pandas(frame), "label", digest
    path = str(Path(cfg.path).expanduser().resolve()) if "://" not in cfg.path else cfg.path
    if "://" in path:
        suffix = Path(path).suffix or ".parquet"
    else:  # a folder's own name may hold a dot (exports/run.v2/): look at its files
        suffix = Path(path).suffix if Path(path).is_file() else _files(Path(path))[0].suffix
    fmt = SUFFIXES.get(suffix, "parquet")
    read = ray.data.read_csv if fmt == "csv" else ray.data.read_parquet
    options = {"convert_options": convert or _csv_convert()} if fmt == "csv" else {}
    with _clear_errors(f"data.path: cannot read {path} as {fmt}"):
        ds = read(path, file_extensions=[fmt], **options)  # skips stray files (_SUCCESS, README)
    return ds, cfg.label, _hash_files(path)


def _feature_columns(schema, label: str, source: str, examples: dict[str, str] | None = None) -> list[str]:
    """The feature columns of a schema, or a DataError naming the missing label, an empty column, or a text
    column that holds numbers with stray text among them (`examples`: such a column's first non-number and
    where it is, e.g. "'abc' on line 7"). Other text columns are categorical (one-hot encoded by the task)."""
    import pyarrow as pa

    names = list(schema.names)
    if label not in names:
        raise DataError(
            f"data.label: column '{label}' not in {source}; its columns are: {', '.join(names)}. "
            f"Set data.label=<column>"
        )
    bad = []
    for name, typ in zip(schema.names, schema.types):
        if name == label:
            continue
        if isinstance(typ, pa.DataType) and pa.types.is_null(typ):
            bad.append(f"{name} (empty: no values in its first rows)")
        elif examples and name in examples:
            bad.append(f"{name} ({typ}, e.g. {examples[name]})")
    if bad:
        raise DataError(
            f"non-numeric values in numeric feature columns of {source}: {', '.join(bad)}. Fix those "
            "values, drop these columns, or name one as data.label"
        )
    features = [n for n in names if n != label]
    if not features:
        raise DataError(f"{source} has no feature columns besides the label '{label}'")
    return features


def is_numeric_type(typ) -> bool:
    import pyarrow as pa

    if isinstance(typ, pa.DataType):
        return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
    return np.dtype(typ).kind in "biuf"


def split_of(frame: pd.DataFrame, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 = train, 1 = val, 2 = test for each row, from a hash of the row's content and the seed."""
    row_hash = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    # hash_key only salts text columns, so mix the seed in with a second hash over the row hashes
    mixed = pd.util.hash_array(row_hash ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64))
    u = mixed / float(2**64)
    return np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0))


def load_table(cfg: DataConfig, task: str = "classification", regression: bool = False) -> Splits:
    """Read, validate, split and encode a table for a tabular task. Needs Ray to be initialised. Raises DataError.

    `x` holds the file's feature columns in order: numbers as they are, a text column as the index of its
    value among the categories seen in the train split (-1: a value the train split does not have). `y` is the
    class index (classification) or the number (regression). The preprocessing the model bakes in is fitted
    on the train split only: per-column mean and standard deviation of the numbers, the categories of each text
    column (at most data.max_categories), and for regression the target's mean and deviation.
    """
    head = check_source(cfg)  # the schema of the file's first block
    source = cfg.path or f"builtin:{cfg.builtin}"
    files = _files(Path(cfg.path).expanduser()) if head is not None else []  # local files only
    fmt = SUFFIXES[files[0].suffix] if files else None
    convert = _csv_convert(head, cfg.label) if fmt == "csv" else None
    ds, label, digest = _read(cfg, convert)
    explain = (lambda err: explain_csv(err, source, convert)) if convert else None
    with _clear_errors(f"{source}: cannot parse the file", explain):  # ragged rows, mixed types: found here
        schema = ds.schema()
        if schema is None:
            raise DataError(NO_ROWS.format(source=source))
        features = _feature_columns(schema, label, source)
        types = dict(zip(schema.names, schema.types))
        text = [f for f in features if not is_numeric_type(types[f])]
        labels = None if regression else _distinct(ds, label)
    if regression and not is_numeric_type(types[label]):
        raise DataError(
            f"{source}: task.name=regression needs a numeric target, but column '{label}' holds "
            f"{types[label]}; point data.label at a column of numbers, or use task.name=classification"
        )
    if labels is not None and not labels:
        raise DataError(NO_ROWS.format(source=source))
    classes = None
    if labels is not None:
        classes = sorted((v for v in labels if not is_missing(v)), key=lambda v: (str(type(v)), v))
        if len(classes) < 2 and len(classes) == len(labels):  # with missing labels, those are reported below
            raise DataError(
                f"{source}: every row has the label {classes[0]!r} in column '{label}'; a "
                "classifier needs at least 2 classes: check that data.label names the class column, "
                "or add rows of other classes"
            )
    seed, val_f, test_f = cfg.seed, cfg.val_fraction, cfg.test_fraction
    columns = features + [label]

    def tag(batch: pd.DataFrame) -> pd.DataFrame:
        return batch[columns].assign(_split=split_of(batch[columns], seed, val_f, test_f))

    with _clear_errors(f"{source}: could not split the data"):
        tagged = ds.map_batches(tag, batch_format="pandas").materialize()
        train_raw = tagged.filter(expr="_split == 0")
        n_train = train_raw.count()
        categories = {c: _categories(train_raw, c, n_train, cfg.max_categories, source) for c in text}
        numeric = [f for f in features if f not in categories] + ([label] if regression else [])
        stats = _mean_std(train_raw, numeric) if n_train else {}
    index = {v: i for i, v in enumerate(classes)} if classes is not None else None
    lookup = {c: {v: i for i, v in enumerate(cats)} for c, cats in categories.items()}

    def encode(batch: pd.DataFrame) -> dict[str, np.ndarray]:
        x = np.empty((len(batch), len(features)), dtype=np.float32)
        ok = np.empty((len(batch), len(columns)), dtype=bool)
        for j, f in enumerate(features):
            col = batch[f]
            if f in lookup:
                ok[:, j] = col.notna().to_numpy()
                x[:, j] = col.map(lookup[f]).fillna(-1).to_numpy(dtype=np.float32)
            else:
                x[:, j] = col.to_numpy(dtype=np.float32)
                ok[:, j] = np.isfinite(x[:, j])
        if index is not None:
            y = batch[label].map(index)  # NaN for a missing label
            ok[:, -1] = y.notna().to_numpy()
            y = y.fillna(-1).to_numpy(dtype=np.int64)
        else:
            y = batch[label].to_numpy(dtype=np.float32)
            ok[:, -1] = np.isfinite(y)
        # a dict of arrays: Ray Data stores the 2-D `x` as a tensor column (a DataFrame would pickle it)
        return {
            "x": x,
            "y": y,
            "split": batch["_split"].to_numpy(),
            # index in `columns` of a row's first missing/infinite value, -1 if none: reported below,
            # because an exception raised in here reaches the driver without its message
            "bad": np.where(ok.all(axis=1), -1, np.argmin(ok, axis=1)),
        }

    with _clear_errors(f"{source}: could not prepare the data"):
        encoded = tagged.map_batches(encode, batch_format="pandas").materialize()
        bad = encoded.filter(expr="bad >= 0")
        n_bad = bad.count()
        if n_bad:
            cols = [columns[i] for i in sorted(bad.unique("bad"))]
            try:  # where the first one is, for the user to look at: a bonus, never in the error's way
                where = first_missing(files, fmt, columns, source, convert) if files else None
            except (OSError, ValueError):
                where = None
            first_on = f" (the first on {where})" if where else ""
            if cols == [label]:
                raise DataError(
                    f"{source}: {n_bad} row(s) have no label in column '{label}'{first_on}; "
                    "fill in their labels or drop those rows in the file (Shipyard does not drop "
                    "rows silently)"
                )
            what = "feature columns" if label not in cols else "columns"
            raise DataError(
                f"{source}: {n_bad} row(s) with missing or infinite values in {what} "
                f"{', '.join(cols)}{first_on}; fill them in or drop those rows in the file "
                "(Shipyard does not drop rows silently)"
            )
    parts = {}
    for i, name in enumerate(("train", "val", "test")):
        parts[name] = encoded.filter(expr=f"split == {i}").drop_columns(["split", "bad"]).materialize()
    rows = {name: part.count() for name, part in parts.items()}
    if min(rows.values()) == 0:
        raise DataError(f"{source}: too few rows ({sum(rows.values())}) for a train/val/test split {rows}")
    numeric_features = [f for f in features if f not in categories]
    preprocessing = {
        "numeric": {f: stats[f] for f in numeric_features},
        "categorical": {f: [_jsonable(v) for v in cats] for f, cats in categories.items()},
    }
    if regression:
        preprocessing["target"] = stats[label]
    info = DataInfo(
        task=task,
        input_shape=[len(features)],
        output_width=1 if regression else len(classes),
        target=label,
        feature_names=features,
        classes=None if regression else [_jsonable(c) for c in classes],
        data_hash=digest,
        rows=rows,
        preprocessing=preprocessing,
    )
    log.info(
        "data %s: %d features (%d categorical), %s, rows %s, sha256 %s",
        source,
        len(features),
        len(categories),
        f"target '{label}'" if regression else f"{len(classes)} classes",
        rows,
        digest[:12],
    )
    return Splits(parts["train"], parts["val"], parts["test"], info)


def _jsonable(v: Any) -> Any:
    """A numpy scalar as the Python value JSON, MLflow and the endpoint's answers carry."""
    return v.item() if isinstance(v, np.generic) else v


def to_numpy(ds) -> tuple[np.ndarray, np.ndarray]:
    """A (small) split as arrays on the driver: for evaluation and the endpoint check."""
    batch = ds.take_batch(batch_size=ds.count(), batch_format="numpy")
    return np.stack(batch["x"]).astype(np.float32), np.asarray(batch["y"])
