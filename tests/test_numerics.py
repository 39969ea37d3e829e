"""herbens.core.numerics against slow obvious references on tiny inputs."""

import math

import numpy as np
import pytest

from herbens.core import numerics as nx


def _rows(seed=0, shape=(4, 5), scale=30.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def test_log_softmax_softmax_and_logsumexp_match_the_direct_formula():
    x = _rows()
    for i, row in enumerate(x.astype(np.float64)):
        total = sum(math.exp(v) for v in row)
        for j, v in enumerate(row):
            assert nx.log_softmax(x)[i, j] == pytest.approx(v - math.log(total), abs=1e-4)
            assert nx.softmax(x)[i, j] == pytest.approx(math.exp(v) / total, abs=1e-6)
        assert nx.logsumexp(x)[i] == pytest.approx(math.log(total), rel=1e-6)
    assert nx.log_softmax(x).dtype == np.float32 and nx.softmax(x).dtype == np.float32
    assert nx.logsumexp(x, keepdims=True).shape == (4, 1)


def test_log_softmax_does_not_overflow_on_large_scores():
    x = np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32)
    assert np.allclose(nx.log_softmax(x), [[-math.log(2), -math.log(2), -2000 - math.log(2)]], atol=1e-3)
    assert nx.logsumexp(x)[0] == pytest.approx(1000 + math.log(2), rel=1e-6)


def test_log_prior_is_the_log_frequency_with_empty_classes_clamped_to_one():
    out = nx.log_prior([3, 0, 1])
    counts = [3, 1, 1]
    assert out.dtype == np.float32
    assert np.allclose(out, [math.log(c / 5) for c in counts])


@pytest.mark.parametrize("k", [2, 3, 5])
def test_stratified_folds_are_disjoint_cover_every_row_and_balance_each_class(k):
    labels = np.array([0] * 7 + [1] * 4 + [2] * 1 + [3] * 9)
    folds = nx.stratified_folds(labels, k, seed=3)
    assert folds.fold.shape == labels.shape and set(folds.fold.tolist()) <= set(range(k))
    held = [set(np.flatnonzero(folds.fold == i).tolist()) for i in range(k)]
    assert set().union(*held) == set(range(len(labels)))  # every row held out once
    assert sum(len(h) for h in held) == len(labels)         # ... and only once
    sizes = np.bincount(folds.fold, minlength=k)
    assert sizes.max() - sizes.min() <= 1
    for c in np.unique(labels):
        per_fold = np.bincount(folds.fold[labels == c], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    for j in range(k):
        assert np.array_equal(folds.train_mask(j), folds.fold != j)
    assert folds.train_mask(folds.full).all() and folds.num_fits == k + 1


def test_stratified_folds_are_seeded_and_default_to_at_most_five():
    labels = np.repeat(np.arange(4), 6)
    assert np.array_equal(nx.stratified_folds(labels, seed=1).fold, nx.stratified_folds(labels, seed=1).fold)
    assert not np.array_equal(nx.stratified_folds(labels, seed=1).fold, nx.stratified_folds(labels, seed=2).fold)
    assert nx.stratified_folds(labels).k == 5 and nx.stratified_folds(labels[:3]).k == 3


def test_cross_fit_never_evaluates_a_row_with_a_fit_that_saw_it():
    labels = np.repeat(np.arange(3), 5)
    folds = nx.stratified_folds(labels, 4, seed=0)
    seen = []

    def fit(rows):  # planted: the "value" is the set of rows it was fitted on
        seen.append(frozenset(rows.tolist()))
        return seen[-1]

    def evaluate(value, rows):
        return {"leak": np.array([r in value for r in rows]), "row": rows.copy()}

    out = nx.cross_fit(folds, fit, evaluate)
    assert out.value == frozenset(range(15)) and out.in_sample["leak"].all()
    assert not out.out_of_fold["leak"].any()
    assert np.array_equal(out.out_of_fold["row"], np.arange(15))  # placed back in row order
    assert len(seen) == 1 + 4 and all(len(s) < 15 for s in seen[1:])
    for i, fitted in enumerate(out.fold_values):
        assert fitted == frozenset(np.flatnonzero(folds.fold != i).tolist())


def test_cross_fit_without_two_folds_has_no_out_of_fold_outcomes():
    out = nx.cross_fit(nx.Folds(np.zeros(4, dtype=np.int64), 1), lambda rows: len(rows),
                       lambda v, rows: np.full(len(rows), v))
    assert out.out_of_fold is None and out.value == 4 and nx.mean_or_none(out.out_of_fold) is None


def test_cross_fit_grid_is_optimistic_in_sample_and_honest_out_of_fold():
    # Candidate g fits only row g perfectly (loss 0) and costs 1 elsewhere; one row is an
    # outlier that only candidate 0 fits. In sample, the candidate that fits the most rows wins;
    # out of fold, each row is judged by a choice made without it.
    losses = np.ones((6, 3))
    losses[1:, 1] = 0.0        # candidate 1 fits rows 1..5
    losses[0, 0] = 0.0         # candidate 0 fits row 0 only
    losses[0, 2] = 5.0
    folds = nx.Folds(np.arange(6) % 3, 3)
    out = nx.cross_fit_grid(losses, folds)
    assert out.value == 1
    assert np.array_equal(out.in_sample, losses[np.arange(6), 1])
    # slow reference: refit by brute force without each fold
    expected = np.empty(6)
    for i in range(3):
        rest = [r for r in range(6) if r % 3 != i]
        best = min(range(3), key=lambda g: (sum(losses[r, g] for r in rest), g))
        for r in range(6):
            if r % 3 == i:
                expected[r] = losses[r, best]
    assert np.array_equal(out.out_of_fold, expected)
    assert nx.mean_or_none(out.out_of_fold) >= nx.mean_or_none(out.in_sample)
