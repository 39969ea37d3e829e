"""What the ensembler must say about its inputs beyond the store checks: unreadable-image
fallback rows (warned, kept out of fitting, listed in the JSON sidecar) and test stores that
cannot prove they are complete.

The checks shared by every reader (shapes, ids, hashes, finiteness, the recorded id count)
live in the stores kernel (:mod:`herbens.stores.kernel`); this module only decides what the ensemble does with the
records those checks expose.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

import numpy as np

from herbens.stores.logits import LogitsRecordWarning

if TYPE_CHECKING:
    from herbens.ensemble.stores import AlignedSplit, Run


def unreadable_record(runs: Sequence["Run"]) -> dict[str, dict[str, list[str]]]:
    """Warn once per run and split holding fallback rows; returns ``{run: {split: ids}}``.

    The record goes into the submission's JSON sidecar, so that whoever reads the CSV later can
    tell which predictions come from a fallback rather than from the image.
    """
    record: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        for name, split in run.splits.items():
            if split.unreadable:
                split.warn_unreadable()
                record.setdefault(run.name, {})[name] = list(split.unreadable)
    return record


def forget_unreadable_labels(split: "AlignedSplit") -> None:
    """Mark rows unlabelled where any run's image was unreadable: fitting must not learn from
    fallback scores (or from scores of another image, in stores written before the record)."""
    if split.labels is None:
        return
    bad = set()
    for run in split.runs:
        bad.update(run.splits[split.name].unreadable)
    if not bad:
        return
    rows = np.fromiter((i in bad for i in split.image_ids), dtype=bool, count=len(split))
    split.labels = np.where(rows, -1, split.labels)
    split.label_columns = np.where(rows, -1, split.label_columns)


def warn_unverifiable_test(runs: Sequence["Run"]) -> None:
    """Warn for test stores written before the id record existed: their completeness against
    the test metadata cannot be checked (rerun ``herbens infer`` to record it)."""
    old = [str(run.path) for run in runs if "ids" not in run.splits["test"].meta]
    if old:
        warnings.warn(f"{len(old)} run(s) have test logits without a record of the test ids they were "
                      f"written for, so a lost row cannot be detected: {', '.join(old)} "
                      "(rerun `herbens infer RUN --split test`)", LogitsRecordWarning, stacklevel=2)
