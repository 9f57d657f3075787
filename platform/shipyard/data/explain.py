"""Why a table could not be read, said with the file, row and column: the checks behind the data stage's errors."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def row_position(file: Path | str, fmt: str, row: int, source: str) -> str:
    """A data row (0-based) as a user finds it: a CSV's line (the header is line 1), a parquet row's index."""
    where = f"line {row + 2}" if fmt == "csv" else f"row index {row}"
    return where if Path(file).resolve() == Path(source).expanduser().resolve() else f"{where} of {file}"


def not_numbers(frame: pd.DataFrame) -> dict[str, tuple[int, Any]]:
    """For each text column that mostly holds numbers: its first value that is not a number, and that value's
    row (0-based). A text column of mostly words is a categorical feature, not a mistake."""
    found = {}
    for name in frame.columns:
        col = frame[name]
        if col.dtype.kind in "biuf":
            continue
        bad = (col.notna() & pd.to_numeric(col, errors="coerce").isna()).to_numpy()
        if bad.any() and bad.sum() < 0.5 * col.notna().sum():
            row = int(np.argmax(bad))
            found[name] = (row, col.iloc[row])
    return found


def missing_mask(frame: pd.DataFrame) -> np.ndarray:
    """Per row: does any of its values miss (empty, null, NaN) or is it infinite?"""
    miss = frame.isna().to_numpy()
    numeric = [i for i, dt in enumerate(frame.dtypes) if dt.kind in "f"]
    if numeric:
        miss[:, numeric] |= np.isinf(frame.iloc[:, numeric].to_numpy())
    return miss.any(axis=1)


def first_missing(files: list[Path], fmt: str, columns: list[str], source: str, convert=None) -> str | None:
    """Where the first row with a missing or infinite value in `columns` is, e.g. "line 14"; None if none.
    Streams the files with pyarrow on the driver: only once Ray Data has found such rows."""
    for f in files:
        seen = 0
        from shipyard.data.tables import _batches  # the reader itself, at the row it failed

        with contextlib.closing(_batches(f, fmt, convert)) as blocks:
            for batch in blocks:
                miss = missing_mask(batch.select(columns).to_pandas())
                if miss.any():
                    return row_position(f, fmt, seen + int(np.argmax(miss)), source)
                seen += batch.num_rows
    return None


def explain_csv(err: Exception, source: str, convert) -> str | None:
    """Why Ray Data could not read a local CSV, from pyarrow's own reason (Ray keeps only "Failed to read CSV
    file"), read again on the driver. The usual cause: text below the first block in a column of numbers."""
    import pyarrow as pa
    from pyarrow import csv

    m = re.search(r"Failed to read CSV file: (.+?)\. Please check", str(err))
    if not m or not Path(m[1]).is_file():
        return None
    reader = csv.open_csv(m[1], read_options=csv.ReadOptions(use_threads=False), convert_options=convert)
    try:
        with reader:
            for _ in reader:
                pass
    except pa.ArrowInvalid as arrow:
        c = re.match(r"In CSV column #(\d+): Row #(\d+): CSV conversion error to (\w+): invalid value (.*)", str(arrow))
        if not c:  # a ragged row, a stray quote: pyarrow names the row
            return f"{source}: cannot parse {m[1]}: {str(arrow)[:500]}"
        kind = {"double": "numbers", "int64": "whole numbers", "bool": "true/false", "null": "no values"}.get(
            c[3], c[3]
        )
        return (
            f"{source}: column '{reader.schema.names[int(c[1])]}' holds {c[4]} on "
            f"{row_position(m[1], 'csv', int(c[2]) - 2, source)}, where its first rows hold {kind}; "
            "fix or delete that value, or drop the column"
        )
    return None
