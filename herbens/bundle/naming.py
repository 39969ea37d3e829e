"""What a botanist reads of a decision: the decided name at its rank and why it was decided.

:func:`herbens.bundle.thresholds.decide` picks ``species`` / ``genus`` / ``family`` /
``unknown``; this module turns that into the fields every output carries: ``name`` (the
binomial with its authors, or the genus, or the family, or ``unknown``), ``rank`` (the level
named, ``unknown`` when none) and ``reason``, a sentence built from the same numbers and
thresholds the decision compared, e.g. ``"OOD score msp 0.31 below its threshold 0.42"``.
"""

from __future__ import annotations

import numpy as np

from herbens.bundle import thresholds as th
from herbens.data.taxonomy import LEVELS


def _pct(value: float) -> str:
    return f"{100 * value:.1f} %" if np.isfinite(value) else "never"


def _level_clause(rows: th.RowSummary, i: int, level: str, thresholds: dict) -> str:
    confidence, threshold = rows.confidence[level][i], thresholds[level]
    if not np.isfinite(threshold):
        return f"{level} {_pct(confidence)} (no threshold: never reached the target precision)"
    sign = ">=" if confidence >= threshold else "<"
    return f"{level} {_pct(confidence)} {sign} {_pct(threshold)}"


def _ood_flagged(rows: th.RowSummary, i: int, thresholds: dict) -> bool:
    return bool(rows.ood[i] < thresholds["ood"])


def reason(rows: th.RowSummary, i: int, decision: str, thresholds: dict, target: float, ood_kind: str) -> str:
    """Why row ``i`` got ``decision`` (the order of the tests is :func:`th.decide`'s)."""
    if decision == "unknown" and _ood_flagged(rows, i, thresholds):
        if ood_kind == "knn":  # stored negated (higher = more familiar); a distance reads better
            return (f"OOD distance {-rows.ood[i]:.4g} above its threshold {-thresholds['ood']:.4g} "
                    "(far from every training image)")
        return (f"OOD score {ood_kind} {rows.ood[i]:.4g} below its threshold {thresholds['ood']:.4g} "
                "(not like the training images)")
    precision = f"{100 * target:.0f} % precision"
    if decision == "unknown":
        clauses = ", ".join(_level_clause(rows, i, lv, thresholds) for lv in LEVELS)
        return f"no level reached its {precision} threshold ({clauses})"
    finer = LEVELS[:LEVELS.index(decision)]
    clauses = [_level_clause(rows, i, decision, thresholds) + f" ({precision} threshold)"]
    clauses += [_level_clause(rows, i, lv, thresholds) for lv in finer]
    return "; ".join(clauses)


def decided_name(bundle, rows: th.RowSummary, i: int, decision: str) -> str:
    """The name at the decided rank: binomial with authors, genus, family, or ``unknown``."""
    if decision == "species":
        row = bundle.names.iloc[int(rows.top["species"][i])]
        return f"{row['scientific_name']} {row['authors']}".strip()
    if decision in ("genus", "family"):
        return bundle.level_names(decision)[int(rows.top[decision][i])]
    return "unknown"


def decision_fields(bundle, rows: th.RowSummary, decisions: np.ndarray) -> list[dict]:
    """Per row ``{"name", "rank", "reason"}`` of a bundle's predictions."""
    target = float(bundle.record["thresholds"].get("target_precision", 0.95))
    return [{"name": decided_name(bundle, rows, i, d), "rank": d,
             "reason": reason(rows, i, d, bundle.thresholds, target, bundle.ood_score)}
            for i, d in enumerate(decisions)]


def is_enrolled(bundle, column: int) -> bool:
    """Whether species column ``column`` was added by ``herbens enrol`` (they follow the trained)."""
    return bool(column >= bundle.taxonomy.num_classes("species"))
