"""Fitting the ensemble's values on validation, once per cross-fitting fit.

Each function takes the current parameters of every fit (``fits[j]``, see
:mod:`herbens.ensemble.crossfit`) and returns every fit's new values, each chosen on that
fit's own training rows only. All fits are scored in the same pass over the data: grid searches
read each chunk once and score every fit's candidates on it.

Candidates are ordered simplest first (tau 0, alpha = beta = 0, unchanged weights), so that on
a tie the simpler value wins.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import minimize

from herbens.ensemble.combine import Params, hierarchy_terms, needs_of, species_scores
from herbens.ensemble.crossfit import NestedFolds, choose, collect, fit_predictions
from herbens.ensemble.stores import AlignedSplit
from herbens.core.numerics import softmax

# Temperatures: a log-spaced lattice over TEMPERATURE_BOUNDS; the coarse pass uses every
# FINE_PER_COARSE-th point, the fine pass the points around each fit's coarse winner.
TEMPERATURE_BOUNDS = (0.02, 50.0)
TEMPERATURE_LATTICE = np.exp(np.linspace(*np.log(TEMPERATURE_BOUNDS), 25 * 6 - 5))
FINE_PER_COARSE = 6
WEIGHT_STEPS = (0.0, -0.25, 0.25, -0.5, 0.5, -1.0, 1.0, -2.0, 2.0)  # log-weight moves; 0 first wins ties
LOG_WEIGHT_BOUND = 8.0
HIERARCHY_COARSE = (0.0, 0.5, 1.0, 1.5, 2.0)


def _label_rows(chunk, level_of: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label is an ensemble class, and that class's column at a level (NLL needs both)."""
    ok = np.flatnonzero(chunk.label_columns >= 0)
    y = chunk.label_columns[ok]
    return ok, (y if level_of is None else level_of[y])


def _masked_means(rows: np.ndarray, folds: NestedFolds) -> np.ndarray:
    """``[fits, ...]`` mean of per-row values over each fit's training rows."""
    return np.stack([rows[folds.train_mask(j)].mean(axis=0) for j in range(folds.num_fits)])


# ----------------------------------------------------------------------------------------
# Temperature per run and per level
# ----------------------------------------------------------------------------------------
def fit_temperatures(split: AlignedSplit, folds: NestedFolds, levels: Sequence[str],
                     chunk_rows: int) -> list[dict[str, np.ndarray]]:
    """Per fit, per level, per run: the temperature minimising that level's own NLL.

    Each run's logits of a level are calibrated against that level's labels (genus and family
    heads are often plain cross-entropy beside a scaled ArcFace species head). Two passes
    over a log-spaced lattice: coarse, then the lattice points around each fit's winner, with
    a parabola through the best point and its neighbours for the last digit.

    Returns:
        ``[fits]`` of ``{level: [runs] temperatures}``, shrunk by :func:`shrink_temperatures`.
    """
    num_runs = len(split.runs)
    lattice = np.log(TEMPERATURE_LATTICE)
    coarse = np.arange(0, len(lattice), FINE_PER_COARSE)
    best = _temperature_pass(split, folds, levels, chunk_rows,
                             {(lv, r): coarse for lv in levels for r in range(num_runs)})
    span = np.arange(-FINE_PER_COARSE, FINE_PER_COARSE + 1)
    fine = {key: np.unique(np.clip(idx[:, None] + span, 0, len(lattice) - 1))
            for key, idx in best.items()}
    nll = _temperature_nll(split, folds, levels, chunk_rows, fine)
    out = [{lv: np.ones(num_runs) for lv in levels} for _ in range(folds.num_fits)]
    for key, values in nll.items():
        for j in range(folds.num_fits):
            out[j][key[0]][key[1]] = float(np.exp(_parabola_min(lattice[fine[key]], values[j])))
    return shrink_temperatures(out, folds)


