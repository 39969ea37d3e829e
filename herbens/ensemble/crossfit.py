"""Cross-fitting on validation: passes that score every fold's fit at once (folds: :mod:`herbens.numerics`).

Every fitted value is fitted ``K + 1`` times: fit ``j < K`` on the rows outside fold ``j``
(its out-of-fold rows are fold ``j``), fit ``K`` on all rows (what is finally applied). A row's
out-of-fold prediction comes from the fit that never saw it, so a score over those predictions
judges the fitting procedure honestly; the in-sample score of fit ``K`` is shown beside it.

Folds are row masks over the labelled validation rows, applied per streamed chunk: nothing
here loads a whole matrix. One pass over the data scores the candidates of all ``K + 1`` fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from herbens.ensemble.combine import Params, needs_of, predict_chunk
from herbens.ensemble.stores import AlignedSplit
from herbens.metrics import level_scores, macro_f1
from herbens.numerics import Folds, stratified_folds  # noqa: F401  (the ensembler's fold names)

def collect(split: AlignedSplit, chunk_rows: int, fn: Callable, **needs) -> np.ndarray:
    """Concatenate ``fn(chunk)`` (row-wise outputs) over all chunks of ``split``."""
    parts = [fn(chunk) for chunk in split.chunks(chunk_rows, **needs)]
    return np.concatenate(parts, axis=0)


def fit_predictions(split: AlignedSplit, folds: Folds, chunk_rows: int, fn: Callable, **needs) -> np.ndarray:
    """``[N, fits, G]`` predicted columns: ``fn(chunk, j)`` gives fit j's G candidates ``[n, G]``."""
    return collect(split, chunk_rows, lambda c: np.stack([fn(c, j) for j in range(folds.num_fits)], axis=1),
                   **needs)


def species_f1(split: AlignedSplit, columns: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Species macro-F1 of predicted ensemble columns (on ``rows``, a mask, when given)."""
    labels = split.labels if rows is None else split.labels[rows]
    columns = columns if rows is None else columns[rows]
    return macro_f1(labels, split.space.species[columns])


def choose(split: AlignedSplit, folds: Folds, preds: np.ndarray) -> np.ndarray:
    """Per fit, the candidate with the best species macro-F1 on its own training rows.

    Candidates come simplest first: the first wins ties.
    """
    out = np.empty(folds.num_fits, dtype=np.int64)
    for j in range(folds.num_fits):
        mask = folds.train_mask(j)
        out[j] = int(np.argmax([species_f1(split, preds[:, j, g], mask) for g in range(preds.shape[2])]))
    return out


def evaluate_fits(split: AlignedSplit, folds: Folds, candidates: Sequence[Sequence[Params]],
                  chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """In-sample and out-of-fold predictions ``[N, G]`` of G candidates, each one Params per fit.

    In-sample: the full fit on every row. Out-of-fold: each row under the fit of its own fold
    (the same predictions, computed once, when every fit holds the same Params object).
    """
    needs = needs_of([p for fits in candidates for p in fits])
    fitted = [g for g, fits in enumerate(candidates) if any(p is not fits[0] for p in fits)]

    def both(chunk):
        fold = folds.fold[chunk.start:chunk.stop]
        ins = np.stack([predict_chunk(chunk, fits[folds.full], split.space)[0] for fits in candidates], axis=1)
        oof = ins.copy()
        for i in range(folds.k) if fitted else ():
            rows = np.flatnonzero(fold == i)
            if len(rows):
                part = chunk.take(rows)
                oof[rows[:, None], fitted] = np.stack(
                    [predict_chunk(part, candidates[g][i], split.space)[0] for g in fitted], axis=1)
        return np.stack([ins, oof], axis=1)

    out = collect(split, chunk_rows, both, **needs)
    return out[:, 0], out[:, 1]


def scores_of(split: AlignedSplit, columns: np.ndarray) -> dict:
    """Per-level macro-F1 and accuracy of predicted ensemble species columns."""
    return level_scores(split.labels, split.space.species[columns], split.space.taxonomy)

