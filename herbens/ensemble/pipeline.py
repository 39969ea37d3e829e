"""The fitted pipeline: ``herbens ensemble runs/* -o submissions/NAME.csv`` lands in :func:`ensemble_runs`.

1. open and align the runs' stores (:mod:`herbens.ensemble.stores`);
2. on the labelled validation rows: the mean of the runs on one scale (a temperature per run
   and level, by NLL), then in turn the plain mean or a single run instead, run weights, the
   inverse-frequency ``tau`` (:mod:`herbens.ensemble.tau`), the hierarchy ``alpha``/``beta`` (:mod:`herbens.ensemble.fit`),
   each cross-fitted over stratified folds (:mod:`herbens.ensemble.crossfit`) and kept only
   if its OUT-OF-FOLD species macro-F1 gain passes the keep rule
   (:func:`herbens.ensemble.keep_rule.keep_test`); weights are shrunk towards equal by a factor the
   out-of-fold score chooses; the whole procedure is repeated inside outer folds for its
   honest score (nested cross-fitting, :class:`herbens.ensemble.crossfit.NestedFolds`);
3. refit on all validation rows (the full fit), stream the test split once in row chunks
   through :func:`herbens.ensemble.combine.predict_chunk` and write the outputs
   (:mod:`herbens.ensemble.outputs`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from herbens.data.taxonomy import LEVELS
from herbens.ensemble import fit
from herbens.ensemble.tau import fit_tau, fit_tau_nll
from herbens.ensemble.combine import ClassSpace, Params, needs_of, predict_chunk
from herbens.ensemble.crossfit import NestedFolds
from herbens.ensemble.integrity import forget_unreadable_labels, unreadable_record, warn_unverifiable_test
from herbens.ensemble.options import EnsembleOptions
from herbens.ensemble.outputs import format_table, output_paths, summary, write_outputs
from herbens.ensemble.steps import Steps
from herbens.ensemble.stores import (AlignedSplit, Run, align_split, auto_chunk_rows, class_space, labelled,
                                     load_runs)
from herbens.ensemble.submission import prepare_outputs
from herbens.core.errors import HerbensError
from herbens.core.fileio import write_json
from herbens.stores.logits import logits_dir
from herbens.core.progress import progress_bar

# Shrinkage of fitted weights towards equal, in log space: the out-of-fold score picks the
# factor; on a tie the stronger shrinkage wins.
SHRINK = (0.25, 0.5, 0.75, 1.0)


def ensemble_runs(run_dirs: Sequence, output: str | os.PathLike, *, weights="fit", weight_objective: str = "f1",
                  calibrate: bool = True, tau="fit", hierarchy="fit", mode: str = "mean", vote_k: int = 5,
                  space: str = "logit", top_k: int = 0, chunk_rows: int | None = None,
                  align_by_category: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Ensemble runs' stored logits into a Kaggle submission.

    Args:
        run_dirs: run directories (each with ``taxonomy.json`` and ``logits/test``; ``logits/val``
            with labels when anything is fitted).
        output: submission CSV; ``<stem>.json`` (the returned summary) and, with ``top_k``,
            ``<stem>.topk.csv`` are written beside it.
        weights: ``"fit"`` (on validation), ``"equal"``, or one number per run.
        weight_objective: ``"f1"`` (coordinate search on validation macro-F1) or ``"nll"``
            (scipy L-BFGS on validation log-loss, with an ensemble temperature).
        calibrate: fit a temperature per run and per level by that level's validation NLL.
        tau: inverse-frequency adjustment ``scores - tau * log(prior)``: ``"fit"``, ``"none"`` or a value.
        hierarchy: ``"fit"``, ``"none"`` or ``(alpha, beta)``.
        mode: ``"mean"`` or ``"vote"`` (top-``vote_k`` votes per run or per stored view).
        space: average ``"logit"`` s or ``"prob"`` abilities.
        top_k: also write the K best category_ids and scores per image.
        chunk_rows: rows per streamed chunk (memory: a few ``runs x chunk_rows x classes x 4``
            bytes); default: about 16 MB of float32 per run (270 rows at 15,501 classes).
        align_by_category: match class columns by category_id across different taxonomies.
        progress: show a progress bar over test chunks (on a terminal).
        log: where messages and the validation table go.

    Returns:
        The JSON summary: runs, fitted parameters (``params``), in-sample and out-of-fold
        validation scores of every step, paths.
    """
    started = time.perf_counter()
    run_dirs = list(run_dirs)
    opts = EnsembleOptions(weights, weight_objective, calibrate, tau, hierarchy, mode, int(vote_k), space,
                           int(top_k), None if chunk_rows is None else int(chunk_rows), align_by_category)
    opts.check(len(run_dirs))
    prepare_outputs(output_paths(Path(output)), log)
    runs = load_runs(run_dirs)
    warn_unverifiable_test(runs)
    unreadable = unreadable_record(runs)
    space_ = class_space(runs, align_by_category, log)
    if opts.chunk_rows is None:
        opts.chunk_rows = auto_chunk_rows(space_.num_classes)
    test = align_split(runs, "test", space_, exact=True, log=log)
    val = _validation(runs, space_, opts, log)
    levels = _shared_levels(runs, val is not None)
    params, steps, val_info = fit_ensemble(val, space_, opts, levels, len(runs), log)
    if steps:
        log(format_table(steps, len(val), val_info["folds"]))
    pred, top, top_scores = predict_split(test, params, opts.chunk_rows, opts.top_k, progress)
    paths = write_outputs(Path(output), test, space_, pred, top, top_scores)
    result = summary(paths, runs, space_, opts, params, steps, val_info, test, levels, started)
    result["unreadable"] = unreadable  # fallback rows per run and split (see herbens.ensemble.integrity)
    write_json(paths["json"], result)
    log(f"wrote {paths['submission']} ({len(test)} test images) and {paths['json']}")
    return result