def shrink_temperatures(temps: list[dict[str, np.ndarray]], folds: NestedFolds) -> list[dict[str, np.ndarray]]:
    """Each fit's temperatures with the runs' differences of scale kept only where they are real.

    In log space each run's temperature is its fit's geometric mean (kept: the overall scale)
    plus a deviation d; d is shrunk towards 0 by ``max(0, 1 - var / d^2)`` (positive-part
    James-Stein), ``var`` the jackknife variance of that run's log temperature over its group's
    leave-one-fold-out fits. An ArcFace scale (d ~ 3) survives whole; the noise that makes
    identical runs' temperatures differ on a small validation set (which unequal weights
    would then turn into a test loss) is removed.
    """
    k, out = folds.k, [dict(t) for t in temps]
    for group in range(folds.num_groups):
        fits = range(folds.fit_index(group, 0), folds.fit_index(group, k) + 1)
        for level in temps[0]:
            logs = np.log(np.stack([temps[j][level] for j in fits]))  # [k + 1, runs]
            inner = logs[:k]
            var = (k - 1) / k * ((inner - inner.mean(axis=0)) ** 2).sum(axis=0) if k > 1 else 0.0
            centre = logs.mean(axis=1, keepdims=True)
            d = logs - centre
            factor = np.clip(1 - var / np.maximum(d ** 2, 1e-300), 0.0, 1.0)
            for row, j in enumerate(fits):
                out[j][level] = np.exp(centre[row] + factor[row] * d[row])
    return out


def _temperature_pass(split, folds, levels, chunk_rows, grid: dict) -> dict:
    nll = _temperature_nll(split, folds, levels, chunk_rows, grid)
    return {key: grid[key][np.argmin(values, axis=1)] for key, values in nll.items()}


def _temperature_nll(split, folds, levels, chunk_rows, grid: dict) -> dict:
    """Mean NLL ``[fits, G]`` of each (level, run) at each lattice index of ``grid``."""
    keys = list(grid)
    inverse = {key: (1.0 / TEMPERATURE_LATTICE[grid[key]]).astype(np.float32) for key in keys}
    level_of = {"species": None, "genus": split.space.genus_of, "family": split.space.family_of}

    def rows(chunk):
        out = []
        for lv, r in keys:
            ok, y = _label_rows(chunk, level_of[lv])
            z = chunk.get(r, lv)[ok]
            zy = z[np.arange(len(ok)), y]
            m = z.max(axis=1)
            cols = []
            for inv in inverse[(lv, r)]:
                lse = np.log(np.exp((z - m[:, None]) * inv).sum(axis=1, dtype=np.float64)) + m * inv
                cols.append(lse - zy * inv)
            out.append(np.stack(cols, axis=1))
        return np.concatenate(out, axis=1)

    values = collect(split, chunk_rows, rows, runs=list(range(len(split.runs))), levels=list(levels))
    means = _masked_means(values, folds)
    bounds = np.cumsum([0] + [len(grid[key]) for key in keys])
    return {key: means[:, bounds[i]:bounds[i + 1]] for i, key in enumerate(keys)}


def _parabola_min(x: np.ndarray, y: np.ndarray) -> float:
    """Vertex of the parabola through the best point and its neighbours (or the best point)."""
    i = int(np.argmin(y))
    if i == 0 or i == len(y) - 1:
        return float(x[i])
    (x0, x1, x2), (y0, y1, y2) = x[i - 1:i + 2], y[i - 1:i + 2]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 ** 2 * (y0 - y1) + x1 ** 2 * (y2 - y0) + x0 ** 2 * (y1 - y2)) / denom
    return float(np.clip(-b / (2 * a), x0, x2)) if a > 0 else float(x[i])


# ----------------------------------------------------------------------------------------
# Run weights
# ----------------------------------------------------------------------------------------
def fit_weights_f1(split: AlignedSplit, folds: NestedFolds, fits: Sequence[Params], chunk_rows: int,
                   rounds: int = 4) -> list[np.ndarray]:
    """Per fit, softmax-parametrised weights maximising macro-F1 on its rows (coordinate search).

    One log-weight at a time moves over ``WEIGHT_STEPS``; every fit moves the same coordinate
    in the same pass (each from its own weights), so a round costs one pass per run.
    """
    num_runs = len(fits[0].weights)
    # A single run chosen instead of the mean has zero weights: start those at the bound.
    weights = np.stack([np.asarray(p.weights, dtype=np.float64) for p in fits])
    theta = np.log(np.maximum(weights, np.exp(-LOG_WEIGHT_BOUND)))
    theta -= theta.max(axis=1, keepdims=True)
    for _ in range(rounds):
        moved = False
        for r in range(num_runs):
            candidates = np.clip(theta[:, r:r + 1] + np.asarray(WEIGHT_STEPS), -LOG_WEIGHT_BOUND, LOG_WEIGHT_BOUND)
            preds = fit_predictions(split, folds, chunk_rows,
                                    lambda c, j: _weight_moves(c, fits[j], theta[j], r, candidates[j]),
                                    runs=list(range(num_runs)))
            best = choose(split, folds, preds)
            new = candidates[np.arange(folds.num_fits), best]
            moved |= bool((new != theta[:, r]).any())
            theta[:, r] = new
        if not moved:
            break
    return [_softmax_1d(t) for t in theta]


