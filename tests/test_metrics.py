"""Metrics against sklearn/scipy and against hand-computed values on a tiny taxonomy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score

from herbens.analysis.evaluate import evaluate_predictions
from herbens.data.taxonomy import Taxonomy
from herbens.metrics import (accuracy_by_training_count, best_worst, binomial_se, correctness_anova,
                             group_macro_f1, head_tail_scores, head_tail_split, level_scores, macro_f1,
                             one_way_anova, per_level_accuracy, split_by_group, top1_accuracy,
                             training_bin_labels, training_bin_of)


def tiny_taxonomy() -> Taxonomy:
    """Six species; families F = {0, 1, 2}, G = {3, 4}, H = {5}; counts spread over the bins."""
    return Taxonomy(
        category_ids=[10, 11, 12, 20, 21, 30],
        species_names=["A a", "A b", "B c", "C d", "C e", "D f"],
        genus_names=["A", "B", "C", "D"], family_names=["F", "G", "H"],
        species_to_genus=[0, 0, 1, 2, 2, 3], species_to_family=[0, 0, 0, 1, 1, 2],
        counts=[3, 12, 15, 45, 95, 7])


# true / predicted species of ten test images; correct = 1 0 1 1 0 1 0 1 1 0
TRUE = np.array([0, 0, 1, 1, 2, 3, 3, 3, 4, 5])
PRED = np.array([0, 1, 1, 1, 0, 3, 4, 3, 4, 2])

# scipy.stats.f_oneway docstring example (mussel shell measurements).
MUSSELS = {
    "tillamook": [0.0571, 0.0813, 0.0831, 0.0976, 0.0817, 0.0859, 0.0735, 0.0659, 0.0923, 0.0836],
    "newport": [0.0873, 0.0662, 0.0672, 0.0819, 0.0749, 0.0649, 0.0835, 0.0725],
    "petersburg": [0.0974, 0.1352, 0.0817, 0.1016, 0.0968, 0.1064, 0.105],
    "magadan": [0.1033, 0.0915, 0.0781, 0.0685, 0.0677, 0.0697, 0.0764, 0.0689],
    "tvarminne": [0.0703, 0.1026, 0.0956, 0.0973, 0.1039, 0.1045],
}


@pytest.mark.parametrize("seed", range(5))
def test_macro_f1_matches_sklearn_with_labels_never_true(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 20, size=200)
    y_pred = np.where(rng.random(200) < 0.5, y_true, rng.integers(0, 30, size=200))  # 20..29 never true
    assert set(y_pred) - set(y_true)
    assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert top1_accuracy(y_true, y_pred) == pytest.approx((y_true == y_pred).mean())


def test_level_scores_unchanged_on_tiny_example():
    scores = level_scores(TRUE, PRED, tiny_taxonomy())
    assert scores["species_accuracy"] == pytest.approx(0.6)
    fam_map = np.array([0, 0, 0, 1, 1, 2])  # family of each species index
    assert scores["family_accuracy"] == pytest.approx(0.9)
    assert scores["family_macro_f1"] == pytest.approx(f1_score(fam_map[TRUE], fam_map[PRED], average="macro"))


def test_per_family_accuracy_and_se_by_hand():
    table = per_level_accuracy(TRUE, PRED, tiny_taxonomy(), "family").set_index("name")
    assert table.loc["F", "n_images"] == 5 and table.loc["F", "n_correct"] == 3
    assert table.loc["F", "accuracy"] == pytest.approx(0.6)
    assert table.loc["F", "se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    assert table.loc["G", "accuracy"] == pytest.approx(0.75)
    assert table.loc["G", "se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert table.loc["H", "accuracy"] == 0.0 and table.loc["H", "se"] == 0.0
    assert table["train_images"].to_dict() == {"F": 30, "G": 140, "H": 7}
    genus = per_level_accuracy(TRUE, PRED, tiny_taxonomy(), "genus").set_index("name")
    assert genus.loc["A", "accuracy"] == pytest.approx(0.75) and genus.loc["B", "accuracy"] == 0.0


def test_best_worst_order_and_min_images():
    table = per_level_accuracy(TRUE, PRED, tiny_taxonomy(), "family")
    best, worst = best_worst(table, k=2)
    # Three families for two lists of two: the middle one F goes to best only (before, F was in both).
    assert best["name"].tolist() == ["G", "F"]
    assert worst["name"].tolist() == ["H"]
    best, worst = best_worst(table, k=1)
    assert best["name"].tolist() == ["G"] and worst["name"].tolist() == ["H"]
    best, worst = best_worst(table, k=5, min_images=2)
    assert "H" not in set(best["name"]) | set(worst["name"])


def test_binomial_se_zero_images_is_nan():
    assert np.isnan(binomial_se(0.5, 0))
    assert binomial_se(0.5, 4) == pytest.approx(0.25)


def test_training_bins_by_hand():
    assert training_bin_labels() == ["<5", "5-9", "10-19", "20-29", "30-39", "40-49", "50-59",
                                     "60-69", "70-79", "80-89", ">=90"]
    assert training_bin_of([0, 4, 5, 9, 10, 19, 89, 90, 1000]).tolist() == [0, 0, 1, 1, 2, 2, 9, 10, 10]
    bins = accuracy_by_training_count(TRUE, PRED, tiny_taxonomy()).set_index("bin")
    assert bins.index.tolist() == ["<5", "5-9", "10-19", "40-49", ">=90"]  # empty bins omitted
    assert bins.loc["<5", "accuracy"] == pytest.approx(0.5) and np.isnan(bins.loc["<5", "se"])
    assert bins.loc["5-9", "accuracy"] == 0.0
    # species 1 (acc 1) and 2 (acc 0): mean 0.5, SE = std(ddof=1)/sqrt(2) = 0.5
    assert bins.loc["10-19", "n_species"] == 2 and bins.loc["10-19", "n_images"] == 3
    assert bins.loc["10-19", "accuracy"] == pytest.approx(0.5)
    assert bins.loc["10-19", "se"] == pytest.approx(0.5)
    assert bins.loc["10-19", "image_accuracy"] == pytest.approx(2 / 3)
    assert bins.loc["40-49", "accuracy"] == pytest.approx(2 / 3)
    assert bins.loc[">=90", "hi"] is None or np.isnan(bins.loc[">=90", "hi"])


def test_anova_matches_scipy_documented_example_through_grouping():
    values = np.concatenate(list(MUSSELS.values()))
    groups = np.repeat(list(MUSSELS), [len(v) for v in MUSSELS.values()])
    order = np.random.default_rng(0).permutation(len(values))  # grouping must not need order
    result = one_way_anova(values[order], groups[order])
    assert result["F"] == pytest.approx(7.121019471642447, rel=1e-12)
    assert result["p"] == pytest.approx(0.0002812242314534544, rel=1e-9)
    assert (result["groups"], result["df_between"], result["df_within"]) == (5, 4, 34)
    parts = split_by_group(values[order], groups[order])
    assert sorted(len(p) for p in parts) == sorted(len(v) for v in MUSSELS.values())


def test_correctness_anova_and_undefined_cases():
    tax = tiny_taxonomy()
    result = correctness_anova(TRUE, PRED, tax, "family")
    correct = (TRUE == PRED).astype(float)
    expected = stats.f_oneway(correct[:5], correct[5:9], correct[9:])
    assert result["F"] == pytest.approx(expected.statistic)
    assert result["p"] == pytest.approx(expected.pvalue)
    all_right = correctness_anova(TRUE, TRUE, tax, "family")
    assert np.isnan(all_right["F"]) and "identical" in all_right["note"]
    one_group = one_way_anova([0, 1, 1], [0, 0, 0])
    assert np.isnan(one_group["p"]) and one_group["note"]


def test_head_tail_split_and_scores_by_hand():
    tail, head = head_tail_split(tiny_taxonomy().counts)
    assert tail.tolist() == [0, 5] and head.tolist() == [3, 4]
    scores = head_tail_scores(TRUE, PRED, tiny_taxonomy())
    assert scores["tail_macro_f1"] == pytest.approx((2 / 3 + 0) / 2)
    assert scores["head_macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert scores["tail_max_train_images"] == 7 and scores["head_min_train_images"] == 45


@pytest.mark.parametrize("seed", range(3))
def test_group_macro_f1_matches_sklearn_definition(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 30, size=300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 40, size=300))
    group = rng.choice(35, size=10, replace=False)  # some group classes may have no images
    mask = np.isin(y_true, group)
    expected = f1_score(y_true[mask], y_pred[mask], labels=np.unique(y_true[mask]), average="macro")
    assert group_macro_f1(y_true, y_pred, group) == pytest.approx(expected)
    assert np.isnan(group_macro_f1(y_true, y_pred, [99]))


def test_evaluate_predictions_is_json_ready_and_complete():
    out = evaluate_predictions(TRUE, PRED, tiny_taxonomy(), k=2)
    json.dumps(out, allow_nan=False)
    assert out["top1_accuracy"] == pytest.approx(0.6)
    assert out["species_accuracy"] == pytest.approx(0.6)
    assert [r["name"] for r in out["family_best"]] == ["G", "F"]
    assert out["anova"]["family"]["F"] is not None and "genus" in out["anova"]
    assert out["by_training_count"][0]["se"] is None
    assert out["head_macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
