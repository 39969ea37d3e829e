"""Fitting the ensemble on validation: temperatures, weights, tau, hierarchy.

Every objective is streamed over the labelled validation rows in chunks, exactly like
prediction, and reduced from per-row values gathered over the whole split, so that fitted
values do not depend on the chunk size. Grid searches evaluate all their candidates in one pass
over the data (read once, scored many times).

The order follows the arithmetic: calibrate each run (temperature by NLL), weight the runs,
average, then adjust the average (inverse frequency, hierarchy). Each step is kept only if it
raises validation species macro-F1, so the result is never worse than the plain average there.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from herbens.ensemble.combine import (AlignedSplit, ClassSpace, EnsembleOptions, Params,
                                      hierarchy_terms, needs_of, predict_chunk, softmax, species_scores)
from herbens.errors import HerbensError
from herbens.metrics import level_scores, macro_f1

TEMPERATURE_BOUNDS = (0.02, 50.0)
WEIGHT_STEPS = (0.0, -0.25, 0.25, -0.5, 0.5, -1.0, 1.0, -2.0, 2.0)  # log-weight moves; 0 first wins ties
LOG_WEIGHT_BOUND = 8.0
TAU_COARSE = tuple(np.round(np.arange(0.0, 2.0001, 0.1), 4))
HIERARCHY_COARSE = (0.0, 0.5, 1.0, 1.5, 2.0)


# ----------------------------------------------------------------------------------------
# Streaming helpers
# ----------------------------------------------------------------------------------------
def collect(split: AlignedSplit, chunk_rows: int, fn: Callable, **needs) -> np.ndarray:
    """Concatenate ``fn(chunk)`` (row-wise outputs) over all chunks of ``split``."""
    parts = [fn(chunk) for chunk in split.chunks(chunk_rows, **needs)]
    return np.concatenate(parts, axis=0)


def species_f1(split: AlignedSplit, columns: np.ndarray) -> float:
    """Validation species macro-F1 of predicted ensemble columns."""
    return macro_f1(split.labels, split.space.species[columns])


def best_candidate(split: AlignedSplit, predictions: np.ndarray) -> tuple[int, float]:
    """Index and F1 of the best column of ``predictions`` ([N, K]); the first wins ties."""
    f1 = [species_f1(split, predictions[:, k]) for k in range(predictions.shape[1])]
    best = int(np.argmax(f1))
    return best, f1[best]


def evaluate(split: AlignedSplit, params_list: Sequence[Params], chunk_rows: int) -> list[dict]:
    """Per-level macro-F1/accuracy of several parameter sets, in one pass."""
    def predict_all(chunk):
        return np.stack([predict_chunk(chunk, p, split.space)[0] for p in params_list], axis=1)

    preds = collect(split, chunk_rows, predict_all, **needs_of(params_list))
    return [level_scores(split.labels, split.space.species[preds[:, k]], split.space.taxonomy)
            for k in range(len(params_list))]


def _label_rows(chunk) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label is an ensemble class, and that class's column (NLL needs both)."""
    ok = np.flatnonzero(chunk.label_columns >= 0)
    return ok, chunk.label_columns[ok]


# ----------------------------------------------------------------------------------------
# Temperature per run
# ----------------------------------------------------------------------------------------
def fit_temperature(split: AlignedSplit, run: int, chunk_rows: int) -> float:
    """Temperature of one run minimising its validation NLL (bounded Brent on log T)."""
    def nll_rows(chunk, temperature):
        ok, y = _label_rows(chunk)
        z = chunk.get(run, "species")[ok].astype(np.float64) / temperature
        m = z.max(axis=1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
        return lse - z[np.arange(len(ok)), y]

    def objective(log_t):
        return float(collect(split, chunk_rows, lambda c: nll_rows(c, np.exp(log_t)), runs=[run]).mean())

    lo, hi = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-3})
    return float(np.exp(result.x))


