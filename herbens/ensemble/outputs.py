"""What ``herbens ensemble`` writes and prints: the checked CSVs, the validation table, the summary."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write, file_sha256
from herbens.ensemble.combine import ClassSpace, Params
from herbens.ensemble.options import EnsembleOptions
from herbens.ensemble.stores import AlignedSplit, Run
from herbens.ensemble.submission import read_submission, write_submission

SCORE_LEVELS = ("species", "genus", "family")
STEP_WIDTH = 64


def output_paths(output: Path) -> dict[str, Path]:
    """The submission CSV and, beside it, ``<stem>.json`` and ``<stem>.topk.csv``."""
    stem = output.with_suffix("") if output.suffix.lower() == ".csv" else output
    return {"submission": output, "json": stem.with_name(stem.name + ".json"),
            "topk": stem.with_name(stem.name + ".topk.csv")}


def write_outputs(output: Path, test: AlignedSplit, space: ClassSpace, pred: np.ndarray,
                  top: np.ndarray | None, top_scores: np.ndarray | None) -> dict[str, Path]:
    """Write the submission (re-read with Kaggle's checks) and, with ``top``, the top-k CSV.

    The previous JSON sidecar goes first and the new one (written last, by the caller, with
    :func:`companion_hashes`) records the content hash of each CSV: a run that fails or is
    killed part-way leaves no pair rather than a new CSV beside the old run's JSON, and a
    reader (:func:`check_companions`) refuses any pair whose hashes do not match.
    """
    paths = output_paths(output)
    paths["json"].unlink(missing_ok=True)
    write_submission(output, test.image_ids, space.category_ids(pred))
    # Re-read what was written: the checks Kaggle applies, before anyone uploads it.
    read_submission(output, expected_ids=test.image_ids, valid_category_ids=space.taxonomy.category_ids)
    if top is not None:
        _write_topk(paths["topk"], test.image_ids, space.category_ids(top), top_scores)
    else:
        paths.pop("topk").unlink(missing_ok=True)  # an earlier run's top-k file would disagree
    return paths


def companion_hashes(paths: dict[str, Path]) -> dict[str, dict]:
    """``{kind: {"name", "sha256"}}`` of the CSVs a sidecar vouches for (names relative to it)."""
    return {kind: {"name": path.name, "sha256": file_sha256(path)}
            for kind, path in paths.items() if kind != "json"}


def check_companions(record: dict, record_file: Path) -> None:
    """Refuse an ensemble record whose CSVs are missing or are not the ones it was written with.

    Records written before the hashes existed (no ``files``) are accepted as they are.
    """
    for kind, entry in (record.get("files") or {}).items():
        path = Path(record_file).parent / entry["name"]
        if not path.is_file():
            raise HerbensError(f"{record_file} describes {path}, which is missing: rerun herbens ensemble")
        if file_sha256(path) != entry["sha256"]:
            raise HerbensError(f"{path} and {record_file} do not belong together ({kind} content hash "
                               "differs from the one recorded): an interrupted or different herbens "
                               "ensemble run wrote one of them; rerun it")


def _write_topk(path: Path, ids: list[str], categories: np.ndarray, scores: np.ndarray) -> None:

    k = categories.shape[1]
    frame = pd.DataFrame({"Id": ids})
    for j in range(k):
        frame[f"Predicted_{j + 1}"] = categories[:, j]
    for j in range(k):
        frame[f"Score_{j + 1}"] = scores[:, j]
    with atomic_write(path, newline="") as handle:
        frame.to_csv(handle, index=False, float_format="%.6g")


def format_table(steps: list[dict], images: int, folds: int) -> str:
    """The validation table: each run, the plain average, then each step, kept or not.

    Every level shows the in-sample macro-F1 (fitted and scored on all rows) and the
    out-of-fold one (each fold scored by values fitted without it), which decides what is kept
    and so carries that selection. The last column, species F1 ``honest``, scores the whole
    procedure up to that row on outer folds that neither its fitting nor its choices saw
    (nested cross-fitting): the estimate of the test score.
    """
    title = f"validation ({images} images, {folds}-fold)"
    honest = any("honest" in step for step in steps)
    head = (f"{title:<{STEP_WIDTH}}" + "".join(f"{lv + ' F1 in / oof':>22}" for lv in SCORE_LEVELS)
            + ("  honest" if honest else "") + "  kept (keep rule)")
    lines = [head, "-" * len(head)]
    for step in steps:
        kept = {True: "yes", False: "no", None: ""}.get(step["kept"], str(step["kept"]))
        if "keep_test" in step:  # the keep rule's p-value and how many rows the step changes
            kept += f" (p {step['keep_test']['p']:.3f}, {step['keep_test']['rows_changed']} rows)"
        cells = "".join(f"{step['in_sample'][lv + '_macro_f1']:>13.4f} / {step['out_of_fold'][lv + '_macro_f1']:.4f}"
                        for lv in SCORE_LEVELS)
        if honest:
            cells += f"  {step['honest']['species_macro_f1']:.4f}" if "honest" in step else " " * 8
        lines.append(f"{step['step'][:STEP_WIDTH - 1]:<{STEP_WIDTH}}{cells}  {kept}")
    return "\n".join(lines)


def summary(paths: dict, runs: list[Run], space: ClassSpace, opts: EnsembleOptions, params: Params,
            steps: list[dict], val: dict | None, test: AlignedSplit, levels, started: float) -> dict:
    """The JSON sidecar: runs, fitted parameters (``params``: :meth:`Params.from_json`), scores."""
    fitted = params.to_json()
    return {
        "format_version": 2,
        "submission": str(paths["submission"]),
        "json": str(paths["json"]),
        "topk": str(paths["topk"]) if "topk" in paths else None,
        "files": companion_hashes(paths),
        "runs": [{"name": run.name, "path": str(run.path), "taxonomy_hash": run.taxonomy.hash,
                  "counts_source": run.taxonomy.counts_source,
                  "model": run.splits["test"].meta.get("model", ""),
                  "views": run.splits["test"].meta.get("views", []),
                  "test_images": run.splits["test"].num_rows,
                  "val_images": run.splits["val"].num_rows if "val" in run.splits else 0} for run in runs],
        "taxonomy_hash": space.taxonomy.hash,
        "align_by_category": opts.align_by_category,
        "classes": space.num_classes,
        "dropped_species": space.dropped,
        "levels": list(levels),
        "params": fitted,
        "mode": params.mode,
        "vote_k": params.vote_k if params.mode == "vote" else None,
        "space": params.space,
        "weights": fitted["weights"],
        "temperatures": fitted["temperatures"],
        "ensemble_scale": fitted["scale"],
        "tau": fitted["tau"],
        "alpha": fitted["alpha"],
        "beta": fitted["beta"],
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()},
        "val": val,
        "steps": steps,
        "test": {"images": len(test)},
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
