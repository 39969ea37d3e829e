"""Scores: Kaggle's macro-F1 (sklearn's definition) and per-level summaries."""

from __future__ import annotations

import numpy as np

from herbens.data.taxonomy import LEVELS, Taxonomy


def macro_f1(y_true, y_pred) -> float:
    """Macro-averaged F1 over the union of true and predicted labels.

    Identical to ``sklearn.metrics.f1_score(y_true, y_pred, average="macro")``: a label that is
    predicted but never true scores 0 and still counts, so invalid predictions cost score.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred {y_pred.shape}")
    if y_true.size == 0:
        return 0.0
    labels, inverse = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    t, p = inverse[: len(y_true)], inverse[len(y_true):]
    n = len(labels)
    tp = np.bincount(t[t == p], minlength=n).astype(np.float64)
    true_count = np.bincount(t, minlength=n)
    pred_count = np.bincount(p, minlength=n)
    denom = true_count + pred_count
    f1 = np.divide(2 * tp, denom, out=np.zeros(n), where=denom > 0)
    return float(f1.mean())


def level_scores(true_species, pred_species, taxonomy: Taxonomy) -> dict[str, float]:
    """Macro-F1 and accuracy at each level; genus/family are derived from species indices."""
    true_species = np.asarray(true_species, dtype=np.int64)
    pred_species = np.asarray(pred_species, dtype=np.int64)
    out = {}
    for level in LEVELS:
        t = taxonomy.level_indices(level, true_species)
        p = taxonomy.level_indices(level, pred_species)
        out[f"{level}_macro_f1"] = macro_f1(t, p)
        out[f"{level}_accuracy"] = float((t == p).mean()) if len(t) else 0.0
    return out