# ----------------------------------------------------------------------------------------
# Run weights
# ----------------------------------------------------------------------------------------
def fit_weights_f1(split: AlignedSplit, params: Params, chunk_rows: int, rounds: int = 4) -> np.ndarray:
    """Softmax-parametrised weights maximising validation macro-F1 by coordinate search.

    One log-weight at a time moves over ``WEIGHT_STEPS``; all moves of one coordinate are
    scored in one pass (the other runs' sum is computed once per chunk).
    """
    num_runs = len(params.weights)
    theta = np.log(np.asarray(params.weights, dtype=np.float64))
    theta -= theta.max()
    for _ in range(rounds):
        moved = False
        for r in range(num_runs):
            candidates = np.clip(theta[r] + np.asarray(WEIGHT_STEPS), -LOG_WEIGHT_BOUND, LOG_WEIGHT_BOUND)
            preds = collect(split, chunk_rows, lambda c: _weight_moves(c, params, theta, r, candidates),
                            runs=list(range(num_runs)))
            best, _ = best_candidate(split, preds)
            if candidates[best] != theta[r]:
                theta[r], moved = candidates[best], True
        if not moved:
            break
    return _softmax_1d(theta)


def _weight_moves(chunk, params: Params, theta: np.ndarray, r: int, candidates: np.ndarray) -> np.ndarray:
    """Argmax per row for each candidate log-weight of run ``r`` (argmax ignores the total scale)."""
    def member(q):
        z = chunk.get(q, "species") / np.float32(params.temperatures[q])
        return z if params.space == "logit" else softmax(z)

    rest = None
    for q in range(len(theta)):
        if q != r:
            term = member(q) * np.float32(np.exp(theta[q]))
            rest = term if rest is None else np.add(rest, term, out=rest)
    mine = member(r)
    return np.stack([(rest + np.float32(np.exp(c)) * mine).argmax(axis=1) for c in candidates], axis=1)


def fit_weights_nll(split: AlignedSplit, params: Params, chunk_rows: int) -> tuple[np.ndarray, float]:
    """Softmax-parametrised weights (and, in logit space, an ensemble scale) minimising val NLL.

    Logit space: ``scale * sum_r w_r z_r / T_r`` by L-BFGS-B with exact gradients, one pass per
    evaluation. Prob space: the mixture only needs each run's probability of the true class, so
    one pass gathers those and the fit runs in memory.
    """
    if params.space == "prob":
        return _fit_mixture_weights(split, params, chunk_rows), 1.0
    num_runs = len(params.weights)

    def objective(x):
        rows = collect(split, chunk_rows, lambda c: _nll_rows(c, params, x), runs=list(range(num_runs)))
        mean = rows.mean(axis=0)
        w = _softmax_1d(x[:num_runs])
        grad_w = mean[1:1 + num_runs]
        grad_theta = w * (grad_w - w @ grad_w)
        return float(mean[0]), np.concatenate([grad_theta, mean[-1:]])

    x0 = np.zeros(num_runs + 1)
    bounds = [(-LOG_WEIGHT_BOUND, LOG_WEIGHT_BOUND)] * num_runs + [(-5.0, 5.0)]
    result = minimize(objective, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 200})
    return _softmax_1d(result.x[:num_runs]), float(np.exp(result.x[-1]))


def _nll_rows(chunk, params: Params, x: np.ndarray) -> np.ndarray:
    """Per row: NLL, its gradient wrt each weight, and wrt the log scale."""
    num_runs = len(params.weights)
    w, scale = _softmax_1d(x[:num_runs]), float(np.exp(x[-1]))
    ok, y = _label_rows(chunk)
    idx = np.arange(len(ok))
    zs = [chunk.get(r, "species")[ok].astype(np.float64) / params.temperatures[r] for r in range(num_runs)]
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


