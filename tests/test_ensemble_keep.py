"""Planted runs, many seeds: the keep rule's false-keep rate, the ensemble against its best
member, a real prior shift, and the honest estimate against the test score (issue 24).

Each seed writes tiny validation stores, fits with :func:`fit_ensemble` and predicts an
in-memory test split with :func:`predict_chunk` (the path ``herbens predict`` takes), so the
whole simulation is numpy on small arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

from herbens.ensemble.combine import Chunk, ClassSpace, predict_chunk
from herbens.ensemble.options import EnsembleOptions
from herbens.ensemble.pipeline import fit_ensemble
from herbens.ensemble.stores import align_split, class_space, labelled, load_runs
from herbens.ensemble.keep_rule import KEEP_ALPHA, _Pair, keep_test
from herbens.metrics import macro_f1
from test_ensemble import make_taxonomy, noisy_logits, write_run

# (validation rows, classes): the 30 rows x 12 species, and two others.
CONFIGS = ((30, 12), (60, 8), (120, 20))
SEEDS_PER_CONFIG = 16  # 48 seeds in all
TEST_ROWS = 400


def _fit(tmp_path, name, tax, val_logits, y_val, nested, **options):
    """Fit on stores holding only the validation split (the test split is scored in memory)."""
    runs = [write_run(tmp_path / name, f"r{r}", tax,
                      {"val": ([f"v{i}" for i in range(len(y_val))], logits, y_val),
                       "test": (["t0"], {lv: a[:1] for lv, a in logits.items()}, None)})
            for r, logits in enumerate(val_logits)]
    loaded = load_runs(runs)
    space = class_space(loaded, log=lambda m: None)
    val = labelled(align_split(loaded, "val", space, exact=False, log=lambda m: None))
    opts = EnsembleOptions(**options)
    opts.check(len(runs))
    opts.chunk_rows = 4096
    levels = tuple(lv for lv in ("species", "genus", "family") if lv in val_logits[0])
    params, steps, info = fit_ensemble(val, space, opts, levels, len(runs), log=lambda m: None, nested=nested)
    return params, steps, info, space


def _test_f1(params, space: ClassSpace, test_logits, y_test) -> float:
    half = [{lv: np.asarray(a, dtype=np.float16).astype(np.float32) for lv, a in run.items()} for run in test_logits]
    pred = predict_chunk(Chunk.of_arrays(half), params, space)[0]
    return macro_f1(y_test, space.species[pred])


def _identical_runs(rng, classes, n_val):
    """Three statistically identical runs, uniform prior, genus and family heads of pure noise."""
    tax = make_taxonomy(species=classes, genera=4, families=2)
    y = {"val": rng.integers(0, classes, n_val), "test": rng.integers(0, classes, TEST_ROWS)}
    logits = {s: [{"species": noisy_logits(rng, v, classes, 1.5, 1.0), "genus": rng.standard_normal((len(v), 4)),
                   "family": rng.standard_normal((len(v), 2))} for _ in range(3)] for s, v in y.items()}
    return tax, y, logits


def _seeds():
    return [(config, seed) for config in CONFIGS for seed in range(SEEDS_PER_CONFIG)]


def test_flipped_gains_match_macro_f1_recomputed_for_every_flip():
    """The keep rule counts only the rows and classes a step touches; the slow reference
    recomputes herbens.metrics.macro_f1 over every row for every flip."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        n, classes = int(rng.integers(5, 60)), int(rng.integers(2, 15))
        y, current = rng.integers(0, classes, n), rng.integers(0, classes + 2, n)  # some never-true classes
        alternative = current.copy()
        moved = rng.random(n) < rng.random()
        alternative[moved] = rng.integers(0, classes + 3, moved.sum())
        pair = _Pair(y, current, alternative)
        flips = rng.random((7, n)) < 0.5
        reference = [macro_f1(y, np.where(f, current, alternative)) - macro_f1(y, np.where(f, alternative, current))
                     for f in flips]
        assert np.allclose(pair.flipped_gains(flips), reference)
        assert pair.gain == pytest.approx(macro_f1(y, alternative) - macro_f1(y, current))


