"""Numerical helpers shared by every fitting step: log-softmax, the class log-prior, stratified
folds and a cross-fit helper. numpy/scipy only (the bottom layer).

Cross-fitting: a value fitted on labelled rows (a temperature, kNN ``k``, thresholds, ensemble
weights) is fitted ``K + 1`` times: fit ``i < K`` on the rows outside fold ``i``, fit ``K`` on
every row (the one that is applied). A row's out-of-fold outcome comes from the fit that never
saw it, so a summary over those outcomes judges the fitting procedure honestly; the in-sample
summary of the full fit is reported beside it, labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np

MAX_FOLDS = 5
FOLD_SEED = 0

T = TypeVar("T")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of a 2-D array (a new array, same dtype)."""
    shifted = x - x.max(axis=1, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return shifted


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a 2-D array (a new array, same dtype)."""
    e = x - x.max(axis=1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=1, keepdims=True)
    return e


def logsumexp(x: np.ndarray, keepdims: bool = False) -> np.ndarray:
    """Row-wise ``log(sum(exp(x)))`` of a 2-D array, shifted by the row maximum (no overflow)."""
    m = x.max(axis=1, keepdims=True)
    out = m + np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    return out if keepdims else out[:, 0]


def log_prior(counts) -> np.ndarray:
    """Log training frequency of each class, float32; counts clamped to 1 so that a class without
    training images gets a finite (the smallest) log-prior instead of ``-inf``."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64).reshape(-1), 1.0)
    return np.log(counts / counts.sum()).astype(np.float32)


@dataclass
class Folds:
    """Fold index of each row; fits ``0..k-1`` leave one fold out, fit ``k`` uses all rows."""

    fold: np.ndarray
    k: int

    @property
    def num_fits(self) -> int:
        return self.k + 1

    @property
    def full(self) -> int:
        """Index of the fit on all rows (the one applied)."""
        return self.k

    def train_mask(self, j: int) -> np.ndarray:
        return self.fold != j if j < self.k else np.ones(len(self.fold), dtype=bool)


def stratified_folds(labels: np.ndarray, k: int | None = None, seed: int = FOLD_SEED) -> Folds:
    """Folds balanced per class: rows sorted by (label, seeded random key) are dealt round-robin.

    A class with fewer rows than folds lands in that many distinct folds; the deal continues
    across classes, so fold sizes differ by at most one. ``k`` defaults to ``min(5, rows)``.
    """
    n = len(labels)
    k = min(MAX_FOLDS, n) if k is None else k
    k = max(k, 1)
    key = np.random.default_rng(seed).permutation(n)
    order = np.lexsort((key, np.asarray(labels)))
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % k
    return Folds(fold, k)


@dataclass
class CrossFitted(Generic[T]):
    """A value fitted on all rows and on each fold's complement, with per-row outcomes.

    Attributes:
        value: the fit on every row (what is applied).
        fold_values: fold ``i``'s fit (on the rows outside fold ``i``; None for an empty fold).
        in_sample: per-row outcomes of ``value`` on every row (an array, or a dict of arrays).
        out_of_fold: per-row outcomes, each row under the fit of its own fold; None when there
            are fewer than two folds (no row can be held out).
    """

    value: T
    fold_values: list
    in_sample: object
    out_of_fold: object | None


def cross_fit(folds: Folds, fit: Callable[[np.ndarray], T],
              evaluate: Callable[[T, np.ndarray], object]) -> CrossFitted[T]:
    """Fit on every row and on each fold's complement; evaluate each fit on the rows it did not see.

    Args:
        folds: the fold of each row.
        fit: row indices -> fitted value (it must look at those rows only).
        evaluate: (value, row indices) -> per-row outcomes of those rows, in that order: an array
            whose first axis is the rows, or a dict of such arrays.
    """
    everything = np.arange(len(folds.fold))
    value = fit(everything)
    in_sample = evaluate(value, everything)
    if folds.k < 2:
        return CrossFitted(value, [], in_sample, None)
    fold_values, parts = [], []
    for i in range(folds.k):
        held, rest = np.flatnonzero(folds.fold == i), np.flatnonzero(folds.fold != i)
        if not len(held):
            fold_values.append(None)
            continue
        if not len(rest):  # every row in one fold: nothing to fit on without it
            return CrossFitted(value, [], in_sample, None)
        fitted = fit(rest)
        fold_values.append(fitted)
        parts.append((held, evaluate(fitted, held)))
    return CrossFitted(value, fold_values, in_sample, _in_row_order(parts, len(everything)))


def _in_row_order(parts: Sequence[tuple[np.ndarray, object]], n: int):
    """Per-row outcomes of disjoint row sets placed back at their rows (arrays or dicts of arrays)."""
    first = parts[0][1]
    if isinstance(first, dict):
        return {key: _in_row_order([(rows, out[key]) for rows, out in parts], n) for key in first}
    first = np.asarray(first)
    out = np.empty((n,) + first.shape[1:], dtype=first.dtype)
    for rows, values in parts:
        out[rows] = values
    return out


def cross_fit_grid(row_losses: np.ndarray, folds: Folds) -> CrossFitted[int]:
    """Cross-fit the choice of one candidate of a grid by the lowest summed loss.

    Args:
        row_losses: ``[N, G]`` loss of each row under each candidate (first wins ties).
    Returns:
        The chosen candidate indices; in-sample and out-of-fold per-row losses ``[N]``.
    """
    row_losses = np.asarray(row_losses, dtype=np.float64)
    return cross_fit(folds, lambda rows: int(np.argmin(row_losses[rows].sum(axis=0))),
                     lambda g, rows: row_losses[rows, g])


def mean_or_none(values) -> float | None:
    """The mean of per-row values as a float (None when absent, e.g. no out-of-fold rows)."""
    return None if values is None or not len(values) else float(np.mean(values))