def _fit_mixture_weights(split: AlignedSplit, params: Params, chunk_rows: int) -> np.ndarray:
    num_runs = len(params.weights)

    def true_class_probs(chunk):
        ok, y = _label_rows(chunk)
        cols = []
        for r in range(num_runs):
            z = chunk.get(r, "species")[ok].astype(np.float64) / params.temperatures[r]
            cols.append(softmax(z)[np.arange(len(ok)), y])
        return np.stack(cols, axis=1)

    probs = collect(split, chunk_rows, true_class_probs, runs=list(range(num_runs)))

    def objective(theta):
        w = _softmax_1d(theta)
        mix = probs @ w + 1e-300
        grad_w = -(probs / mix[:, None]).mean(axis=0)
        return float(-np.log(mix).mean()), w * (grad_w - w @ grad_w)

    bounds = [(-LOG_WEIGHT_BOUND, LOG_WEIGHT_BOUND)] * num_runs
    result = minimize(objective, np.zeros(num_runs), jac=True, method="L-BFGS-B", bounds=bounds)
    return _softmax_1d(result.x)


def _softmax_1d(theta: np.ndarray) -> np.ndarray:
    e = np.exp(np.asarray(theta, dtype=np.float64) - np.max(theta))
    return e / e.sum()


# ----------------------------------------------------------------------------------------
# Post-processing: inverse frequency and hierarchy
# ----------------------------------------------------------------------------------------
def fit_tau(split: AlignedSplit, params: Params, chunk_rows: int) -> tuple[float, float]:
    """``tau`` in ``scores - tau * log(prior)`` maximising val macro-F1 (coarse, then fine grid).

    Returns:
        (tau, its macro-F1).
    """
    base = params.replace(tau=0.0, alpha=0.0, beta=0.0)

    def grid_pass(grid):
        def moves(chunk):
            scores = species_scores(chunk, base, split.space)
            return np.stack([(scores - np.float32(t) * split.space.log_prior).argmax(axis=1) for t in grid], axis=1)

        best, f1 = best_candidate(split, collect(split, chunk_rows, moves, **needs_of([base])))
        return grid[best], f1

    coarse, _ = grid_pass(TAU_COARSE)
    fine = sorted({round(max(0.0, coarse + d), 4) for d in np.arange(-0.1, 0.1001, 0.02)})
    return grid_pass(tuple(fine))


def fit_hierarchy(split: AlignedSplit, params: Params, chunk_rows: int, genus: bool, family: bool):
    """``alpha``, ``beta`` weighting log p(genus), log p(family) of each species (grid search).

    Returns:
        (alpha, beta, macro-F1).
    """
    base = params.replace(alpha=0.0, beta=0.0)
    needs = needs_of([base.replace(alpha=1.0 if genus else 0.0, beta=1.0 if family else 0.0)])

    def grid_pass(grid):
        def moves(chunk):
            scores = species_scores(chunk, base, split.space)
            g, f = hierarchy_terms(chunk, base, split.space, genus, family)
            out = []
            for a, b in grid:
                s = scores + np.float32(a) * g if genus else scores
                s = s + np.float32(b) * f if family else s
                out.append(s.argmax(axis=1))
            return np.stack(out, axis=1)

        best, f1 = best_candidate(split, collect(split, chunk_rows, moves, **needs))
        return grid[best], f1

    def axis(center=None):
        if center is None:
            return HIERARCHY_COARSE
        return sorted({max(0.0, center + d) for d in (-0.25, -0.125, 0.0, 0.125, 0.25)})

    def grid(alphas, betas):
        pairs = [(a, b) for a in (alphas if genus else (0.0,)) for b in (betas if family else (0.0,))]
        return sorted(pairs, key=lambda ab: (ab[0] + ab[1], ab))  # smallest adjustment wins ties

    (a, b), _ = grid_pass(grid(axis(), axis()))
    (a, b), f1 = grid_pass(grid(axis(a), axis(b)))
    return float(a), float(b), f1