def test_keep_rule_needs_enough_changed_rows_and_pays_for_choosing():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 45)
    current = y.copy()
    current[:12] = (y[:12] + 1) % 10  # 12 of 45 wrong
    three = current.copy()
    three[:3] = y[:3]  # mends 3 rows and harms none: too few rows to tell from chance
    assert not keep_test(y, current, [three]).kept
    eight = current.copy()
    eight[:8] = y[:8]
    test = keep_test(y, current, [eight])
    assert test.kept and test.changed == 8 and test.p <= KEEP_ALPHA
    assert not keep_test(y, current, [current.copy()]).kept  # changes nothing
    # The best of many noise alternatives, each flipping 6 rows at random, is refused far more
    # often than 1 in 20: the p-value is that of the maximum over the alternatives.
    noise = []
    for seed in range(20):
        r = np.random.default_rng(seed)
        alternatives = []
        for _ in range(8):
            a = current.copy()
            rows = r.choice(45, 6, replace=False)
            a[rows] = r.integers(0, 10, 6)
            alternatives.append(a)
        noise.append(keep_test(y, current, alternatives).kept)
    assert sum(noise) <= 1


@pytest.mark.slow
def test_identical_noise_runs_keep_a_step_on_at_most_5_percent_of_seeds(tmp_path):
    """Every fitted step can only fit noise here: kept on at most 5 % of 48 seeds, and the
    result on average no worse on test than plain equal weights."""
    kept, change = 0, []
    for (n_val, classes), seed in _seeds():
        rng = np.random.default_rng(1000 * classes + seed)
        tax, y, logits = _identical_runs(rng, classes, n_val)
        params, steps, _, space = _fit(tmp_path, f"c{classes}s{seed}", tax, logits["val"], y["val"], nested=False)
        fitted = [s for s in steps if s["step"].startswith("+")]
        kept += any(s["kept"] for s in fitted)
        equal = params.replace(weights=np.full(3, 1 / 3), temperatures={lv: np.ones(3) for lv in params.temperatures},
                               tau=0.0, alpha=0.0, beta=0.0)
        change.append(_test_f1(params, space, logits["test"], y["test"])
                      - _test_f1(equal, space, logits["test"], y["test"]))
    assert kept <= 0.05 * len(_seeds()), kept
    assert np.mean(change) >= -0.002, np.mean(change)


def _strong_and_weak(rng, classes=12, n_val=150):
    """One strong run, a weak cross-entropy run and a weak ArcFace-like one (cosines x 30-64)."""
    tax = make_taxonomy(species=classes, genera=4, families=2)
    y = {"val": rng.integers(0, classes, n_val), "test": rng.integers(0, classes, TEST_ROWS)}
    scale = rng.uniform(30, 64)
    logits = {s: [{"species": noisy_logits(rng, v, classes, 2.5, 1.0)},
                  {"species": noisy_logits(rng, v, classes, 0.8, 1.0)},
                  {"species": scale * 0.05 * noisy_logits(rng, v, classes, 0.8, 1.0)}] for s, v in y.items()}
    return tax, y, logits