def _weight_moves(chunk, params: Params, theta: np.ndarray, r: int, candidates: np.ndarray) -> np.ndarray:
    """Argmax per row for each candidate log-weight of run ``r`` (argmax ignores the total scale)."""
    def member(q):
        z = chunk.get(q, "species") / np.float32(params.temperature("species", q))
        return z if params.space == "logit" else softmax(z)

    rest = None
    for q in range(len(theta)):
        if q != r:
            term = member(q) * np.float32(np.exp(theta[q]))
            rest = term if rest is None else np.add(rest, term, out=rest)
    mine = member(r)
    return np.stack([(rest + np.float32(np.exp(c)) * mine).argmax(axis=1) for c in candidates], axis=1)


def fit_weights_nll(split: AlignedSplit, folds: NestedFolds, fits: Sequence[Params],
                    chunk_rows: int) -> list[tuple[np.ndarray, float]]:
    """Per fit, softmax-parametrised weights (and, in logit space, an ensemble scale) minimising NLL.

    Logit space: ``scale * sum_r w_r z_r / T_r`` by L-BFGS-B with exact gradients. The fits'
    objectives are separable, so one optimisation over all of them (their sum) fits each at the
    cost of one pass per evaluation. Prob space: the mixture only needs each run's probability
    of the true class, gathered in one pass; the fits then run in memory.
    """
    if fits[0].space == "prob":
        return [(w, 1.0) for w in _fit_mixture_weights(split, folds, fits, chunk_rows)]
    num_runs, num_fits = len(fits[0].weights), folds.num_fits
    size = num_runs + 1

    def objective(flat):
        x = flat.reshape(num_fits, size)
        rows = collect(split, chunk_rows, lambda c: np.stack([_nll_rows(c, fits[j], x[j]) for j in range(num_fits)],
                                                              axis=1), runs=list(range(num_runs)))
        value, grad = 0.0, np.empty_like(x)
        for j in range(num_fits):
            mean = rows[folds.train_mask(j), j].mean(axis=0)
            w = _softmax_1d(x[j, :num_runs])
            grad_w = mean[1:1 + num_runs]
            grad[j] = np.concatenate([w * (grad_w - w @ grad_w), mean[-1:]])
            value += float(mean[0])
        return value, grad.ravel()

    bounds = ([(-LOG_WEIGHT_BOUND, LOG_WEIGHT_BOUND)] * num_runs + [(-5.0, 5.0)]) * num_fits
    result = minimize(objective, np.zeros(size * num_fits), jac=True, method="L-BFGS-B", bounds=bounds,
                      options={"maxiter": 200})
    x = result.x.reshape(num_fits, size)
    return [(_softmax_1d(x[j, :num_runs]), float(np.exp(x[j, -1]))) for j in range(num_fits)]


def _nll_rows(chunk, params: Params, x: np.ndarray) -> np.ndarray:
    """Per row: NLL, its gradient wrt each weight, and wrt the log scale."""
    num_runs = len(params.weights)
    w, scale = _softmax_1d(x[:num_runs]), float(np.exp(x[-1]))
    ok, y = _label_rows(chunk)
    idx = np.arange(len(ok))
    zs = [chunk.get(r, "species")[ok].astype(np.float64) / params.temperature("species", r) for r in range(num_runs)]
    s = scale * sum(w[r] * zs[r] for r in range(num_runs))
    m = s.max(axis=1, keepdims=True)
    e = np.exp(s - m)
    total = e.sum(axis=1, keepdims=True)
    p = e / total
    out = np.empty((len(ok), num_runs + 2))
    out[:, 0] = m[:, 0] + np.log(total[:, 0]) - s[idx, y]
    for r in range(num_runs):
        out[:, 1 + r] = scale * ((p * zs[r]).sum(axis=1) - zs[r][idx, y])
    out[:, -1] = (p * s).sum(axis=1) - s[idx, y]
    return out