# ----------------------------------------------------------------------------------------
# The sequence of steps
# ----------------------------------------------------------------------------------------
class _Steps:
    """The validation table being built, and the best parameters so far.

    Rows whose parameters are given rather than fitted are scored lazily, all together in one
    pass, when a fitted step needs the current score or the table is finished.
    """

    def __init__(self, split: AlignedSplit, chunk_rows: int):
        self.split, self.chunk_rows = split, chunk_rows
        self.rows: list[dict] = []
        self.params: Params | None = None
        self._current: int | None = None  # row holding self.params's scores
        self._pending: list[tuple[int, Params]] = []

    def add(self, name: str, params: Params, kept: bool | None = None, current: bool = False,
            show_params: bool = True) -> int:
        """Append a row to be scored with ``params``; ``current`` makes them the parameters in use."""
        row = {"step": name, "kept": kept}
        if show_params:
            row["params"] = params.to_json()
        self.rows.append(row)
        self._pending.append((len(self.rows) - 1, params))
        if current:
            self.params, self._current = params, len(self.rows) - 1
        return len(self.rows) - 1

    def flush(self) -> None:
        """Score every pending row in one pass."""
        if not self._pending:
            return
        results = evaluate(self.split, [p for _, p in self._pending], self.chunk_rows)
        for (index, _), scores in zip(self._pending, results):
            self.rows[index] = {"step": self.rows[index]["step"], **scores,
                                **{k: v for k, v in self.rows[index].items() if k != "step"}}
        self._pending = []

    @property
    def scores(self) -> dict:
        """Validation scores of the parameters in use."""
        self.flush()
        return {k: v for k, v in self.rows[self._current].items() if k.endswith(("_macro_f1", "_accuracy"))}

    def consider(self, name: str, candidate: Params, forced: bool = False) -> bool:
        """Keep ``candidate`` if forced (given by the user) or if it raises species F1."""
        if forced:
            self.add(name, candidate, kept=True, current=True)
            return True
        current = self._current
        index = self.add(name, candidate)
        self.flush()
        kept = self.rows[index]["species_macro_f1"] > self.rows[current]["species_macro_f1"]
        self.rows[index]["kept"] = kept
        if kept:
            self.params, self._current = candidate, index
        return kept


def initial_params(num_runs: int, opts: EnsembleOptions) -> Params:
    """Equal weights, no calibration, no adjustment."""
    return Params(weights=np.full(num_runs, 1.0 / num_runs), temperatures=np.ones(num_runs),
                  space=opts.space, vote_k=opts.vote_k)


def given_params(params: Params, opts: EnsembleOptions, levels: Sequence[str]) -> Params:
    """Apply the values the user fixed (weights, tau, alpha/beta, mode), without validation."""
    if isinstance(opts.weights, tuple):
        params = params.replace(weights=np.asarray(opts.weights))
    if not isinstance(opts.tau, str):
        params = params.replace(tau=opts.tau)
    if isinstance(opts.hierarchy, tuple):
        _check_hierarchy_levels(opts.hierarchy, levels)
        params = params.replace(alpha=opts.hierarchy[0], beta=opts.hierarchy[1])
    return params.replace(mode=opts.mode)


def _check_hierarchy_levels(alpha_beta: tuple[float, float], levels: Sequence[str]) -> None:
    for value, level in zip(alpha_beta, ("genus", "family")):
        if value and level not in levels:
            raise HerbensError(f"hierarchy needs {level} logits in every run (levels shared: {', '.join(levels)})")