def _prior_shift(rng, classes=20, planted=1.0):
    """Three runs biased by ``planted * log(prior)`` (long-tailed prior), balanced validation."""
    counts = np.round(100 * 0.85 ** np.arange(classes)).astype(int) + 1
    tax = make_taxonomy(species=classes, genera=5, families=2, counts=counts)
    log_prior = np.log(counts / counts.sum())
    y = {"val": np.repeat(np.arange(classes), 8), "test": np.repeat(np.arange(classes), TEST_ROWS // classes)}
    logits = {s: [{"species": noisy_logits(rng, v, classes, 2.0, 1.0) + planted * log_prior} for _ in range(3)]
              for s, v in y.items()}
    return tax, y, logits


def _planted(tmp_path, name, generate, seeds=40, nested=False):
    """Per seed: (fitted params, table, summary's val entry, class space, logits, labels).

    Without ``nested`` the applied fit is the same (test_nesting_leaves_the_applied_fit_unchanged)
    at a quarter of the cost."""
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        tax, y, logits = generate(rng)
        params, steps, info, space = _fit(tmp_path, f"{name}{seed}", tax, logits["val"], y["val"], nested=nested)
        yield params, steps, info, space, logits["test"], y["test"]


@pytest.mark.slow
def test_one_strong_two_weak_ensemble_is_at_least_the_strong_member(tmp_path):
    """The ArcFace-like weak run would swamp a plain logit mean; on one scale, the ensemble's
    test macro-F1 is at least the strong member's minus one standard error (over 40 seeds)."""
    diff = []
    for params, _, _, space, test, y in _planted(tmp_path, "sw", _strong_and_weak):
        strong = params.replace(weights=np.eye(3)[0], tau=0.0, alpha=0.0, beta=0.0)
        diff.append(_test_f1(params, space, test, y) - _test_f1(strong, space, test, y))
    assert np.mean(diff) >= -np.std(diff, ddof=1) / np.sqrt(len(diff)), diff


@pytest.mark.slow
def test_real_prior_shift_keeps_and_recovers_tau(tmp_path):
    """Runs biased by 1.0 * log(prior): tau is kept on (nearly) every seed and equals the bias
    in the ensemble's own scale (the runs' logits enter divided by their temperatures)."""
    kept, error = 0, []
    for params, steps, *_ in _planted(tmp_path, "prior", _prior_shift):
        kept += next(s for s in steps if s["step"].startswith("+ inverse")).get("kept") is True
        scale = float(np.sum(params.weights / params.temperatures["species"]))
        error.append(params.tau - 1.0 * scale)
    assert kept >= 38
    assert abs(np.median(error)) < 0.15, error


@pytest.mark.slow
def test_honest_estimate_is_unbiased_where_out_of_fold_is_not(tmp_path):
    """A small real prior shift (0.3): tau is kept on the seeds where validation flatters it,
    so the out-of-fold score of the final ensemble runs above its test score; the nested
    (honest) one does not, within 0.01 on average over 40 seeds."""
    honest, oof = [], []
    for params, _, info, space, test, y in _planted(tmp_path, "small", lambda rng: _prior_shift(rng, planted=0.3),
                                                   nested=True):
        f1 = _test_f1(params, space, test, y)
        honest.append(info["honest"]["species_macro_f1"] - f1)
        oof.append(info["out_of_fold"]["species_macro_f1"] - f1)
    assert abs(np.mean(honest)) <= 0.01, np.mean(honest)
    assert np.mean(oof) > np.mean(honest), (np.mean(oof), np.mean(honest))


def test_nesting_leaves_the_applied_fit_unchanged(tmp_path):
    """The top group of the nested fit is the plain cross-fitted procedure: same values, same
    table (the simulations above run it without nesting, for speed)."""
    rng = np.random.default_rng(5)
    tax, y, logits = _prior_shift(rng, classes=8, planted=0.8)
    flat = _fit(tmp_path, "flat", tax, logits["val"], y["val"], nested=False)
    nested = _fit(tmp_path, "nested", tax, logits["val"], y["val"], nested=True)
    assert flat[0].to_json() == nested[0].to_json()
    for a, b in zip(flat[1], nested[1]):
        assert (a["step"], a["kept"], a["out_of_fold"]) == (b["step"], b["kept"], b["out_of_fold"])
        assert "honest" in b and "honest" not in a
    assert nested[2]["nested"] and not flat[2]["nested"]
