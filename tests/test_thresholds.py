"""Back-off thresholds against brute force, their precision on fitting rows, the cross-fitted
report on held-out rows, and the decision cascade."""

from __future__ import annotations

import numpy as np
import pytest

from herbens.bundle import thresholds as th
from herbens.data.taxonomy import LEVELS


def brute_force_threshold(confidence, correct, target):
    """The lowest observed confidence whose accepted set reaches the target (obviously correct)."""
    ok = [t for t in np.unique(confidence) if correct[confidence >= t].mean() >= target]
    return min(ok) if ok else float("inf")


@pytest.mark.parametrize("seed", range(5))
def test_precision_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    confidence = np.round(rng.random(60), 2)  # rounding makes ties
    correct = rng.random(60) < confidence
    for target in (0.5, 0.8, 0.95, 1.0):
        assert th.precision_threshold(confidence, correct, target) == brute_force_threshold(confidence, correct, target)


def synthetic_rows(n=600, seed=0):
    """Calibrated-ish confidences: a row is correct with probability equal to its confidence."""
    rng = np.random.default_rng(seed)
    truth = {"species": rng.integers(0, 20, n)}
    truth["genus"], truth["family"] = truth["species"] // 4, truth["species"] // 10
    top, confidence = {}, {}
    base = rng.random(n)
    for k, level in enumerate(LEVELS):
        conf = np.clip(base + 0.15 * k, 0, 1)  # coarser levels are more confident
        right = rng.random(n) < conf
        top[level] = np.where(right, truth[level], truth[level] + 1)
        confidence[level] = conf
    return th.RowSummary(top, confidence, base.copy()), truth


def test_thresholds_reach_target_on_fitting_rows_and_are_reported_out_of_fold():
    rows, truth = synthetic_rows()
    result = th.cross_fit(rows, truth, target=0.9, ood_keep=0.95, folds=2, seed=1)
    for level in LEVELS:
        fitted = result["in_sample"][level]
        assert fitted["precision"] >= 0.9 and 0 < fitted["coverage"] < 1
        held = result["out_of_fold"][level]
        assert 0 < held["coverage"] < 1 and 0.7 < held["precision"] <= 1.0
    assert abs(result["in_sample"]["ood_flagged"] - 0.05) < 0.01
    assert abs(sum(result["out_of_fold"]["decisions"].values()) - 1) < 1e-9
    assert "out-of-fold" in th.format_report(result)


def test_unreachable_target_never_accepts_that_level():
    rows, truth = synthetic_rows(n=50)
    rows.top["species"] = truth["species"] + 1  # every species prediction wrong
    result = th.cross_fit(rows, truth, target=0.95, ood_keep=1.0)
    assert result["thresholds"]["species"] == float("inf")
    assert result["in_sample"]["species"]["coverage"] == 0 and result["in_sample"]["species"]["precision"] is None
    assert "never" in th.format_report(result)


def test_decision_is_the_finest_level_reaching_its_threshold():
    rows = th.RowSummary({lv: np.zeros(5, int) for lv in LEVELS},
                         {"species": np.array([.9, .5, .5, .1, .9]), "genus": np.array([.95, .8, .5, .2, .95]),
                          "family": np.array([.99, .9, .85, .3, .99])},
                         np.array([1.0, 1.0, 1.0, 1.0, 0.0]))
    thresholds = {"species": 0.8, "genus": 0.7, "family": 0.8, "ood": 0.5}
    assert th.decide(rows, thresholds).tolist() == ["species", "genus", "family", "unknown", "unknown"]


def test_ood_scores():
    scores = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    probs = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    np.testing.assert_allclose(th.ood_score(scores, probs, "msp"), probs.max(1))
    np.testing.assert_allclose(th.ood_score(scores, probs, "energy"), np.log(np.exp(scores).sum(1)))


def _fold_thresholds(rows, truth, target, keep, folds, seed):
    """Slow reference: each fold's thresholds refitted on the rows outside it, by brute force."""
    from herbens.core.numerics import stratified_folds

    fold = stratified_folds(truth["species"], folds, seed).fold
    fitted = []
    for i in range(folds):
        rest = np.flatnonzero(fold != i)
        fitted.append(th.fit_thresholds(rows.take(rest), {lv: t[rest] for lv, t in truth.items()}, target, keep))
    return fold, fitted


def test_out_of_fold_report_judges_each_row_by_thresholds_fitted_without_it():
    rows, truth = synthetic_rows(n=300, seed=4)
    result = th.cross_fit(rows, truth, target=0.9, ood_keep=0.9, folds=3, seed=2)
    fold, fitted = _fold_thresholds(rows, truth, 0.9, 0.9, 3, 2)
    for level in LEVELS:
        accepted = np.array([rows.confidence[level][r] >= fitted[fold[r]][level] for r in range(300)])
        correct = rows.top[level] == truth[level]
        assert result["out_of_fold"][level]["coverage"] == pytest.approx(accepted.mean())
        assert result["out_of_fold"][level]["precision"] == pytest.approx(correct[accepted].mean())
    flagged = np.mean([rows.ood[r] < fitted[fold[r]]["ood"] for r in range(300)])
    assert result["out_of_fold"]["ood_flagged"] == pytest.approx(flagged)
    assert result["in_sample"] == th.level_report(rows, truth, result["thresholds"])


def test_open_set_rates_use_thresholds_fitted_without_the_judged_known_images():
    from herbens.analysis.openset import open_set_report

    known, truth = synthetic_rows(n=200, seed=5)
    unknown, _ = synthetic_rows(n=50, seed=6)
    unknown.ood *= 0.5  # held-out species look less familiar
    report = open_set_report(known, truth, unknown, target=0.9, keep=0.9, folds=2, seed=3)
    fold, fitted = _fold_thresholds(known, truth, 0.9, 0.9, 2, 3)
    known_flagged = np.mean([known.ood[r] < fitted[fold[r]]["ood"] for r in range(200)])
    held_flagged = np.mean([np.mean(unknown.ood < thr["ood"]) for thr in fitted])
    assert report["known_ood_flagged"] == pytest.approx(known_flagged)
    assert report["held_out_ood_flagged"] == pytest.approx(held_flagged)
    assert report["held_out_ood_flagged"] > report["known_ood_flagged"]
