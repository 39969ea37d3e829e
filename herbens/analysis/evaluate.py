"""``herbens evaluate``: score Kaggle submissions or runs with the paper's post-hoc analyses.

Two kinds of input, freely mixed on one command line:

* a submission CSV (``Id,Predicted``), scored against ``--solution`` with the taxonomy built
  from ``--metadata`` (train_metadata.json); the CSV passes the same checks Kaggle applies;
* a run directory, scored on its validation logits: argmax of the ``species`` level against
  the labels stored with the logits, with the run's own ``taxonomy.json``.

Genus and family scores are always derived from the predicted species through the taxonomy,
so a species head is all an input needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from herbens.core.errors import HerbensError
from herbens.data.metadata import load_train_metadata
from herbens.data.splits import load_split
from herbens.data.taxonomy import Taxonomy
from herbens.ensemble.submission import read_submission
from herbens.metrics import (
    accuracy_by_training_count,
    best_worst,
    correctness_anova,
    head_tail_scores,
    level_scores,
    per_level_accuracy,
    top1_accuracy,
)
from herbens.stores.logits import check_finite, read_logits

#: Label columns accepted in a solution file, in order of preference (Kaggle solutions use
#: ``Predicted`` or ``Expected``; herbens' synthetic data may use ``category_id``).
SOLUTION_LABEL_COLUMNS = ("Predicted", "Expected", "category_id")

#: Elements per block when taking the argmax of memory-mapped logits: bounds the float32 copy
#: to about 128 MB whatever the number of classes.
ARGMAX_BLOCK_ELEMENTS = 1 << 25

# Standard errors are shown only for groups measured on at least this many images (families,
# genera) or species (training-count bins); below, the value stands alone.
MIN_INTERVAL_IMAGES = 10
MIN_INTERVAL_SPECIES = 5


@dataclass
class Predictions:
    """True and predicted species indices of one input, with the taxonomy they refer to."""

    name: str
    path: Path
    kind: str  # "submission" or "run"
    true: np.ndarray
    pred: np.ndarray
    taxonomy: Taxonomy
    unreadable: list = ()  # ids of a run's fallback rows (unreadable images), left out of the scores


# ----- scoring ----------------------------------------------------------------------------------

def evaluate_predictions(true_species_idx, pred_species_idx, taxonomy: Taxonomy, k: int = 10,
                         min_images: int = 1) -> dict:
    """Every score and analysis herbens reports, as a JSON-ready dict.

    Args:
        true_species_idx: true species indices (taxonomy class order), shape [N].
        pred_species_idx: predicted species indices, shape [N].
        taxonomy: maps species to genus/family and holds the training counts.
        k: rows in the best/worst family and genus tables.
        min_images: groups with fewer test images are left out of the best/worst tables.

    Returns:
        ``n_images``, ``top1_accuracy``, ``<level>_macro_f1`` and ``<level>_accuracy`` per level,
        ``head_macro_f1``/``tail_macro_f1`` (+ ``head_tail`` details), ``per_family``/``per_genus``
        (all groups), ``family_best``/``family_worst``/``genus_best``/``genus_worst``,
        ``by_training_count`` (bins) and ``anova`` (``family`` and ``genus``). Lists of records;
        NaN becomes None.
    """
    true = _as_indices(true_species_idx, "true")
    pred = _as_indices(pred_species_idx, "predicted")
    if true.shape != pred.shape:
        raise HerbensError(f"{len(true)} true labels but {len(pred)} predictions")
    n_species = taxonomy.num_classes("species")
    for what, arr in (("true", true), ("predicted", pred)):
        if len(arr) and (arr.min() < 0 or arr.max() >= n_species):
            raise HerbensError(f"{what} species index out of range 0..{n_species - 1}")
    out: dict = {"n_images": int(len(true)), "top1_accuracy": top1_accuracy(true, pred),
                 "training_counts": taxonomy.counts_source}
    out.update(level_scores(true, pred, taxonomy))
    head_tail = head_tail_scores(true, pred, taxonomy)
    out["head_macro_f1"] = head_tail["head_macro_f1"]
    out["tail_macro_f1"] = head_tail["tail_macro_f1"]
    out["head_tail"] = head_tail
    for level in ("family", "genus"):
        table = per_level_accuracy(true, pred, taxonomy, level)
        table = _intervals_where_measured(table, "n_images", MIN_INTERVAL_IMAGES)
        best, worst = best_worst(table, k, min_images)
        out[f"per_{level}"] = _records(table)
        out[f"{level}_best"] = _records(best)
        out[f"{level}_worst"] = _records(worst)
    out["by_training_count"] = _records(_intervals_where_measured(
        accuracy_by_training_count(true, pred, taxonomy), "n_species", MIN_INTERVAL_SPECIES))
    out["anova"] = {level: correctness_anova(true, pred, taxonomy, level)
                    for level in ("family", "genus")}
    return _json_ready(out)


def _intervals_where_measured(table: pd.DataFrame, count: str, least: int) -> pd.DataFrame:
    """No standard error (None when reported) for rows counting fewer than ``least``: a family
    of 3 images, all right, would otherwise read "100.00 +- 0.00"."""
    table = table.copy()
    table.loc[table[count] < least, "se"] = np.nan
    return table


def _as_indices(values, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise HerbensError(f"{what} labels must be a 1-D array of integer species indices")
    return arr.astype(np.int64)


def _records(table: pd.DataFrame) -> list[dict]:
    return [{key: _plain(value) for key, value in row.items()} for row in table.to_dict("records")]


def _plain(value):
    # numpy scalars and NaN are not JSON: convert to Python numbers and None.
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def _json_ready(obj):
    if isinstance(obj, dict):
        return {key: _json_ready(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_json_ready(value) for value in obj]
    return _plain(obj)


# ----- submissions --------------------------------------------------------------------------------

def load_solution(path: str | Path) -> pd.DataFrame:
    """Read a solution CSV: ``Id`` plus a label column (see ``SOLUTION_LABEL_COLUMNS``).

    Returns:
        DataFrame ``Id`` (str), ``category_id`` (int64). Other columns (``Usage``) are ignored.
    """
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise HerbensError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise HerbensError(f"{path}: not a readable CSV ({exc})") from None
    label = next((c for c in SOLUTION_LABEL_COLUMNS if c in frame.columns), None)
    if "Id" not in frame.columns or label is None:
        raise HerbensError(f"{path}: solution needs columns Id and one of "
                           f"{', '.join(SOLUTION_LABEL_COLUMNS)}; found {', '.join(frame.columns)}")
    ids = frame["Id"].str.strip()
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise HerbensError(f"{path}: duplicate Id {duplicated.iloc[0]!r} in the solution")
    labels = pd.to_numeric(frame[label].str.strip(), errors="coerce")
    bad = labels.isna() | (labels != labels.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise HerbensError(f"{path}: Id {ids.iloc[row]!r} has a non-integer {label} "
                           f"{frame[label].iloc[row]!r}")
    return pd.DataFrame({"Id": ids.to_numpy(), "category_id": labels.astype(np.int64).to_numpy()})


def taxonomy_from_metadata(path: str | Path, exclude_split: str | Path | None = None) -> Taxonomy:
    """Taxonomy (class order, hierarchy, training counts) of a train metadata file.

    Args:
        exclude_split: a run's ``split.csv``: its validation images are left out of the counts,
            which then count the training split (without it: every labelled image).
    """

    meta = load_train_metadata(path)
    taxonomy = Taxonomy.from_metadata(meta)
    if exclude_split is None:
        return taxonomy
    val_ids = set(load_split(exclude_split))
    train = meta.images[~meta.images["image_id"].astype(str).isin(val_ids)]
    taxonomy = taxonomy.with_training_rows(train["category_id"])
    taxonomy.counts_source = f"metadata minus the validation split {exclude_split}"
    return taxonomy


def submission_predictions(csv: str | Path, solution: pd.DataFrame, taxonomy: Taxonomy,
                           solution_path: str | Path = "solution") -> tuple[np.ndarray, np.ndarray]:
    """True and predicted species indices of a submission, in the solution's row order.

    The submission goes through ``read_submission`` (header, duplicate/missing/unknown ids,
    category ids outside the taxonomy), the checks Kaggle applies before scoring.
    """

    true = taxonomy.index_of(_checked_solution_ids(solution, taxonomy, solution_path))
    sub = read_submission(csv, expected_ids=solution["Id"].tolist(),
                          valid_category_ids=taxonomy.category_ids)
    predicted = sub.assign(Id=sub["Id"].astype(str)).set_index("Id")["Predicted"]
    predicted = predicted.reindex(solution["Id"])
    if predicted.isna().any():  # read_submission should have caught this; never score a gap
        missing = predicted.index[predicted.isna()][0]
        raise HerbensError(f"{csv}: no prediction for Id {missing!r}")
    return true, taxonomy.index_of(predicted.astype(np.int64).to_numpy())


def _checked_solution_ids(solution: pd.DataFrame, taxonomy: Taxonomy, path) -> np.ndarray:
    labels = solution["category_id"].to_numpy()
    known = np.isin(labels, taxonomy.category_ids)
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        raise HerbensError(f"{path}: Id {solution['Id'].iloc[row]!r} has category_id "
                           f"{labels[row]} which is not in the training metadata")
    return labels


# ----- runs ---------------------------------------------------------------------------------------

def argmax_rows(matrix, chunk: int | None = None, *, where: str = "logits",
                ids: list[str] | None = None) -> np.ndarray:
    """Row-wise argmax of a (possibly memory-mapped) matrix, ``chunk`` rows at a time.

    Blocks are converted to float32 because numpy's float16 argmax is about twice as slow, and
    each goes through the logits store's finiteness check (a NaN row has no argmax worth
    scoring): HerbensError naming ``where`` and the first bad row's id (from ``ids``).
    """

    if chunk is None:
        chunk = max(1, ARGMAX_BLOCK_ELEMENTS // max(1, matrix.shape[1]))
    ids = ids if ids is not None else [f"row {i}" for i in range(len(matrix))]
    out = np.empty(len(matrix), dtype=np.int64)
    for start in range(0, len(matrix), chunk):
        block = check_finite(np.asarray(matrix[start:start + chunk], dtype=np.float32), where, "species",
                             ids[start:start + chunk])
        out[start:start + chunk] = block.argmax(axis=1)
    return out


def run_predictions(run_dir: str | Path, split: str = "val"
                    ) -> tuple[np.ndarray, np.ndarray, Taxonomy, list[str]]:
    """True and predicted species indices of a run's stored logits, with its taxonomy.

    The store goes through the shared reader checks (:func:`herbens.stores.logits.read_logits` with
    the run's taxonomy: shapes, ids, hashes; every block read is checked for finiteness).
    Images without a label (-1) are left out, and so are the rows of images that were
    unreadable at inference (a fallback, not a prediction), with a warning; their ids are the
    fourth value returned. A split without any labels is an error.
    """

    run_dir = Path(run_dir)
    taxonomy = Taxonomy.of_run(run_dir)
    logits = read_logits(run_dir, split, taxonomy=taxonomy)
    if logits.labels is None:
        raise _no_labels(run_dir, split)
    labels = np.asarray(logits.labels, dtype=np.int64)
    logits.warn_unreadable()
    known = (labels >= 0) & ~logits.unreadable_mask()
    if not known.any():
        raise _no_labels(run_dir, split)
    pred = argmax_rows(logits.level("species"), where=logits.where, ids=logits.image_ids)
    return labels[known], pred[known], taxonomy, logits.unreadable


def _no_labels(run_dir: Path, split: str) -> HerbensError:
    return HerbensError(f"{run_dir}: logits/{split} carry no labels, nothing to evaluate "
                        f"(test logits cannot be scored; use a submission and --solution)")


# ----- inputs of either kind --------------------------------------------------------------------

def load_predictions(path: str | Path, solution: str | Path | None = None,
                     metadata: str | Path | None = None, split: str = "val",
                     _cache: dict | None = None, exclude_split: str | Path | None = None) -> Predictions:
    """Predictions of one input: a run directory or a submission CSV.

    Args:
        path: run directory, or CSV file (then ``solution`` and ``metadata`` are required).
        solution, metadata: solution CSV and train metadata for submissions.
        split: logits split of a run.
        exclude_split: for submissions, a run's ``split.csv`` to leave out of the metadata's
            training counts (runs carry their own training-split counts).
        _cache: shared between calls so the solution and metadata are read once.
    """
    path = Path(path)
    if path.is_dir():
        true, pred, taxonomy, unreadable = run_predictions(path, split)
        return Predictions(path.name, path, "run", true, pred, taxonomy, unreadable)
    if not path.exists():
        raise HerbensError(f"{path}: no such run directory or submission file")
    if solution is None or metadata is None:
        raise HerbensError(f"{path}: scoring a submission needs --solution and --metadata")
    cache = {} if _cache is None else _cache
    key = (str(solution), str(metadata), str(exclude_split))
    if key not in cache:
        cache[key] = (load_solution(solution), taxonomy_from_metadata(metadata, exclude_split))
    sol, taxonomy = cache[key]
    true, pred = submission_predictions(path, sol, taxonomy, solution)
    return Predictions(path.stem, path, "submission", true, pred, taxonomy)


def unique_names(names: list[str]) -> list[str]:
    """Make display names unique (``a``, ``a#2``) so tables and files never collide."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def evaluate_inputs(paths: list[Path], solution=None, metadata=None, split: str = "val",
                    k: int = 10, min_images: int = 1, exclude_split=None) -> list[dict]:
    """Load and score every input; one dict per input with ``name, path, kind, metrics``."""
    cache: dict = {}
    loaded = [load_predictions(p, solution, metadata, split, cache, exclude_split) for p in paths]
    names = unique_names([p.name for p in loaded])
    return [{"name": name, "path": str(p.path), "kind": p.kind,
             "taxonomy_hash": p.taxonomy.hash, "unreadable": list(p.unreadable),
             "metrics": evaluate_predictions(p.true, p.pred, p.taxonomy, k, min_images)}
            for name, p in zip(names, loaded)]
