"""THE keep rule: a paired randomisation test over validation rows of the macro-F1 gain.

A step offers alternatives to the predictions in use. Its best alternative by out-of-fold
species macro-F1 is kept only when that gain is positive AND unlikely under "the step changes
nothing but noise": each row's two out-of-fold predictions (current, alternative) are swapped
at random, the same coin flips for every alternative, and the p-value is the share of
:data:`PERMUTATIONS` flips whose best gain is at least the observed one (the maximum over the
alternatives, so choosing the best of several is paid for). Kept when ``p <= KEEP_ALPHA``.

This is the approximate randomisation test used to compare systems on F1 (Noreen 1989; Yeh
2000), which needs no assumption about how macro-F1 (not a sum over rows) is distributed. It
tests the rows, not 5 fold means, so a step that changes 8 of 45 rows can be kept while the
old per-fold t-test (4 degrees of freedom) could not see it; a step that changes fewer than 5
rows can never be kept (p >= 2^-4 > 0.05) and rows a step leaves alone carry no weight.
Calibrated by simulation in tests/test_ensemble_keep.py: on three statistically identical runs
a step is kept on at most 5 % of seeds.

Only rows where an alternative differs from the current predictions move the score, and only
the classes those rows touch: every flip's macro-F1 is computed from counts on those classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sparse

KEEP_ALPHA = 0.05
PERMUTATIONS = 999
FLIP_SEED = 0  # fixed: the same validation logits always give the same decision
FLIPS_PER_BLOCK = 128  # bounds memory: a block holds FLIPS_PER_BLOCK x touched-classes counts


@dataclass(frozen=True)
class KeepTest:
    """The best alternative (first wins ties), its macro-F1 gain, the test's p-value, and the
    number of rows it changes; ``kept`` applies the rule."""

    best: int
    gain: float
    p: float
    changed: int

    @property
    def kept(self) -> bool:
        return self.gain > 0 and self.p <= KEEP_ALPHA


def keep_test(labels: np.ndarray, current: np.ndarray, alternatives: Sequence[np.ndarray],
              permutations: int = PERMUTATIONS, seed: int = FLIP_SEED) -> KeepTest:
    """The keep rule on one set of rows: true labels, current and alternative predictions
    (any integer class ids)."""
    labels, current = np.asarray(labels), np.asarray(current)
    pairs = [_Pair(labels, current, np.asarray(a)) for a in alternatives]
    gains = np.array([p.gain for p in pairs])
    best = int(np.argmax(gains))
    if gains[best] <= 0:
        return KeepTest(best, float(gains[best]), 1.0, pairs[best].changed)
    flips = np.random.default_rng(seed).random((permutations, len(labels))) < 0.5
    at_least = 0
    for start in range(0, permutations, FLIPS_PER_BLOCK):
        block = flips[start:start + FLIPS_PER_BLOCK]
        null_best = np.max([pair.flipped_gains(block) for pair in pairs], axis=0)
        at_least += int((null_best >= gains[best] - 1e-12).sum())
    return KeepTest(best, float(gains[best]), (1 + at_least) / (1 + permutations), pairs[best].changed)


class _Pair:
    """Current and one alternative: macro-F1 of the alternative minus the current, as observed
    and with each row's two predictions swapped where a flip says so."""

    def __init__(self, labels: np.ndarray, current: np.ndarray, alternative: np.ndarray):
        differ = np.flatnonzero(current != alternative)
        self.changed, self.rows, self.gain = len(differ), differ, 0.0
        if not self.changed:
            return
        touched, index = np.unique(np.concatenate([labels[differ], current[differ], alternative[differ]]),
                                   return_inverse=True)
        y, cur, alt = np.split(index, 3)
        same = np.ones(len(labels), dtype=bool)
        same[differ] = False
        # Counts on the touched classes from the rows both predict alike, and the untouched
        # classes' F1 sum and count, which no swap can change.
        at = np.searchsorted(touched, labels)
        on_touched = (at < len(touched)) & (touched[np.minimum(at, len(touched) - 1)] == labels)
        self.true_count = np.bincount(at[on_touched], minlength=len(touched)).astype(np.float64)
        fixed = same & np.isin(current, touched)
        pos = np.searchsorted(touched, current[fixed])
        self.pred_fixed = np.bincount(pos, minlength=len(touched)).astype(np.float64)
        self.tp_fixed = np.bincount(pos[current[fixed] == labels[fixed]], minlength=len(touched)).astype(np.float64)
        self.other_f1, self.other_classes = _untouched_f1(labels, current, touched)
        n, t = len(differ), len(touched)
        self.alt_pred = _one_hot(alt, t)
        self.cur_pred = _one_hot(cur, t)
        self.alt_tp = _one_hot(alt, t, alt == y)
        self.cur_tp = _one_hot(cur, t, cur == y)
        unswapped = np.zeros((1, len(labels)), dtype=bool)
        self.gain = float(self.flipped_gains(unswapped)[0])

    def flipped_gains(self, flips: np.ndarray) -> np.ndarray:
        """Per flip row: macro-F1(alternative') - macro-F1(current'), where ' swaps flipped rows."""
        if not self.changed:
            return np.zeros(len(flips))
        swap = flips[:, self.rows].astype(np.float64)
        keep = 1.0 - swap
        alt = self._macro_f1(keep @ self.alt_pred + swap @ self.cur_pred, keep @ self.alt_tp + swap @ self.cur_tp)
        cur = self._macro_f1(keep @ self.cur_pred + swap @ self.alt_pred, keep @ self.cur_tp + swap @ self.alt_tp)
        return alt - cur

    def _macro_f1(self, pred_moved, tp_moved) -> np.ndarray:
        pred = self.pred_fixed + np.asarray(pred_moved)
        tp = self.tp_fixed + np.asarray(tp_moved)
        denom = pred + self.true_count
        f1 = np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
        classes = self.other_classes + (denom > 0).sum(axis=1)
        return (self.other_f1 + f1.sum(axis=1)) / classes


def _untouched_f1(labels: np.ndarray, current: np.ndarray, touched: np.ndarray) -> tuple[float, int]:
    """Sum of per-class F1 and number of classes (true or predicted) outside ``touched``, the
    classes no swap changes (herbens.metrics.macro_f1's union of labels)."""
    classes, inverse = np.unique(np.concatenate([labels, current]), return_inverse=True)
    t, p = inverse[:len(labels)], inverse[len(labels):]
    tp = np.bincount(t[t == p], minlength=len(classes)).astype(np.float64)
    denom = np.bincount(t, minlength=len(classes)) + np.bincount(p, minlength=len(classes))
    outside = ~np.isin(classes, touched)
    return float((2 * tp[outside] / denom[outside]).sum()), int(outside.sum())


def _one_hot(columns: np.ndarray, width: int, where: np.ndarray | None = None) -> sparse.csr_matrix:
    values = np.ones(len(columns)) if where is None else where.astype(np.float64)
    return sparse.csr_matrix((values, (np.arange(len(columns)), columns)), shape=(len(columns), width))
