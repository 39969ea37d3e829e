"""Cross-fitting on validation: passes that score every fold's fit at once (folds: :mod:`herbens.core.numerics`).

Every fitted value is fitted ``K + 1`` times: fit ``j < K`` on the rows outside fold ``j``
(its out-of-fold rows are fold ``j``), fit ``K`` on all rows (what is finally applied). A row's
out-of-fold prediction comes from the fit that never saw it, so a score over those predictions
judges one fit honestly; the in-sample score of fit ``K`` is shown beside it. But the
out-of-fold score also decides which steps are kept, so over the whole procedure it carries
that selection (a winner's curse): :class:`NestedFolds` repeats the procedure inside each
outer fold's complement and scores it on the outer fold, the honest estimate.

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
from herbens.core.numerics import Folds, stratified_folds


@dataclass
class NestedFolds:
    """Nested cross-fitting: ``groups x (k + 1)`` fits of every value, all in the same passes.

    Group g < k holds the rows outside fold g of the top folds, group k (the top group) every
    row; without nesting there is only the top group. Each group deals its own rows into k
    stratified inner folds: fit (g, i < k) is fitted on group g minus inner fold i, fit (g, k)
    on the whole group. Inside a group everything is plain cross-fitting: each step is fitted
    and kept on that group's inner out-of-fold scores. Group g's final values then predict the
    rows of fold g, which neither its fitting nor its keep decisions saw: over all rows, an
    honest estimate of the whole procedure, selection included. The top group's values are
    the ones applied to the test split.
    """

    top: Folds
    inner: np.ndarray  # [groups, N]: each row's inner fold within group g, -1 outside it

    @classmethod
    def of_labels(cls, labels: np.ndarray, nested: bool = True) -> "NestedFolds":
        top = stratified_folds(labels)
        groups = []
        if nested and top.k >= 2:
            for g in range(top.k):
                inner = np.full(len(labels), -1, dtype=np.int64)
                rows = np.flatnonzero(top.fold != g)
                inner[rows] = stratified_folds(labels[rows], k=top.k).fold
                groups.append(inner)
        return cls(top, np.stack(groups + [top.fold]))

    @property
    def k(self) -> int:
        return self.top.k

    @property
    def num_groups(self) -> int:
        return len(self.inner)

    @property
    def nested(self) -> bool:
        return self.num_groups > 1

    @property
    def top_group(self) -> int:
        return self.num_groups - 1

    @property
    def num_fits(self) -> int:
        return self.num_groups * (self.k + 1)

    def fit_index(self, group: int, i: int) -> int:
        return group * (self.k + 1) + i

    @property
    def full(self) -> int:
        """Index of the top group's fit on all rows (the one applied to the test split)."""
        return self.fit_index(self.top_group, self.k)

    def group_of(self, j: int) -> int:
        return j // (self.k + 1)

    def in_group(self, group: int) -> np.ndarray:
        return self.inner[group] >= 0

    def train_mask(self, j: int) -> np.ndarray:
        group, i = divmod(j, self.k + 1)
        mask = self.in_group(group)
        return mask & (self.inner[group] != i) if i < self.k else mask

    def fits_of_rows(self) -> np.ndarray:
        """``[N, groups + 1]``: per group, the fit predicting each row out of fold (-1: outside
        the group); last column, the fit whose honest prediction each row gets."""
        oof = np.where(self.inner >= 0, np.arange(self.num_groups)[:, None] * (self.k + 1) + self.inner, -1)
        honest = self.top.fold * (self.k + 1) + self.k if self.nested else oof[-1]
        return np.concatenate([oof.T, honest[:, None]], axis=1)


def collect(split: AlignedSplit, chunk_rows: int, fn: Callable, **needs) -> np.ndarray:
    """Concatenate ``fn(chunk)`` (row-wise outputs) over all chunks of ``split``."""
    parts = [fn(chunk) for chunk in split.chunks(chunk_rows, **needs)]
    return np.concatenate(parts, axis=0)


