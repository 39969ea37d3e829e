"""Kaggle submission CSV (``Id,Predicted``): an atomic writer and a validator.

The validator applies the checks Kaggle applies before scoring (header, one integer prediction
per test id, no unknown ids), plus one Kaggle does not make but that costs score silently: every
prediction must be a real ``category_id`` (a species *index* written by mistake scores 0).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write, remove_stale_temporaries

HEADER = ["Id", "Predicted"]
_INTEGER = re.compile(r"^\s*[+-]?\d+\s*$")


def write_submission(path: str | os.PathLike, ids: Sequence, category_ids: Sequence) -> Path:
    """Write ``Id,Predicted`` atomically.

    Args:
        path: output CSV.
        ids: test image ids (written as str; must be unique).
        category_ids: one integer Kaggle category_id per id (not a species index).

    Returns:
        The path written.
    """
    path = Path(path)
    ids = [str(i) for i in ids]
    preds = np.asarray(category_ids)
    if preds.shape != (len(ids),):
        raise HerbensError(f"{path}: {len(ids)} ids but predictions of shape {preds.shape}")
    if len(ids) and not np.issubdtype(preds.dtype, np.integer):
        raise HerbensError(f"{path}: predictions must be integer category_ids, got {preds.dtype}")
    dups = _first(pd.Index(ids)[pd.Index(ids).duplicated()])
    if dups:
        raise HerbensError(f"{path}: duplicate ids {dups}")
    frame = pd.DataFrame({"Id": ids, "Predicted": preds.astype(np.int64)})
    with atomic_write(path, newline="") as handle:
        frame.to_csv(handle, index=False)
    return path


def prepare_outputs(paths: Mapping[str, Path], log: Callable[[str], None] = print) -> list[str]:
    """Before writing a submission and its companions: clean up and say what will be replaced.

    Removes the temporaries that killed writers left beside any of ``paths`` (also those of an
    output this run will not write, e.g. a top-k file), reports a submission CSV whose JSON
    sidecar is missing (an earlier run died between the two, so nothing says how the CSV was
    made), and reports every existing output about to be overwritten.

    Args:
        paths: output kind -> path; ``submission`` is the CSV and ``json`` its sidecar.
        log: where the messages go.

    Returns:
        The messages logged.
    """
    messages = []
    for path in paths.values():
        for stale in remove_stale_temporaries(path):
            messages.append(f"removed {stale}, left by an interrupted earlier run")
    csv, sidecar = paths.get("submission"), paths.get("json")
    if csv is not None and sidecar is not None and csv.exists() and not sidecar.exists():
        messages.append(f"{csv} has no JSON sidecar {sidecar.name} (an earlier run stopped before "
                        "finishing it): it is overwritten now")
    for path in paths.values():
        if path.exists():
            messages.append(f"overwriting existing {path}")
    for message in messages:
        log(message)
    return messages


def read_submission(path: str | os.PathLike, expected_ids: Iterable | None = None,
                    valid_category_ids: Iterable | None = None) -> pd.DataFrame:
    """Read and validate a submission CSV.

    Args:
        path: the CSV.
        expected_ids: the test image ids; each must appear exactly once and no other.
        valid_category_ids: the taxonomy's category_ids; every prediction must be one.

    Returns:
        DataFrame with ``Id`` (str) and ``Predicted`` (int64), in file order.

    Raises:
        HerbensError: naming the file and the offending ids for a wrong header, empty or
            non-integer predictions, duplicate, missing or unknown ids, or invalid category ids.
    """
    path = Path(path)
    frame = _read_csv(path)
    if list(frame.columns) != HEADER:
        raise HerbensError(f"{path}: header is {','.join(map(str, frame.columns))!r}; expected 'Id,Predicted'")
    not_int = ~frame["Predicted"].str.match(_INTEGER)
    if not_int.any():
        bad = frame[not_int]
        raise HerbensError(f"{path}: {int(not_int.sum())} predictions are not integers, e.g. "
                           + _pairs(bad["Id"], bad["Predicted"]))
    frame["Predicted"] = frame["Predicted"].str.strip().astype(np.int64)
    frame["Id"] = frame["Id"].str.strip()
    dup = frame["Id"].duplicated()
    if dup.any():
        raise HerbensError(f"{path}: {int(dup.sum())} duplicate ids: {_first(frame['Id'][dup].unique())}")
    if expected_ids is not None:
        _check_ids(path, frame["Id"], [str(i) for i in expected_ids])
    if valid_category_ids is not None:
        valid = np.asarray(list(valid_category_ids), dtype=np.int64)
        bad = ~np.isin(frame["Predicted"].to_numpy(), valid)
        if bad.any():
            rows = frame[bad]
            raise HerbensError(f"{path}: {int(bad.sum())} predictions are not valid category_ids, e.g. "
                               + _pairs(rows["Id"], rows["Predicted"]))
    return frame


def _read_csv(path: Path) -> pd.DataFrame:
    # Everything as text, nothing turned into NaN: the checks below must see the raw cells.
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise HerbensError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise HerbensError(f"{path}: empty file (expected header 'Id,Predicted')") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise HerbensError(f"{path}: not a valid CSV ({str(exc).strip()})") from None


def _check_ids(path: Path, got: pd.Series, expected: list[str]) -> None:
    got_set, expected_set = set(got), set(expected)
    missing = [i for i in expected if i not in got_set]
    if missing:
        raise HerbensError(f"{path}: {len(missing)} test ids are missing: {_first(missing)}")
    unknown = [i for i in got if i not in expected_set]
    if unknown:
        raise HerbensError(f"{path}: {len(unknown)} ids are not test ids: {_first(unknown)}")


def _first(values, limit: int = 5) -> str:
    values = list(values)
    shown = ", ".join(repr(str(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def _pairs(ids, values, limit: int = 5) -> str:
    pairs = [f"Id {i!r} -> {v!r}" for i, v in zip(list(ids)[:limit], list(values)[:limit])]
    return "; ".join(pairs)