def _fit_mixture_weights(split: AlignedSplit, folds: NestedFolds, fits: Sequence[Params], chunk_rows: int) -> list:
    num_runs = len(fits[0].weights)

    def true_class_probs(chunk):
        ok, y = _label_rows(chunk)
        per_fit = []
        for params in fits:
            cols = [softmax(chunk.get(r, "species")[ok].astype(np.float64) / params.temperature("species", r))
                    [np.arange(len(ok)), y] for r in range(num_runs)]
            per_fit.append(np.stack(cols, axis=1))
        return np.stack(per_fit, axis=1)

    probs = collect(split, chunk_rows, true_class_probs, runs=list(range(num_runs)))
    out = []
    for j in range(folds.num_fits):
        mine = probs[folds.train_mask(j), j]

        def objective(theta):
            w = _softmax_1d(theta)
            mix = mine @ w + 1e-300
            grad_w = -(mine / mix[:, None]).mean(axis=0)
            return float(-np.log(mix).mean()), w * (grad_w - w @ grad_w)

        bounds = [(-LOG_WEIGHT_BOUND, LOG_WEIGHT_BOUND)] * num_runs
        out.append(_softmax_1d(minimize(objective, np.zeros(num_runs), jac=True, method="L-BFGS-B",
                                        bounds=bounds).x))
    return out


def _softmax_1d(theta: np.ndarray) -> np.ndarray:
    e = np.exp(np.asarray(theta, dtype=np.float64) - np.max(theta))
    return e / e.sum()


# ----------------------------------------------------------------------------------------
# Post-processing: the hierarchy (tau: herbens.ensemble.tau)
# ----------------------------------------------------------------------------------------
def simplest_first(values) -> np.ndarray:
    values = np.unique(np.round(np.asarray(values, dtype=np.float64), 4))
    return values[np.lexsort((values, np.abs(values)))]


def fit_hierarchy(split: AlignedSplit, folds: NestedFolds, fits: Sequence[Params], chunk_rows: int,
                  genus: bool, family: bool) -> list[tuple[float, float]]:
    """Per fit, ``alpha``, ``beta`` weighting log p(genus), log p(family) of each species (grid).

    Each fit's genus/family combination uses its own per-level temperatures.
    """
    bases = [p.replace(alpha=0.0, beta=0.0) for p in fits]
    needs = needs_of([b.replace(alpha=1.0 if genus else 0.0, beta=1.0 if family else 0.0) for b in bases])

    def grid_pass(grids):
        def moves(chunk, j):
            scores = species_scores(chunk, bases[j], split.space)
            g, f = hierarchy_terms(chunk, bases[j], split.space, genus, family)
            with_genus, total = np.empty_like(scores), np.empty_like(scores)  # reused: no temporaries
            out, last_a = np.empty((len(scores), len(grids[j])), dtype=np.int64), None
            for k in sorted(range(len(grids[j])), key=lambda k: grids[j][k]):  # by alpha: one genus term each
                a, b = grids[j][k]
                if a != last_a:
                    if genus:
                        np.multiply(g, np.float32(a), out=with_genus)
                        with_genus += scores
                    else:
                        with_genus[...] = scores
                    last_a = a
                if family:
                    np.multiply(f, np.float32(b), out=total)
                    total += with_genus
                else:
                    total[...] = with_genus
                out[:, k] = total.argmax(axis=1)
            return out

        best = choose(split, folds, fit_predictions(split, folds, chunk_rows, moves, **needs))
        return [grids[j][best[j]] for j in range(folds.num_fits)]

    def axis(center=None):
        if center is None:
            return HIERARCHY_COARSE
        return [max(0.0, center + d) for d in (-0.25, -0.125, 0.0, 0.125, 0.25)]

    def grid(alphas, betas):
        pairs = {(a, b) for a in (alphas if genus else (0.0,)) for b in (betas if family else (0.0,))}
        return sorted(pairs, key=lambda ab: (ab[0] + ab[1], ab))  # smallest adjustment wins ties

    winners = grid_pass([grid(axis(), axis())] * folds.num_fits)
    fine = [grid(axis(a), axis(b)) for a, b in winners]
    size = max(len(g) for g in fine)
    fine = [g + [g[-1]] * (size - len(g)) for g in fine]  # equal lengths for one stacked pass
    return [(float(a), float(b)) for a, b in grid_pass(fine)]
