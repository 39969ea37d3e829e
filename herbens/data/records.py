"""Records of metadata files -> typed columns, every bad value named by file, record and field.

Shared by the metadata readers: a CSV read as text, JSON record lists with their required
fields, and integer id columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from herbens.core.errors import HerbensError


def read_csv_text(path: Path, required: list[str]) -> pd.DataFrame:
    # Everything as text so that ids like "007" keep their zeros and "NA" is not a missing value.
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except FileNotFoundError as exc:
        raise HerbensError(f"{path}: file not found") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise HerbensError(f"{path}: not a readable CSV file ({exc})") from exc
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise HerbensError(f"{path}: missing column(s) {', '.join(missing)} "
                           f"(found: {', '.join(raw.columns) or 'none'})")
    for column in required:
        empty = raw[column].isna()
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise HerbensError(f"{path}: row {row + 2} has no {column}")  # +2: header, 1-based
    return raw


def require_keys(data: dict, keys: list[str], path: Path) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise HerbensError(f"{path}: missing top-level key(s) {', '.join(missing)} "
                           f"(found: {', '.join(map(str, data)) or 'none'})")


def json_records(data: dict, key: str, fields: list[str], id_field: str, path: Path) -> pd.DataFrame:
    records = data[key]
    if not isinstance(records, list):
        raise HerbensError(f"{path}: {key} must be a list, got a {type(records).__name__}")
    return record_frame(records, key, fields, id_field, path)


def record_frame(records: list, key: str, fields: list[str], id_field: str, path: Path) -> pd.DataFrame:
    """A DataFrame of JSON records; a missing or null field names the record index and id."""
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise HerbensError(f"{path}: {key}[{i}] is a {type(record).__name__}, expected an object")
    frame = pd.DataFrame.from_records(records, columns=_all_fields(records, fields))
    for field in fields:
        missing = frame[field].isna().to_numpy()
        if missing.any():
            i = int(np.flatnonzero(missing)[0])
            ident = records[i].get(id_field)
            where = f"{key}[{i}]" + (f" ({id_field} {ident!r})" if ident is not None and field != id_field else "")
            raise HerbensError(f"{path}: {where} has no field {field!r}")
    return frame


def _all_fields(records: list[dict], fields: list[str]) -> list[str]:
    # Required fields first so that a field no record has still becomes an (all-missing) column.
    seen = dict.fromkeys(fields)
    if records:
        seen.update(dict.fromkeys(records[0]))
    return list(seen)


def int_column(frame: pd.DataFrame, column: str, key: str, path: Path) -> np.ndarray:
    """Integer ids; a value that is not an integer names its record."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = f"row {i + 2}" if key == "rows" else f"{key}[{i}]"  # CSV: 1-based, after the header
        raise HerbensError(f"{path}: {where} has a non-integer {column} {frame[column].iloc[i]!r}")
    return values.astype(np.int64)


def optional_int_column(frame: pd.DataFrame, column: str, key: str, path: Path) -> np.ndarray:
    if column not in frame.columns:
        return np.full(len(frame), -1, dtype=np.int64)
    filled = frame[column].where(frame[column].notna(), -1)
    return int_column(filled.to_frame(column), column, key, path)