def fit_predictions(split: AlignedSplit, folds: NestedFolds, chunk_rows: int, fn: Callable, **needs) -> np.ndarray:
    """``[N, fits, G]`` predicted columns: ``fn(chunk, j)`` gives fit j's G candidates ``[n, G]``.

    Only fit j's training rows are predicted (a nested fit never uses about a third of the
    rows); the others hold -1, and :func:`choose` reads training rows only.
    """
    masks = [folds.train_mask(j) for j in range(folds.num_fits)]

    def per_chunk(chunk):
        out = None
        for j, mask in enumerate(masks):
            rows = np.flatnonzero(mask[chunk.start:chunk.stop])
            pred = fn(chunk if len(rows) == len(chunk) else chunk.take(rows), j)
            if out is None:
                out = np.full((len(chunk), len(masks), pred.shape[1]), -1, dtype=np.int64)
            out[rows, j] = pred
        return out

    return collect(split, chunk_rows, per_chunk, **needs)


def species_f1(split: AlignedSplit, columns: np.ndarray, rows: np.ndarray | None = None) -> float:
    """Species macro-F1 of predicted ensemble columns (on ``rows``, a mask, when given)."""
    labels = split.labels if rows is None else split.labels[rows]
    columns = columns if rows is None else columns[rows]
    return macro_f1(labels, split.space.species[columns])


def choose(split: AlignedSplit, folds: NestedFolds, preds: np.ndarray) -> np.ndarray:
    """Per fit, the candidate with the best species macro-F1 on its own training rows.

    Candidates come simplest first: the first wins ties.
    """
    out = np.empty(folds.num_fits, dtype=np.int64)
    for j in range(folds.num_fits):
        mask = folds.train_mask(j)
        out[j] = int(np.argmax([species_f1(split, preds[:, j, g], mask) for g in range(preds.shape[2])]))
    return out


def evaluate_fits(split: AlignedSplit, folds: NestedFolds, candidates: Sequence[Sequence[Params]],
                  chunk_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """In-sample, out-of-fold and honest predictions of G candidates, each one Params per fit.

    Returns ``ins [N, G]`` (the full fit on every row), ``oof [N, groups, G]`` (each row of
    group g under group g's fit that left the row's inner fold out; -1 outside the group) and
    ``honest [N, G]`` (each row under the full fit of the group that never saw it; the
    out-of-fold predictions of the top group without nesting). A candidate whose fits all
    hold the same Params object is predicted once per row.
    """
    needs = needs_of([p for fits in candidates for p in fits])
    fitted = [g for g, fits in enumerate(candidates) if any(p is not fits[0] for p in fits)]
    users = folds.fits_of_rows()  # [N, groups + 1]: fit predicting each row's oof / honest column

    def predictions(chunk):
        ins = np.stack([predict_chunk(chunk, fits[folds.full], split.space)[0] for fits in candidates], axis=1)
        out = np.repeat(ins[:, None, :], folds.num_groups + 1, axis=1)
        mine = users[chunk.start:chunk.stop]
        for j in (np.unique(mine[mine >= 0]) if fitted else ()):
            rows = np.flatnonzero((mine == j).any(axis=1))
            part = chunk.take(rows)
            pred = np.stack([predict_chunk(part, candidates[g][j], split.space)[0] for g in fitted], axis=1)
            at_j = mine[rows] == j
            for c, g in enumerate(fitted):
                column = out[rows, :, g]
                column[at_j] = np.broadcast_to(pred[:, c:c + 1], at_j.shape)[at_j]
                out[rows, :, g] = column
        out[:, :-1][mine[:, :-1] < 0] = -1
        return np.concatenate([ins[:, None, :], out], axis=1)

    out = collect(split, chunk_rows, predictions, **needs)
    return out[:, 0], out[:, 1:-1], out[:, -1]


def scores_of(split: AlignedSplit, columns: np.ndarray) -> dict:
    """Per-level macro-F1 and accuracy of predicted ensemble species columns."""
    return level_scores(split.labels, split.space.species[columns], split.space.taxonomy)

