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
from scipy.special import logsumexp

from herbens.data.taxonomy import LEVELS
from herbens.errors import HerbensError

OOD_SCORES = ("msp", "energy")
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
        return logsumexp(scores.astype(np.float64), axis=1)
    raise HerbensError(f"unknown OOD score {kind!r}; expected one of {', '.join(OOD_SCORES)}")


def summarize(probs, kind: str) -> RowSummary:
    """A :class:`RowSummary` of :class:`herbens.bundle.scoring.LevelProbabilities`."""
    top = {lv: probs.level(lv).argmax(axis=1) for lv in LEVELS}
    confidence = {lv: np.take_along_axis(probs.level(lv), top[lv][:, None], axis=1)[:, 0].astype(np.float64)
                  for lv in LEVELS}
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


def level_report(rows: RowSummary, truth: dict[str, np.ndarray], thresholds: dict) -> dict:
    """Per level: precision and coverage of the predictions at or above its threshold; plus the
    share of each decision and the known images flagged unknown by the OOD score."""
    report = {}
    for level in LEVELS:
        accepted = rows.confidence[level] >= thresholds[level]
        correct = rows.top[level] == truth[level]
        report[level] = {"coverage": float(accepted.mean()) if len(rows) else 0.0,
                         "precision": float(correct[accepted].mean()) if accepted.any() else None}
    decisions = decide(rows, thresholds)
    report["decisions"] = {d: float((decisions == d).mean()) if len(rows) else 0.0 for d in DECISIONS}
    report["ood_flagged"] = float((rows.ood < thresholds["ood"]).mean()) if len(rows) else 0.0
    return report


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per row: each species' rows dealt round-robin over folds after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for species in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == species))
        fold[rows] = (offset + np.arange(len(rows))) % folds
        offset += len(rows)
    return fold


def cross_fit(rows: RowSummary, truth: dict[str, np.ndarray], target: float, ood_keep: float,
              folds: int = 2, seed: int = 0) -> dict:
    """Fit on every row (the stored thresholds) and report them in sample; report out of fold.

    Returns:
        ``{"thresholds", "target_precision", "ood_keep", "in_sample", "out_of_fold"}``: the
        out-of-fold report pools every row's decision under thresholds fitted without its fold.
    """
    thresholds = fit_thresholds(rows, truth, target, ood_keep)
    fold = stratified_folds(truth["species"], folds, seed)
    pooled_rows, pooled_truth, pooled_thresholds = [], [], []
    for k in range(folds):
        fit_rows, held = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        if not len(fit_rows) or not len(held):
            continue
        fitted = fit_thresholds(rows.take(fit_rows), {lv: t[fit_rows] for lv, t in truth.items()}, target, ood_keep)
        pooled_rows.append(held)
        pooled_thresholds.append(fitted)
    out_of_fold = _pooled_report(rows, truth, pooled_rows, pooled_thresholds)
    return {"thresholds": thresholds, "target_precision": target, "ood_keep": ood_keep, "folds": folds,
            "rows": len(rows), "in_sample": level_report(rows, truth, thresholds), "out_of_fold": out_of_fold}


def _pooled_report(rows: RowSummary, truth: dict, held: list[np.ndarray], fitted: list[dict]) -> dict | None:
    """Precision/coverage over all held-out rows, each judged by its own fold's thresholds."""
    if not held:
        return None
    accepted = {lv: [] for lv in LEVELS}
    correct = {lv: [] for lv in LEVELS}
    decisions = []
    for rows_k, thr in zip(held, fitted):
        part = rows.take(rows_k)
        decisions.append(decide(part, thr))
        for lv in LEVELS:
            accepted[lv].append(part.confidence[lv] >= thr[lv])
            correct[lv].append(part.top[lv] == truth[lv][rows_k])
    report = {}
    for lv in LEVELS:
        a, c = np.concatenate(accepted[lv]), np.concatenate(correct[lv])
        report[lv] = {"coverage": float(a.mean()), "precision": float(c[a].mean()) if a.any() else None}
    decisions = np.concatenate(decisions)
    report["decisions"] = {d: float((decisions == d).mean()) for d in DECISIONS}
    return report


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
