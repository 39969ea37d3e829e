"""The inverse-frequency ``tau`` in ``scores - tau * log(prior)``, once per cross-fitting fit.

Two estimates, both offered to the keep rule: the tau maximising macro-F1 (a grid search: what
the submission is scored on, but a step function, noisy on a small validation split) and the
tau minimising log-loss (smooth and convex in tau, so Newton's method finds it in a few passes;
the prior shift's maximum-likelihood estimate, stable where macro-F1's is not).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from herbens.core.numerics import softmax
from herbens.ensemble.combine import Params, needs_of, species_scores
from herbens.ensemble.crossfit import NestedFolds, choose, collect, fit_predictions
from herbens.ensemble.fit import simplest_first
from herbens.ensemble.stores import AlignedSplit

# tau may be negative: it then undoes a run's own over-adjustment (class-balanced, logit-adjusted).
TAU_RANGE = (-1.0, 3.0)
TAU_COARSE_STEP, TAU_FINE_STEP = 0.1, 0.02
NEWTON_STEPS, NEWTON_TOLERANCE, NEWTON_MAX_MOVE = 12, 1e-4, 1.0


def fit_tau(split: AlignedSplit, folds: NestedFolds, fits: Sequence[Params], chunk_rows: int) -> list[float]:
    """Per fit, ``tau`` in ``scores - tau * log(prior)`` maximising macro-F1 (coarse, then fine grid).

    The range includes negative values: a run trained with a class-balanced or logit-adjusted
    loss may already over-correct, and a negative tau undoes that.
    """
    bases = [p.replace(tau=0.0, alpha=0.0, beta=0.0) for p in fits]

    def grid_pass(grids):
        def moves(chunk, j):
            scores = species_scores(chunk, bases[j], split.space)
            return np.stack([(scores - np.float32(t) * split.space.log_prior).argmax(axis=1) for t in grids[j]],
                            axis=1)

        best = choose(split, folds, fit_predictions(split, folds, chunk_rows, moves, **needs_of(bases)))
        return [float(grids[j][best[j]]) for j in range(folds.num_fits)]

    coarse = simplest_first(np.arange(TAU_RANGE[0], TAU_RANGE[1] + 1e-9, TAU_COARSE_STEP))
    winners = grid_pass([coarse] * folds.num_fits)
    steps = np.arange(-TAU_COARSE_STEP, TAU_COARSE_STEP + 1e-9, TAU_FINE_STEP)
    return grid_pass([simplest_first(w + steps) for w in winners])


def fit_tau_nll(split: AlignedSplit, folds: NestedFolds, fits: Sequence[Params], chunk_rows: int) -> list[float]:
    """Per fit, the ``tau`` minimising the species log-loss on its training rows (Newton).

    Per row, d/dtau of the log-loss is ``log_prior[y] - E_p[log_prior]`` and the second
    derivative ``Var_p[log_prior] >= 0`` (p: the softmax at the current tau), so every fit's
    Newton step comes from the same pass; all fits move together, each within TAU_RANGE.
    """
    bases = [p.replace(tau=0.0, alpha=0.0, beta=0.0) for p in fits]
    masks = [folds.train_mask(j) for j in range(folds.num_fits)]
    log_prior = split.space.log_prior.astype(np.float64)
    tau = np.zeros(folds.num_fits)
    for _ in range(NEWTON_STEPS):
        def derivatives(chunk):
            out = np.zeros((len(chunk), folds.num_fits, 2))
            for j, mask in enumerate(masks):
                rows = np.flatnonzero(mask[chunk.start:chunk.stop] & (chunk.label_columns >= 0))
                part = chunk.take(rows)
                p = softmax(species_scores(part, bases[j], split.space) - np.float32(tau[j]) * split.space.log_prior)
                mean = p @ log_prior
                out[rows, j, 0] = log_prior[part.label_columns] - mean
                out[rows, j, 1] = p @ log_prior ** 2 - mean ** 2
            return out

        sums = collect(split, chunk_rows, derivatives, **needs_of(bases)).sum(axis=0)
        move = np.clip(-sums[:, 0] / np.maximum(sums[:, 1], 1e-12), -NEWTON_MAX_MOVE, NEWTON_MAX_MOVE)
        new = np.clip(tau + move, *TAU_RANGE)
        done = np.abs(new - tau).max() < NEWTON_TOLERANCE
        tau = new
        if done:
            break
    return [float(round(t, 3)) for t in tau]
