"""Data stage: a built-in set or a parquet/CSV file read with Ray Data, split reproducibly.

    splits = load_splits(cfg.data)      # after ray.init(); splits.train/val/test are materialized
    for batch in splits.train.iter_torch_batches(batch_size=64): batch["x"], batch["y"]

The split is decided by a hash of each row's content mixed with `data.seed`, not by row order or block
layout, so the same file and seed give the same split whatever the parallelism or cluster.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from shipyard.config import DataConfig
from shipyard.errors import DataError

log = logging.getLogger(__name__)

SUFFIXES = {".csv": "csv", ".parquet": "parquet"}


@dataclass
class Splits:
    train: Any  # ray.data.Dataset, materialized, columns x: float32[n_features], y: int64
    val: Any
    test: Any
    feature_names: list[str]
    classes: list[Any]
    """Original label values; the model predicts their index."""
    data_hash: str
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def in_features(self) -> int:
        return len(self.feature_names)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES) if path.is_dir() else [path]
    return files


def check_source(cfg: DataConfig) -> None:
    """Cheap checks that need no Ray: the file exists and has a format we read. Raises DataError."""
    if cfg.path is None:
        return
    p = Path(cfg.path).expanduser()
    if "://" in cfg.path:  # remote storage (s3://, gs://, ...): Ray Data reports problems itself
        return
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


def _hash_files(path: str) -> str:
    if "://" in path:
        return "remote:" + hashlib.sha256(path.encode()).hexdigest()[:16]
    h = hashlib.sha256()
    for f in _files(Path(path).expanduser()):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _read(cfg: DataConfig):
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
    with _clear_errors(f"data.path: cannot read {path} as {fmt}"):
        ds = read(path, file_extensions=[fmt])  # stray files in a folder (_SUCCESS, README) are skipped
    return ds, cfg.label, _hash_files(path)


@contextlib.contextmanager
def _clear_errors(what: str):
    """Ray wraps errors raised in its tasks; surface our DataError's own message, or say what failed."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        cause = _find_cause(err, DataError)
        if cause is not None:
            raise DataError(*cause.args) from None  # the message, without the remote traceback
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # a remote error's text is a traceback: its "SomethingError: message" line says what went wrong
        reason = next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Invalid)\b.*:", ln)),
                      lines[0] if lines else type(err).__name__)
        raise DataError(f"{what}: {reason[:500]}") from err


def _feature_columns(schema, label: str, source: str) -> list[str]:
    import pyarrow as pa

    names = list(schema.names)
    if label not in names:
        raise DataError(f"data.label: column '{label}' not in {source}; its columns are: {', '.join(names)}. "
                        f"Set data.label=<column>")
    bad = []
    for name, typ in zip(schema.names, schema.types):
        if name == label:
            continue
        numeric = (pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)
                   if isinstance(typ, pa.DataType) else np.dtype(typ).kind in "biuf")
        if not numeric:
            bad.append(f"{name} ({typ})")
    if bad:
        raise DataError(f"non-numeric feature columns in {source}: {', '.join(bad)}. Features must be numbers: "
                        "encode or drop these columns, or name one as data.label")
    features = [n for n in names if n != label]
    if not features:
        raise DataError(f"{source} has no feature columns besides the label '{label}'")
    return features


def split_of(frame: pd.DataFrame, seed: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 = train, 1 = val, 2 = test for each row, from a hash of the row's content and the seed."""
    row_hash = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    # hash_key only salts text columns, so mix the seed in with a second hash over the row hashes
    mixed = pd.util.hash_array(row_hash ^ np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64))
    u = mixed / float(2**64)
    return np.where(u < test_fraction, 2, np.where(u < test_fraction + val_fraction, 1, 0))


def load_splits(cfg: DataConfig) -> Splits:
    """Read, validate, label-encode and split. Needs Ray to be initialised. Raises DataError."""
    check_source(cfg)
    ds, label, digest = _read(cfg)
    source = cfg.path or f"builtin:{cfg.builtin}"
    with _clear_errors(f"{source}: cannot parse the file"):  # ragged rows, mixed types: found while reading
        schema = ds.schema()
        if schema is None:
            raise DataError(f"{source} has no rows; give a file with a header and data rows")
        features = _feature_columns(schema, label, source)
        labels = ds.unique(label)
    if len(labels) < 2:
        raise DataError(f"{source}: label column '{label}' has {len(labels)} distinct value(s); "
                        "a classifier needs at least 2 (is the file empty?)")
    if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in labels):
        raise DataError(f"{source}: label column '{label}' has missing values; drop or fill those rows")
    classes = sorted(labels, key=lambda v: (str(type(v)), v))
    index = {v: i for i, v in enumerate(classes)}
    seed, val_f, test_f = cfg.seed, cfg.val_fraction, cfg.test_fraction

    def encode(batch: pd.DataFrame) -> dict[str, np.ndarray]:
        x = batch[features].to_numpy(dtype=np.float32)
        finite = np.isfinite(x)
        # a dict of arrays: Ray Data stores the 2-D `x` as a tensor column (a DataFrame would pickle it)
        return {"x": x, "y": batch[label].map(index).to_numpy(dtype=np.int64),
                "split": split_of(batch[features + [label]], seed, val_f, test_f),
                # index of a row's first missing/infinite feature, -1 if none: reported below, because an
                # exception raised in here reaches the driver without its message
                "bad": np.where(finite.all(axis=1), -1, np.argmin(finite, axis=1))}

    with _clear_errors(f"{source}: could not prepare the data"):
        encoded = ds.map_batches(encode, batch_format="pandas").materialize()
        bad = encoded.filter(expr="bad >= 0")
        n_bad = bad.count()
        if n_bad:
            cols = sorted({features[i] for i in bad.unique("bad")})
            raise DataError(f"{source}: {n_bad} row(s) with missing or infinite values in feature columns "
                            f"{cols}; fill or drop those rows before training")
    parts = {}
    for i, name in enumerate(("train", "val", "test")):
        parts[name] = encoded.filter(expr=f"split == {i}").drop_columns(["split", "bad"]).materialize()
    rows = {name: part.count() for name, part in parts.items()}
    if min(rows.values()) == 0:
        raise DataError(f"{source}: too few rows ({sum(rows.values())}) for a train/val/test split {rows}")
    log.info("data %s: %d features, %d classes, rows %s, sha256 %s", source, len(features), len(classes),
             rows, digest[:12])
    return Splits(parts["train"], parts["val"], parts["test"], features, classes, digest, rows)


def _find_cause(err: BaseException, kind: type) -> BaseException | None:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, kind):
            return err
        # RayTaskError keeps the remote exception as .cause; chained Python errors use __cause__
        cause = getattr(err, "cause", None)
        err = cause if isinstance(cause, BaseException) else (err.__cause__ or err.__context__)
    return None


def to_numpy(ds) -> tuple[np.ndarray, np.ndarray]:
    """A (small) split as arrays on the driver: for evaluation and the endpoint check."""
    batch = ds.take_batch(batch_size=ds.count(), batch_format="numpy")
    return np.stack(batch["x"]).astype(np.float32), batch["y"].astype(np.int64)
