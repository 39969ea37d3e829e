"""Hierarchical back-off and the open-set flag: thresholds fitted on labelled validation rows.

A prediction is named at the finest level whose confidence reaches that level's threshold:
species, else genus only, else family only, else unknown. Each level's threshold is the lowest
confidence at which the predictions at or above it reach the target precision on the fitting
rows. Independently, an out-of-distribution score (maximum softmax probability or the energy
``logsumexp`` of the species scores; higher = more familiar) below its threshold flags the
image unknown; that threshold keeps a chosen share (default 95 %) of known validation images.

Every fitted value is also judged out of sample: the rows are split into stratified folds,
thresholds fitted on all folds but one are evaluated on the one left out, and the report
gives both the in-sample and the out-of-fold precision and coverage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from herbens.data.taxonomy import LEVELS
from herbens.core.errors import HerbensError
from herbens.core import numerics
from herbens.core.numerics import CrossFitted, logsumexp, stratified_folds

OOD_SCORES = ("msp", "energy", "knn")
# knn (herbens.bundle.distance) is not a function of the scores: callers summarise with msp and
# replace RowSummary.ood by the negated embedding distance.
SOFTMAX_OOD_SCORES = ("msp", "energy")
DECISIONS = ("species", "genus", "family", "unknown")


@dataclass
class RowSummary:
    """What back-off needs of each image: per level the top class and its probability, and the
    OOD score."""

    top: dict[str, np.ndarray]          # level -> predicted class index [n]
    confidence: dict[str, np.ndarray]   # level -> its probability [n]
    ood: np.ndarray                     # [n], higher = more like the training species

    def __len__(self) -> int:
        return len(self.ood)

    def take(self, rows: np.ndarray) -> "RowSummary":
        return RowSummary({k: v[rows] for k, v in self.top.items()},
                          {k: v[rows] for k, v in self.confidence.items()}, self.ood[rows])

    @staticmethod
    def concat(parts: list["RowSummary"]) -> "RowSummary":
        return RowSummary({lv: np.concatenate([p.top[lv] for p in parts]) for lv in LEVELS},
                          {lv: np.concatenate([p.confidence[lv] for p in parts]) for lv in LEVELS},
                          np.concatenate([p.ood for p in parts]))


def ood_score(scores: np.ndarray, species_probs: np.ndarray, kind: str) -> np.ndarray:
    """Per-row OOD score: ``msp`` (max species probability) or ``energy`` (logsumexp of scores)."""
    if kind == "msp":
        return species_probs.max(axis=1).astype(np.float64)
    if kind == "energy":
        return logsumexp(scores.astype(np.float64))
    if kind == "knn":
        raise HerbensError("the knn OOD score needs embeddings: herbens.bundle.distance computes it")
    raise HerbensError(f"unknown OOD score {kind!r}; expected one of {', '.join(OOD_SCORES)}")


def summarize(probs, kind: str) -> RowSummary:
    """A :class:`RowSummary` of :class:`herbens.bundle.scoring.LevelProbabilities`."""
    top = {lv: probs.level(lv).argmax(axis=1) for lv in LEVELS}
    confidence = {lv: np.take_along_axis(probs.level(lv), top[lv][:, None], axis=1)[:, 0].astype(np.float64)
                  for lv in LEVELS}
    if kind == "knn":
        if probs.distance is None:
            raise HerbensError("the knn OOD score needs the embedding distances (a bundle with OOD banks)")
        return RowSummary(top, confidence, -np.asarray(probs.distance, dtype=np.float64))
    return RowSummary(top, confidence, ood_score(probs.scores, probs.species, kind))


def precision_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """Lowest confidence t with precision of {confidence >= t} >= target (inf: none reaches it).

    Ties are kept together: accepting one row of confidence t accepts all of them.
    """
    if not len(confidence):
        return float("inf")
    order = np.argsort(-confidence, kind="stable")
    conf, hits = confidence[order], correct[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(conf) + 1)
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]  # only whole tie groups are acceptable cuts
    ok = np.flatnonzero(last_of_tie & (precision >= target))
    return float(conf[ok[-1]]) if len(ok) else float("inf")


def ood_threshold(ood: np.ndarray, keep: float) -> float:
    """Score below which an image is flagged unknown, keeping ``keep`` of the known images."""
    if not len(ood):
        return -float("inf")
    return float(np.quantile(ood, 1.0 - keep, method="lower"))


def fit_thresholds(rows: RowSummary, truth: dict[str, np.ndarray], target: float = 0.95,
                   ood_keep: float = 0.95) -> dict:
    """Thresholds per level (precision ``target``) and for the OOD score (keeping ``ood_keep``)."""
    if not 0 < target <= 1 or not 0 < ood_keep <= 1:
        raise HerbensError(f"target precision and OOD keep rate must be in (0, 1], got {target}, {ood_keep}")
    out = {lv: precision_threshold(rows.confidence[lv], rows.top[lv] == truth[lv], target) for lv in LEVELS}
    out["ood"] = ood_threshold(rows.ood, ood_keep)
    return out


def decide(rows: RowSummary, thresholds: dict) -> np.ndarray:
    """Decision per image: the finest level reaching its threshold, ``unknown`` when none does
    or the OOD score is below its threshold."""
    decision = np.full(len(rows), "unknown", dtype=object)
    for level in reversed(LEVELS):  # finest last, so it wins
        decision[rows.confidence[level] >= thresholds[level]] = level
    decision[rows.ood < thresholds["ood"]] = "unknown"
    return decision


def row_outcomes(rows: RowSummary, truth: dict[str, np.ndarray], thresholds: dict, index: np.ndarray) -> dict:
    """Per row of ``index``: accepted and correct at each level, the decision and the OOD flag."""
    part = rows.take(index)
    out = {"decision": decide(part, thresholds), "ood_flagged": part.ood < thresholds["ood"]}
    for level in LEVELS:
        out[f"accepted.{level}"] = part.confidence[level] >= thresholds[level]
        out[f"correct.{level}"] = part.top[level] == truth[level][index]
    return out


def summarise(outcomes: dict) -> dict:
    """Per level: precision and coverage of the accepted predictions; plus the share of each
    decision and the rows flagged unknown by the OOD score (from :func:`row_outcomes`)."""
    def share(mask):
        return float(mask.mean()) if len(mask) else 0.0

    report = {}
    for level in LEVELS:
        accepted, correct = outcomes[f"accepted.{level}"], outcomes[f"correct.{level}"]
        report[level] = {"coverage": share(accepted),
                         "precision": float(correct[accepted].mean()) if accepted.any() else None}
    report["decisions"] = {d: share(outcomes["decision"] == d) for d in DECISIONS}
    report["ood_flagged"] = share(outcomes["ood_flagged"])
    return report


def level_report(rows: RowSummary, truth: dict[str, np.ndarray], thresholds: dict) -> dict:
    """:func:`summarise` of every row under ``thresholds``."""
    return summarise(row_outcomes(rows, truth, thresholds, np.arange(len(rows))))


def cross_fitted(rows: RowSummary, truth: dict[str, np.ndarray], target: float, ood_keep: float,
                 folds: int, seed: int) -> CrossFitted:
    """Thresholds fitted on every row and on each stratified fold's complement
    (:func:`herbens.core.numerics.cross_fit`), with per-row :func:`row_outcomes`."""
    def fit(index):
        return fit_thresholds(rows.take(index), {lv: t[index] for lv, t in truth.items()}, target, ood_keep)

    return numerics.cross_fit(stratified_folds(truth["species"], folds, seed), fit,
                     lambda thresholds, index: row_outcomes(rows, truth, thresholds, index))


def cross_fit(rows: RowSummary, truth: dict[str, np.ndarray], target: float, ood_keep: float,
              folds: int = 2, seed: int = 0) -> dict:
    """Fit on every row (the stored thresholds) and report them in sample; report out of fold.

    Returns:
        ``{"thresholds", "target_precision", "ood_keep", "in_sample", "out_of_fold"}``: the
        out-of-fold report pools every row's decision under thresholds fitted without its fold
        (None when there are fewer than two folds).
    """
    fitted = cross_fitted(rows, truth, target, ood_keep, folds, seed)
    out_of_fold = None if fitted.out_of_fold is None else summarise(fitted.out_of_fold)
    return {"thresholds": fitted.value, "target_precision": target, "ood_keep": ood_keep, "folds": folds,
            "rows": len(rows), "in_sample": summarise(fitted.in_sample), "out_of_fold": out_of_fold}


def format_report(result: dict) -> str:
    """Thresholds with in-sample and out-of-fold precision/coverage per level, as a table."""
    def pct(value):
        return "   -" if value is None else f"{100 * value:5.1f}"

    lines = [f"back-off thresholds (target precision {result['target_precision']:.0%}, {result['rows']} "
             f"validation images; out-of-fold: {result['folds']}-fold cross-fit)",
             f"{'level':<8}{'threshold':>10}{'prec. in':>10}{'cov. in':>9}{'prec. oof':>11}{'cov. oof':>10}"]
    oof = result["out_of_fold"] or {}
    for lv in LEVELS:
        ins, out = result["in_sample"][lv], oof.get(lv, {})
        threshold = result["thresholds"][lv]
        shown = f"{threshold:.4f}" if np.isfinite(threshold) else "never"
        lines.append(f"{lv:<8}{shown:>10}{pct(ins['precision']):>10}{pct(ins['coverage']):>9}"
                     f"{pct(out.get('precision')):>11}{pct(out.get('coverage')):>10}")
    lines.append(f"OOD threshold {result['thresholds']['ood']:.4f} (keeps {result['ood_keep']:.0%} of known "
                 f"images in sample; flagged: {100 * result['in_sample']['ood_flagged']:.1f} %)")
    return "\n".join(lines)