def fit_ensemble(val: AlignedSplit | None, space: ClassSpace, opts: EnsembleOptions, levels: Sequence[str],
                 num_runs: int, log: Callable = print) -> tuple[Params, list[dict]]:
    """Fit (or apply) each step in turn on validation; returns the final params and the table rows."""
    params = initial_params(num_runs, opts)
    if val is None:
        if opts.needs_val:
            raise HerbensError("fitting the ensemble needs labelled validation logits")
        return given_params(params, opts, levels), []
    steps = _Steps(val, opts.chunk_rows)
    for r, run in enumerate(val.runs):
        steps.add(f"run {run.name}", params.replace(weights=np.eye(num_runs)[r]), show_params=False)
    steps.add(f"mean of {num_runs} runs ({opts.space} space)", params, current=True)
    _calibration_step(steps, opts, num_runs, log)
    _weights_step(steps, opts, num_runs, log)
    _tau_step(steps, opts, log)
    _hierarchy_step(steps, opts, levels, log)
    if opts.mode == "vote":
        mean_scores = steps.scores
        steps.consider(f"vote top-{opts.vote_k}", steps.params.replace(mode="vote"), forced=True)
        if steps.scores["species_macro_f1"] < mean_scores["species_macro_f1"]:
            log("note: vote mode scores below the mean on validation (applied as asked)")
    steps.rows.append({"step": "final", **steps.scores, "kept": None, "params": steps.params.to_json()})
    return steps.params, steps.rows


def _calibration_step(steps: _Steps, opts: EnsembleOptions, num_runs: int, log: Callable) -> None:
    if not opts.calibrate:
        return
    log("fitting a temperature per run (validation NLL) ...")
    temps = np.array([fit_temperature(steps.split, r, opts.chunk_rows) for r in range(num_runs)])
    steps.consider("+ calibration T=" + ",".join(f"{t:.3g}" for t in temps),
                   steps.params.replace(temperatures=temps))


def _weights_step(steps: _Steps, opts: EnsembleOptions, num_runs: int, log: Callable) -> None:
    if isinstance(opts.weights, tuple):
        steps.consider("+ given weights " + ",".join(f"{w:.3g}" for w in opts.weights),
                       steps.params.replace(weights=np.asarray(opts.weights)), forced=True)
        return
    if opts.weights != "fit" or num_runs == 1:
        return
    log(f"fitting run weights (validation {opts.weight_objective}) ...")
    if opts.weight_objective == "nll":
        weights, scale = fit_weights_nll(steps.split, steps.params, opts.chunk_rows)
        candidate = steps.params.replace(weights=weights, scale=scale if opts.space == "logit" else 1.0)
    else:
        candidate = steps.params.replace(weights=fit_weights_f1(steps.split, steps.params, opts.chunk_rows))
    steps.consider(f"+ weights ({opts.weight_objective}) " + ",".join(f"{w:.3g}" for w in candidate.weights),
                   candidate)


def _tau_step(steps: _Steps, opts: EnsembleOptions, log: Callable) -> None:
    if not isinstance(opts.tau, str):
        steps.consider(f"+ given tau {opts.tau:g}", steps.params.replace(tau=opts.tau), forced=True)
        return
    if opts.tau != "fit":
        return
    log("fitting the inverse-frequency tau ...")
    tau, _ = fit_tau(steps.split, steps.params, opts.chunk_rows)
    steps.consider(f"+ inverse frequency tau {tau:g}", steps.params.replace(tau=tau))


def _hierarchy_step(steps: _Steps, opts: EnsembleOptions, levels: Sequence[str], log: Callable) -> None:
    if isinstance(opts.hierarchy, tuple):
        _check_hierarchy_levels(opts.hierarchy, levels)
        alpha, beta = opts.hierarchy
        steps.consider(f"+ given hierarchy alpha {alpha:g} beta {beta:g}",
                       steps.params.replace(alpha=alpha, beta=beta), forced=True)
        return
    if opts.hierarchy != "fit":
        return
    genus, family = "genus" in levels, "family" in levels
    if not (genus or family):
        log("hierarchy: skipped (not every run stores genus or family logits)")
        return
    log("fitting the hierarchy alpha/beta ...")
    alpha, beta, _ = fit_hierarchy(steps.split, steps.params, opts.chunk_rows, genus, family)
    steps.consider(f"+ hierarchy alpha {alpha:g} beta {beta:g}", steps.params.replace(alpha=alpha, beta=beta))