def predict_split(split: AlignedSplit, params: Params, chunk_rows: int, top_k: int = 0,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Stream a whole split: predicted ensemble column per row (and top-k columns/scores)."""
    pred = np.empty(len(split), dtype=np.int64)
    top = np.empty((len(split), min(top_k, split.space.num_classes)), dtype=np.int64) if top_k else None
    top_scores = np.empty(top.shape, dtype=np.float32) if top_k else None
    chunks = split.chunks(chunk_rows, **needs_of([params]))
    for chunk in progress_bar(chunks, total=split.num_chunks(chunk_rows), desc=f"ensemble {split.name}",
                              unit="chunk", enabled=progress):
        p, t, s = predict_chunk(chunk, params, split.space, top_k)
        pred[chunk.start:chunk.stop] = p
        if top_k:
            top[chunk.start:chunk.stop] = t
            top_scores[chunk.start:chunk.stop] = s
    return pred, top, top_scores


def _validation(runs: list[Run], space: ClassSpace, opts: EnsembleOptions, log: Callable) -> AlignedSplit | None:
    """The labelled validation rows common to all runs, or None when there are none to use."""
    missing = [run for run in runs if "val" not in run.splits]
    if missing:
        if opts.needs_val:
            raise HerbensError(f"run '{missing[0].path}': no logits for split 'val' "
                               f"({logits_dir(missing[0].path, 'val')} is missing), needed to fit the "
                               "ensemble (or pass --weights equal --no-calibrate --tau none --hierarchy none)")
        return None
    val = align_split(runs, "val", space, exact=False, log=log)
    forget_unreadable_labels(val)
    if val.labels is None or not (val.labels >= 0).any():
        if opts.needs_val:
            raise HerbensError(f"run '{runs[0].path}': logits/val carry no labels (labels.npy), needed to "
                               "fit the ensemble (or pass --weights equal --no-calibrate --tau none --hierarchy none)")
        return None
    return labelled(val)


def _shared_levels(runs: list[Run], with_val: bool) -> tuple[str, ...]:
    splits = ("test", "val") if with_val else ("test",)
    return tuple(lv for lv in LEVELS if all(lv in run.splits[s].levels for run in runs for s in splits))


# ----------------------------------------------------------------------------------------
# The sequence of steps, cross-fitted (herbens.ensemble.steps)
# ----------------------------------------------------------------------------------------
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
                 num_runs: int, log: Callable = print, nested: bool = True) -> tuple[Params, list[dict], dict | None]:
    """Fit (or apply) each step in turn, cross-fitted on validation (nested: with the honest estimate).

    Returns:
        The full fit's params, the table rows, and the ``val`` entry of the summary (images,
        folds, in-sample, out-of-fold and, nested, honest scores of the final parameters).
    """
    params = Params.initial(num_runs, opts.space, opts.vote_k)
    if val is None:  # only when nothing is fitted: _validation refuses a missing val otherwise
        return given_params(params, opts, levels), [], None
    folds = NestedFolds.of_labels(val.labels, nested=nested)
    steps = Steps(val, folds, opts.chunk_rows, log)
    for r, run in enumerate(val.runs):
        steps.add(f"run {run.name}", steps.same(params.replace(weights=np.eye(num_runs)[r])), show_params=False)
    steps.add(f"mean of {num_runs} runs ({opts.space} space)", steps.same(params), current=True)
    level_temps = _calibrated_mean(steps, opts, levels, num_runs, log)
    _base_step(steps, num_runs, val.runs, calibrated=level_temps is not None)
    _weights_step(steps, opts, num_runs, log)
    _tau_step(steps, opts, log)
    _hierarchy_step(steps, opts, levels, level_temps, num_runs, log)
    if opts.mode == "vote":
        mean_f1 = steps.current_scores()["out_of_fold"]["species_macro_f1"]
        steps.consider(f"vote top-{opts.vote_k}", [[p.replace(mode="vote") for p in steps.fits]], forced=True)
        if steps.current_scores()["out_of_fold"]["species_macro_f1"] < mean_f1:
            log("note: vote mode scores below the mean on validation (applied as asked)")
    final = steps.current_scores()
    steps.rows.append({"step": "final", **final, "kept": None, "params": steps.params.to_json()})
    info = {"images": len(val), "folds": folds.k, "nested": folds.nested, **final}
    return steps.params, steps.rows, info


def _shrunk(values: np.ndarray, factor: float) -> np.ndarray:
    """``values`` moved towards 1 in log space (factor 0: all 1, factor 1: unchanged)."""
    return np.exp(factor * np.log(np.asarray(values, dtype=np.float64)))


def _calibrated_mean(steps: Steps, opts: EnsembleOptions, levels: Sequence[str], num_runs: int,
                     log: Callable) -> list[dict] | None:
    """The mean of the runs on one scale: each run's logits divided by its own NLL temperature.

    Part of the mean, not a step that may be dropped: averaged raw, a run with ArcFace-scaled
    cosines (x 30-64) outvotes plain cross-entropy runs whatever their accuracy. Returns every
    fit's genus/family temperatures for the hierarchy.
    """
    if not opts.calibrate or steps.too_few_rows("calibration", num_runs):
        return None
    log("fitting a temperature per run and level (validation NLL, cross-fitted) ...")
    temps = fit.fit_temperatures(steps.split, steps.folds, levels, opts.chunk_rows)
    full = temps[steps.folds.full]["species"]
    steps.add(f"mean of {num_runs} runs on one scale (T " + ",".join(f"{t:.3g}" for t in full) + f", {opts.space})",
              [p.with_temperatures(species=t["species"]) for p, t in zip(steps.fits, temps)], current=True)
    return temps


def _base_step(steps: Steps, num_runs: int, runs: Sequence, calibrated: bool) -> None:
    """The plain mean and every single run (on the same scale) are candidates beside the mean."""
    if num_runs == 1:
        return
    alternatives, labels = [], []
    if calibrated:
        alternatives.append(steps.same(Params.initial(num_runs, steps.params.space, steps.params.vote_k)))
        labels.append(": the plain mean")
    for r, run in enumerate(runs):
        alternatives.append([p.replace(weights=np.eye(num_runs)[r]) for p in steps.fits])
        labels.append(f": run {run.name} alone")
    steps.consider("+ instead of the mean", alternatives, labels)


def _weights_step(steps: Steps, opts: EnsembleOptions, num_runs: int, log: Callable) -> None:
    if isinstance(opts.weights, tuple):
        steps.consider("+ given weights " + ",".join(f"{w:.3g}" for w in opts.weights),
                       [[p.replace(weights=np.asarray(opts.weights)) for p in steps.fits]], forced=True)
        return
    if opts.weights != "fit" or num_runs == 1:
        return
    fitted_values = num_runs - 1 + (opts.weight_objective == "nll")
    if steps.too_few_rows("weights", fitted_values):
        return
    log(f"fitting run weights (validation {opts.weight_objective}, cross-fitted) ...")
    if opts.weight_objective == "nll":
        fitted = fit.fit_weights_nll(steps.split, steps.folds, steps.fits, opts.chunk_rows)
    else:
        fitted = [(w, 1.0) for w in fit.fit_weights_f1(steps.split, steps.folds, steps.fits, opts.chunk_rows)]
    scaled = opts.weight_objective == "nll" and opts.space == "logit"
    alternatives, labels = [], []
    for s in SHRINK:
        fits = [p.replace(weights=_normalised(_shrunk(w, s)), scale=float(_shrunk(scale, s)) if scaled else p.scale)
                for p, (w, scale) in zip(steps.fits, fitted)]
        alternatives.append(fits)
        labels.append(" " + ",".join(f"{w:.3g}" for w in fits[steps.folds.full].weights)
                      + (f" (shrunk x{s:g})" if s < 1 else ""))
    steps.consider(f"+ weights ({opts.weight_objective})", alternatives, labels)


def _normalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def _tau_step(steps: Steps, opts: EnsembleOptions, log: Callable) -> None:
    if not isinstance(opts.tau, str):
        steps.consider(f"+ given tau {opts.tau:g}", [[p.replace(tau=opts.tau) for p in steps.fits]], forced=True)
        return
    if opts.tau != "fit" or steps.too_few_rows("tau", 1):
        return
    log("fitting the inverse-frequency tau by macro-F1 and by log-loss (cross-fitted) ...")
    by_f1 = fit_tau(steps.split, steps.folds, steps.fits, opts.chunk_rows)
    by_nll = fit_tau_nll(steps.split, steps.folds, steps.fits, opts.chunk_rows)
    full = steps.folds.full
    steps.consider("+ inverse frequency tau", [[p.replace(tau=t) for p, t in zip(steps.fits, taus)]
                                               for taus in (by_f1, by_nll)],
                   [f" {by_f1[full]:g} (macro-F1)", f" {by_nll[full]:g} (log-loss)"])


def _hierarchy_step(steps: Steps, opts: EnsembleOptions, levels: Sequence[str], level_temps: list[dict] | None,
                    num_runs: int, log: Callable) -> None:
    """alpha/beta on top of each fit's genus/family temperatures (when calibrating)."""
    genus, family = "genus" in levels, "family" in levels
    heads = [lv for lv, used in (("genus", genus), ("family", family)) if used]

    def calibrated(params: Params, j: int) -> Params:
        if level_temps is None:
            return params
        return params.with_temperatures(**{lv: level_temps[j][lv] for lv in heads})

    if isinstance(opts.hierarchy, tuple):
        _check_hierarchy_levels(opts.hierarchy, levels)
        alpha, beta = opts.hierarchy
        steps.consider(f"+ given hierarchy alpha {alpha:g} beta {beta:g}",
                       [[calibrated(p, j).replace(alpha=alpha, beta=beta) for j, p in enumerate(steps.fits)]],
                       forced=True)
        return
    if opts.hierarchy != "fit":
        return
    if not heads:
        log("hierarchy: skipped (not every run stores genus or family logits)")
        return
    if steps.too_few_rows("hierarchy", len(heads) * (1 + (num_runs if level_temps else 0))):
        return
    log("fitting the hierarchy alpha/beta (cross-fitted) ...")
    bases = [calibrated(p, j) for j, p in enumerate(steps.fits)]
    fitted = fit.fit_hierarchy(steps.split, steps.folds, bases, opts.chunk_rows, genus, family)
    alpha, beta = fitted[steps.folds.full]
    steps.consider(f"+ hierarchy alpha {alpha:g} beta {beta:g}" + (" (per-level T)" if level_temps else ""),
                   [[b.replace(alpha=a, beta=bb) for b, (a, bb) in zip(bases, fitted)]])
