"""The streaming ensembler: planted parameters, exactness against in-memory numpy, alignment,
refusals that name the run, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from herbens.cli.main import main
from herbens.data.taxonomy import Taxonomy
from herbens.ensemble.combine import Chunk, ClassSpace, Params, predict_chunk
from herbens.ensemble.crossfit import NestedFolds, evaluate_fits
from herbens.ensemble.pipeline import ensemble_runs
from herbens.ensemble.stores import align_split, class_space, labelled, load_runs
from herbens.ensemble.submission import read_submission
from herbens.ensemble.tau import fit_tau_nll
from herbens.core.errors import HerbensError
from herbens.core.numerics import stratified_folds
from herbens.stores.logits import logits_dir, write_logits

NO_FIT = dict(weights="equal", calibrate=False, tau="none", hierarchy="none")


# ----------------------------------------------------------------------------------------
# Fake runs
# ----------------------------------------------------------------------------------------
def make_taxonomy(species=12, genera=4, families=2, counts=None, first_id=100) -> Taxonomy:
    """Species i in genus i % genera; genus g in family g % families; category_ids not contiguous."""
    to_genus = np.arange(species) % genera
    to_family = (np.arange(genera) % families)[to_genus]
    counts = np.full(species, 10) if counts is None else counts
    return Taxonomy(first_id + 3 * np.arange(species), [f"Planta sp{i}" for i in range(species)],
                    [f"G{g}" for g in range(genera)], [f"F{f}" for f in range(families)],
                    to_genus, to_family, counts)


def write_run(root, name, taxonomy, splits, keep_views=False, order_seed=None):
    """A run directory; ``splits``: split -> (ids, {level: array}, labels or None).

    With ``order_seed`` each split's rows are stored in a shuffled order (same content).
    """
    run = root / name
    taxonomy.save(run / "taxonomy.json")
    for split, (ids, logits, labels) in splits.items():
        order = np.arange(len(ids))
        if order_seed is not None:
            order = np.random.default_rng(order_seed).permutation(len(ids))
        write_logits(run, split, [ids[i] for i in order], {lv: a[order] for lv, a in logits.items()},
                     {"taxonomy_hash": taxonomy.hash, "model": name},
                     labels=None if labels is None else labels[order], keep_views=keep_views)
    return run


def noisy_logits(rng, labels, classes, signal, sigma):
    return signal * np.eye(classes)[labels] + sigma * rng.standard_normal((len(labels), classes))


def hierarchical_runs(tmp_path, num_runs=3, n_val=90, n_test=40, seed=0, views=None):
    """Runs with species, genus and family heads of varying quality; labels shared."""
    rng = np.random.default_rng(seed)
    tax = make_taxonomy(counts=rng.integers(1, 50, 12))
    data = {"val": rng.integers(0, 12, n_val), "test": rng.integers(0, 12, n_test)}
    runs, arrays = [], []
    for r in range(num_runs):
        splits, mine = {}, {}
        for split, y in data.items():
            logits = {"species": noisy_logits(rng, y, 12, 2.0, 1.0 + r),
                      "genus": noisy_logits(rng, tax.species_to_genus[y], 4, 2.0, 1.0),
                      "family": noisy_logits(rng, tax.species_to_family[y], 2, 2.0, 1.0)}
            if views:
                logits["species"] = logits["species"][:, None, :] + rng.standard_normal((len(y), views, 12))
            splits[split] = ([f"img{split}{i:03d}" for i in range(len(y))], logits,
                             y if split == "val" else None)
            mine[split] = logits
        runs.append(write_run(tmp_path / "runs", f"run{r}", tax, splits, keep_views=bool(views),
                              order_seed=None if r == 0 else 100 + r))
        arrays.append(mine)
    return runs, arrays, tax, data


def half(x):
    """What the store keeps: float16, as float64 for the reference computations."""
    return np.asarray(x, dtype=np.float16).astype(np.float64)


def log_softmax64(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def naive_scores(arrays, summary, tax, split="test"):
    """Load-everything numpy reference of the mean-mode scores, from the fitted parameters."""
    w, scale = np.asarray(summary["weights"]), summary["ensemble_scale"]
    t = {lv: np.asarray(ts) for lv, ts in summary["temperatures"].items()}

    def combined(level):
        return sum(w[r] * scale / t[level][r] * half(a[split][level]) for r, a in enumerate(arrays))

    scores = combined("species")
    counts = np.maximum(tax.counts, 1)
    scores = scores - summary["tau"] * np.log(counts / counts.sum())
    scores = scores + summary["alpha"] * log_softmax64(combined("genus"))[:, tax.species_to_genus]
    scores = scores + summary["beta"] * log_softmax64(combined("family"))[:, tax.species_to_family]
    return scores


def predictions(path):
    return read_submission(path).set_index("Id")["Predicted"]


# ----------------------------------------------------------------------------------------
# Planted parameters are recovered
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def noise_runs(tmp_path_factory):
    """Three runs seeing the same labels with noise 1, 1.5, 2.5: the Bayes combination weights
    are proportional to 1/sigma^2 and each run's calibrated temperature is sigma^2 / signal."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(7)
    classes, signal, sigmas = 20, 2.0, (1.0, 1.5, 2.5)
    tax = make_taxonomy(species=classes, genera=5, families=2)
    y_val, y_test = rng.integers(0, classes, 3000), rng.integers(0, classes, 30)
    runs = []
    for r, sigma in enumerate(sigmas):
        splits = {split: ([f"{split}{i}" for i in range(len(y))],
                          {"species": noisy_logits(rng, y, classes, signal, sigma)}, y if split == "val" else None)
                  for split, y in (("val", y_val), ("test", y_test))}
        runs.append(write_run(root, f"sigma{sigma}", tax, splits))
    inverse = 1 / np.square(sigmas)
    return root, runs, inverse / inverse.sum(), signal * inverse.sum(), np.square(sigmas) / signal


def _step(summary, prefix):
    return next(s for s in summary["steps"] if s["step"].startswith(prefix))


def test_nll_weights_recover_planted_weights(noise_runs):
    root, runs, weights, scale, _ = noise_runs
    summary = ensemble_runs(runs, root / "nll.csv", weights="fit", weight_objective="nll", calibrate=False,
                            tau="none", hierarchy="none", progress=False, log=lambda m: None)
    np.testing.assert_allclose(summary["weights"], weights, atol=0.04)
    assert summary["ensemble_scale"] == pytest.approx(scale, rel=0.1)
    assert _step(summary, "+ weights")["kept"]


def test_f1_weights_favour_the_cleaner_runs(noise_runs):
    root, runs, *_ = noise_runs
    summary = ensemble_runs(runs, root / "f1.csv", weights="fit", calibrate=False, tau="none",
                            hierarchy="none", progress=False, log=lambda m: None)
    w = summary["weights"]
    assert w[0] > w[1] > w[2]
    plain = _step(summary, "mean of")["out_of_fold"]["species_macro_f1"]
    assert summary["val"]["out_of_fold"]["species_macro_f1"] > plain


def test_calibration_recovers_temperatures(noise_runs):
    root, runs, _, _, temperatures = noise_runs
    summary = ensemble_runs(runs, root / "t.csv", weights="equal", tau="none", hierarchy="none",
                            progress=False, log=lambda m: None)
    calibrated = _step(summary, "mean of 3 runs on one scale")
    np.testing.assert_allclose(calibrated["params"]["temperatures"]["species"], temperatures, rtol=0.1)
    # Equal weights on calibrated logits is the Bayes combination here: better than the plain
    # mean, and neither the plain mean nor a single run replaces it.
    plain = _step(summary, "mean of 3 runs (logit")
    assert calibrated["out_of_fold"]["species_macro_f1"] > plain["out_of_fold"]["species_macro_f1"]
    assert not _step(summary, "+ instead of the mean")["kept"]
    assert summary["temperatures"] == calibrated["params"]["temperatures"]


@pytest.mark.parametrize("planted", [1.0, -0.7])
def test_tau_recovers_planted_prior_bias(tmp_path, planted):
    """A run biased by ``planted * log(prior)``; a negative bias is what an over-adjusting
    (class-balanced, logit-adjusted) run looks like, and a negative tau undoes it."""
    rng = np.random.default_rng(3)
    classes = 30
    counts = np.round(100 * 0.85 ** np.arange(classes)).astype(int) + 1
    tax = make_taxonomy(species=classes, genera=6, families=2, counts=counts)
    log_prior = np.log(counts / counts.sum())
    y_val = np.repeat(np.arange(classes), 60)  # balanced, like macro-F1 weighs classes
    y_test = rng.integers(0, classes, 20)
    splits = {split: ([f"{split}{i}" for i in range(len(y))],
                      {"species": noisy_logits(rng, y, classes, 2.5, 1.0) + planted * log_prior},
                      y if split == "val" else None) for split, y in (("val", y_val), ("test", y_test))}
    run = write_run(tmp_path, "biased", tax, splits)
    summary = ensemble_runs([run], tmp_path / "tau.csv", weights="equal", calibrate=False, tau="fit",
                            hierarchy="none", progress=False, log=lambda m: None)
    assert summary["tau"] == pytest.approx(planted, abs=0.25)
    assert _step(summary, "+ inverse frequency")["kept"]


def test_log_loss_tau_is_the_minimum_of_each_fits_log_loss(tmp_path):
    """fit_tau_nll (Newton) against the slow reference: each fit's mean log-loss over its own
    training rows on a fine grid of tau, for every one of the nested fits."""
    rng = np.random.default_rng(4)
    classes = 9
    counts = np.round(60 * 0.7 ** np.arange(classes)).astype(int) + 1
    tax = make_taxonomy(species=classes, genera=3, families=1, counts=counts)
    log_prior = np.log(counts / counts.sum())
    y_val = np.repeat(np.arange(classes), 12)
    splits = {"val": ([f"v{i}" for i in range(len(y_val))],
                      {"species": noisy_logits(rng, y_val, classes, 1.5, 1.0) + 0.6 * log_prior}, y_val),
              "test": (["t0"], {"species": np.zeros((1, classes))}, None)}
    loaded = load_runs([write_run(tmp_path, "r", tax, splits)])
    space = class_space(loaded)
    val = labelled(align_split(loaded, "val", space, exact=False))
    folds = NestedFolds.of_labels(val.labels)
    fits = [Params.initial(1)] * folds.num_fits
    taus = fit_tau_nll(val, folds, fits, chunk_rows=13)
    z = np.asarray(splits["val"][1]["species"], dtype=np.float16).astype(np.float64)
    grid = np.arange(-1.0, 3.0, 0.001)
    for j in range(folds.num_fits):
        rows = folds.train_mask(j)
        scores = z[rows][None] - grid[:, None, None] * space.log_prior.astype(np.float64)
        nll = (np.log(np.exp(scores).sum(axis=2)) - scores[:, np.arange(rows.sum()), val.labels[rows]]).mean(axis=1)
        assert taus[j] == pytest.approx(grid[np.argmin(nll)], abs=2e-3), j
    assert taus[folds.full] == pytest.approx(0.6, abs=0.3)  # undoes the planted bias


def test_hierarchy_recovers_planted_alpha_beta(tmp_path):
    """Species, genus and family heads are exact log-posteriors of independent evidence, so the
    Bayes score is species + 1 * log p(genus) + 1 * log p(family)."""
    rng = np.random.default_rng(5)
    tax = make_taxonomy(species=48, genera=12, families=4)
    y_val, y_test = np.repeat(np.arange(48), 60), rng.integers(0, 48, 20)

    def evidence(y, classes, strength):
        return strength * noisy_logits(rng, y, classes, strength, 1.0)

    splits = {split: ([f"{split}{i}" for i in range(len(y))],
                      {"species": evidence(y, 48, 1.0), "genus": evidence(tax.species_to_genus[y], 12, 1.4),
                       "family": evidence(tax.species_to_family[y], 4, 1.4)},
                      y if split == "val" else None) for split, y in (("val", y_val), ("test", y_test))}
    run = write_run(tmp_path, "heads", tax, splits)
    summary = ensemble_runs([run], tmp_path / "h.csv", weights="equal", calibrate=False, tau="none",
                            hierarchy="fit", progress=False, log=lambda m: None)
    assert summary["alpha"] == pytest.approx(1.0, abs=0.4)
    assert summary["beta"] == pytest.approx(1.0, abs=0.4)
    assert _step(summary, "+ hierarchy")["kept"]


# ----------------------------------------------------------------------------------------
# Cross-fitting: nothing kept on noise, planted effects still found
# ----------------------------------------------------------------------------------------
# The keep rule's false-keep rate on identical noise runs: tests/test_ensemble_keep.py (48 seeds).


def test_in_sample_out_of_fold_and_honest_scores_are_all_reported(noise_runs):
    root, runs, *_ = noise_runs
    summary = ensemble_runs(runs, root / "both.csv", progress=False, log=lambda m: None)
    assert summary["val"]["folds"] == 5 and summary["val"]["nested"]
    for step in summary["steps"]:
        assert set(step["in_sample"]) == set(step["out_of_fold"]) == set(step["honest"])
        assert "species_macro_f1" in step["in_sample"]
    # Rows with nothing fitted score the same either way.
    plain = _step(summary, "mean of")
    assert plain["in_sample"] == plain["out_of_fold"]


def test_useless_run_gets_no_weight(tmp_path):
    rng = np.random.default_rng(8)
    tax = make_taxonomy(species=10, genera=5, families=2)
    y = {"val": rng.integers(0, 10, 300), "test": rng.integers(0, 10, 50)}
    good = {s: ([f"{s}{i}" for i in range(len(v))], {"species": noisy_logits(rng, v, 10, 2.0, 1.0)},
                v if s == "val" else None) for s, v in y.items()}
    useless = {s: (ids, {"species": 3.0 * rng.standard_normal((len(ids), 10))}, labels)
               for s, (ids, _, labels) in good.items()}
    runs = [write_run(tmp_path, "good", tax, good), write_run(tmp_path, "useless", tax, useless)]
    summary = ensemble_runs(runs, tmp_path / "w.csv", calibrate=False, tau="none", hierarchy="none",
                            progress=False, log=lambda m: None)
    # Either the good run alone replaces the mean, or fitted weights drop the useless one.
    assert _step(summary, "+ instead of the mean")["kept"] or _step(summary, "+ weights")["kept"]
    assert summary["weights"][1] < 0.05


def test_arcface_scaled_run_keeps_its_genus_and_family_share(tmp_path):
    """Run 0's species head is ArcFace-scaled (x20) and its genus/family heads plain CE, like
    the other runs': per-level temperatures keep its genus/family terms at their share, where
    the species temperature would have divided them by ~20."""
    rng = np.random.default_rng(12)
    tax = make_taxonomy(species=12, genera=4, families=2)
    y = {"val": np.repeat(np.arange(12), 40), "test": rng.integers(0, 12, 40)}
    runs = []
    for r in range(3):
        splits = {s: ([f"{s}{i}" for i in range(len(v))],
                      {"species": (20.0 if r == 0 else 1.0) * noisy_logits(rng, v, 12, 1.0, 1.0),
                       "genus": noisy_logits(rng, tax.species_to_genus[v], 4, 1.0, 1.0),
                       "family": noisy_logits(rng, tax.species_to_family[v], 2, 1.0, 1.0)},
                      v if s == "val" else None) for s, v in y.items()}
        runs.append(write_run(tmp_path, f"r{r}", tax, splits))
    summary = ensemble_runs(runs, tmp_path / "a.csv", weights="equal", tau="none", progress=False,
                            log=lambda m: None)
    t = {lv: np.asarray(v) for lv, v in summary["temperatures"].items()}
    w = np.asarray(summary["weights"])
    assert t["species"][0] > 10 * t["species"][1:].max()  # calibration saw the scale
    for level in ("genus", "family"):
        share = (w / t[level]) / (w / t[level]).sum()
        assert share[0] > 0.25, (level, share)
        species_share = (w / t["species"]) / (w / t["species"]).sum()
        assert species_share[0] < 0.05  # what dividing by the species temperature gave
    assert _step(summary, "+ hierarchy")["kept"]


def test_tiny_validation_fits_nothing_and_says_so(tmp_path):
    rng = np.random.default_rng(1)
    tax = make_taxonomy()
    y = {"val": rng.integers(0, 12, 9), "test": rng.integers(0, 12, 5)}
    runs = [write_run(tmp_path, f"r{r}", tax, {s: ([f"{s}{i}" for i in range(len(v))],
                                                   {"species": noisy_logits(rng, v, 12, 2, 1)},
                                                   v if s == "val" else None) for s, v in y.items()})
            for r in range(2)]
    messages = []
    summary = ensemble_runs(runs, tmp_path / "t.csv", progress=False, log=messages.append)
    assert any("9 validation rows for 12 classes" in m and "simpler" in m for m in messages)
    assert summary["weights"] == [0.5, 0.5] and summary["tau"] == 0.0
    assert all(s["kept"] is not True for s in summary["steps"])


def test_out_of_fold_and_honest_predictions_use_fits_that_never_saw_the_row(tmp_path):
    runs, arrays, tax, _ = hierarchical_runs(tmp_path, num_runs=1)
    loaded = load_runs(runs)
    space = class_space(loaded)
    val = labelled(align_split(loaded, "val", space, exact=False))
    folds = NestedFolds.of_labels(val.labels)
    assert folds.num_groups == folds.k + 1 and folds.num_fits == (folds.k + 1) ** 2
    fits = [Params.initial(1).replace(tau=float(j)) for j in range(folds.num_fits)]  # fit j: tau = j
    ins, oof, honest = evaluate_fits(val, folds, [fits, [fits[0]] * folds.num_fits], chunk_rows=7)
    z = np.asarray(arrays[0]["val"]["species"], dtype=np.float16).astype(np.float32)
    lp = space.log_prior

    def argmax_at(tau, rows=slice(None)):
        return (z[rows] - np.asarray(tau, dtype=np.float32)[:, None] * lp).argmax(axis=1)

    k = folds.k
    assert ins[:, 0].tolist() == argmax_at(np.full(len(z), folds.full)).tolist()  # the top group's full fit
    for g in range(folds.num_groups):  # group g: each of its rows under the fit that left its inner fold out
        rows = folds.inner[g] >= 0
        assert oof[rows, g, 0].tolist() == argmax_at(g * (k + 1) + folds.inner[g][rows], rows).tolist()
        assert (oof[~rows, g] == -1).all()
        assert folds.train_mask(g * (k + 1) + k).sum() == rows.sum()
    assert (~folds.in_group(0))[folds.top.fold == 0].all()  # group g never holds outer fold g
    assert honest[:, 0].tolist() == argmax_at(folds.top.fold * (k + 1) + k).tolist()  # outer fold's group
    assert (oof[:, -1, 1] == ins[:, 1]).all() and (honest[:, 1] == ins[:, 1]).all()  # nothing fitted


def test_folds_are_stratified_and_fixed():
    labels = np.repeat(np.arange(7), [1, 2, 3, 5, 8, 13, 20])
    folds = stratified_folds(labels)
    again = stratified_folds(labels)
    assert folds.k == 5 and (folds.fold == again.fold).all()
    sizes = np.bincount(folds.fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for species in range(7):
        mine = folds.fold[labels == species]
        assert len(np.unique(mine)) == min(len(mine), 5)  # spread over as many folds as it can
        counts = np.bincount(mine, minlength=5)
        assert counts.max() - counts.min() <= 1 or len(mine) < 5


# ----------------------------------------------------------------------------------------
# The pure combination reproduces the ensemble from its JSON sidecar (herbens predict's path)
# ----------------------------------------------------------------------------------------
def test_sidecar_params_reproduce_predictions_on_in_memory_logits(tmp_path):
    runs, arrays, tax, _ = hierarchical_runs(tmp_path)
    ensemble_runs(runs, tmp_path / "s.csv", progress=False, log=lambda m: None)
    sidecar = json.loads((tmp_path / "s.json").read_text())
    params = Params.from_json(sidecar["params"])
    chunk = Chunk.of_arrays([{lv: half(a["test"][lv]) for lv in a["test"]} for a in arrays])
    pred, _, _ = predict_chunk(chunk, params, ClassSpace.of_taxonomy(tax))
    assert tax.category_of(pred).tolist() == predictions(tmp_path / "s.csv").tolist()


def test_params_from_json_reads_old_sidecars_and_refuses_bad_ones():
    old = {"weights": [0.5, 0.5], "temperatures": [2.0, 3.0], "scale": 1.0, "space": "logit", "tau": 0.1,
           "alpha": 0.5, "beta": 0.0, "mode": "mean", "vote_k": 5}
    params = Params.from_json(old)
    # Old versions divided every level by the one temperature list: read so.
    assert all(params.temperatures[lv].tolist() == [2.0, 3.0] for lv in ("species", "genus", "family"))
    assert Params.from_json(params.to_json()).to_json() == params.to_json()
    with pytest.raises(HerbensError, match="missing key 'weights'"):
        Params.from_json({"temperatures": [1.0]})
    with pytest.raises(HerbensError, match="temperatures.species must be 2 positive"):
        Params.from_json({**old, "temperatures": [1.0, 0.0]})


# ----------------------------------------------------------------------------------------
# Streaming is exact; rows align by id
# ----------------------------------------------------------------------------------------
def test_streaming_equals_in_memory_computation(tmp_path):
    runs, arrays, tax, _ = hierarchical_runs(tmp_path)
    out = {}
    for chunk_rows in (7, 100_000):
        path = tmp_path / f"chunk{chunk_rows}.csv"
        out[chunk_rows] = ensemble_runs(runs, path, chunk_rows=chunk_rows, top_k=3, progress=False,
                                        log=lambda m: None)
    small, whole = out[7], out[100_000]
    for key in ("weights", "temperatures", "ensemble_scale", "tau", "alpha", "beta", "steps"):
        assert small[key] == whole[key], key
    assert (tmp_path / "chunk7.csv").read_bytes() == (tmp_path / "chunk100000.csv").read_bytes()
    assert (tmp_path / "chunk7.topk.csv").read_bytes() == (tmp_path / "chunk100000.topk.csv").read_bytes()
    # The fitted ensemble did something, so the reference below checks more than an argmax.
    assert small["alpha"] or small["beta"] or small["tau"] or small["temperatures"]["species"] != [1.0] * 3
    expected = tax.category_of(naive_scores(arrays, small, tax).argmax(axis=1))
    got = predictions(tmp_path / "chunk7.csv")
    assert got.tolist() == expected.tolist()
    top = pd.read_csv(tmp_path / "chunk7.topk.csv", dtype={"Id": str})
    assert top["Predicted_1"].tolist() == got.tolist()
    assert (top["Score_1"] >= top["Score_2"]).all() and (top["Score_2"] >= top["Score_3"]).all()


def test_row_order_does_not_matter(tmp_path):
    rng = np.random.default_rng(11)
    tax = make_taxonomy()
    y = {"val": rng.integers(0, 12, 50), "test": rng.integers(0, 12, 30)}
    content = [{s: ([f"{s}{i}" for i in range(len(v))], {"species": noisy_logits(rng, v, 12, 2.0, 2.0)},
                    v if s == "val" else None) for s, v in y.items()} for _ in range(2)]
    a = write_run(tmp_path, "a", tax, content[0])
    b = write_run(tmp_path, "b", tax, content[1])
    b_shuffled = write_run(tmp_path, "b_shuffled", tax, content[1], order_seed=1)
    assert json.loads((logits_dir(b_shuffled, "test") / "image_ids.json").read_text()) != content[1]["test"][0]
    first = ensemble_runs([a, b], tmp_path / "ab.csv", progress=False, log=lambda m: None)
    second = ensemble_runs([a, b_shuffled], tmp_path / "abs.csv", progress=False, log=lambda m: None)
    assert (tmp_path / "ab.csv").read_bytes() == (tmp_path / "abs.csv").read_bytes()
    assert first["weights"] == second["weights"] and first["temperatures"] == second["temperatures"]


def test_validation_uses_images_common_to_all_runs(tmp_path):
    rng = np.random.default_rng(2)
    tax = make_taxonomy()
    y_val, y_test = rng.integers(0, 12, 40), rng.integers(0, 12, 10)
    runs, messages = [], []
    for name, keep in (("a", slice(0, 40)), ("b", slice(10, 40))):
        splits = {"val": ([f"v{i}" for i in range(40)][keep], {"species": noisy_logits(rng, y_val, 12, 2, 1)[keep]},
                          y_val[keep]),
                  "test": ([f"t{i}" for i in range(10)], {"species": noisy_logits(rng, y_test, 12, 2, 1)}, None)}
        runs.append(write_run(tmp_path, name, tax, splits))
    summary = ensemble_runs(runs, tmp_path / "s.csv", progress=False, log=messages.append)
    assert summary["val"]["images"] == 30
    assert any("30 common to all runs" in m for m in messages)


# ----------------------------------------------------------------------------------------
# Refusals name the run
# ----------------------------------------------------------------------------------------
def _two_runs(tmp_path, tax_b=None, test_ids_b=None):
    rng = np.random.default_rng(0)
    tax = make_taxonomy()
    y_val = rng.integers(0, 12, 8)
    runs = []
    for name, t, ids in (("good", tax, None), ("bad", tax_b or tax, test_ids_b)):
        c = t.num_classes("species")
        test_ids = ids or [f"t{i}" for i in range(5)]
        splits = {"val": ([f"v{i}" for i in range(8)], {"species": rng.standard_normal((8, c))}, y_val),
                  "test": (test_ids, {"species": rng.standard_normal((len(test_ids), c))}, None)}
        runs.append(write_run(tmp_path, name, t, splits))
    return runs


def _break_nonfinite(run):
    arr = np.load(logits_dir(run, "test") / "species.npy", mmap_mode="r+")
    arr[3, 1] = np.inf
    arr.flush()


@pytest.mark.parametrize("case, message", [
    ("taxonomy", r"run '.*bad': taxonomy .* differs .*--align-by-category"),
    ("ids", r"run '.*bad': its test image ids differ .*1 missing \(e.g. 't4'\); 1 extra \(e.g. 'x9'\)"),
    ("nonfinite", r"run '.*bad', split 'test': species logits are not finite .*image id 't3'"),
    ("missing_test", r"run '.*bad', split 'test': no logits directory"),
    ("half_written", r"run '.*bad', split 'test': .*meta.json is missing"),
    ("missing_val", r"run '.*bad': no logits for split 'val'"),
])
def test_refusals_name_the_run(tmp_path, case, message):
    other_tax = make_taxonomy(first_id=7) if case == "taxonomy" else None
    other_ids = [f"t{i}" for i in range(4)] + ["x9"] if case == "ids" else None
    good, bad = _two_runs(tmp_path, other_tax, other_ids)
    if case == "nonfinite":
        _break_nonfinite(bad)
    elif case == "missing_test":
        import shutil
        shutil.rmtree(logits_dir(bad, "test"))
    elif case == "half_written":
        (logits_dir(bad, "test") / "meta.json").unlink()
    elif case == "missing_val":
        import shutil
        shutil.rmtree(logits_dir(bad, "val"))
    with pytest.raises(HerbensError, match=message):
        ensemble_runs([good, bad], tmp_path / "s.csv", progress=False, log=lambda m: None)
    assert not (tmp_path / "s.csv").exists()


def test_without_validation_nothing_is_fitted(tmp_path):
    import shutil

    runs = _two_runs(tmp_path)
    for run in runs:
        shutil.rmtree(logits_dir(run, "val"))
    summary = ensemble_runs(runs, tmp_path / "s.csv", **NO_FIT, progress=False, log=lambda m: None)
    assert summary["val"] is None and summary["steps"] == [] and summary["weights"] == [0.5, 0.5]


def test_other_refusals(tmp_path):
    runs = _two_runs(tmp_path)
    with pytest.raises(HerbensError, match="3 weights given for 2 runs"):
        ensemble_runs(runs, tmp_path / "s.csv", weights=(1, 2, 3), progress=False, log=lambda m: None)
    with pytest.raises(HerbensError, match="given twice"):
        ensemble_runs([runs[0], runs[0]], tmp_path / "s.csv", progress=False, log=lambda m: None)
    with pytest.raises(HerbensError, match="not a run directory"):
        ensemble_runs([runs[0], tmp_path], tmp_path / "s.csv", progress=False, log=lambda m: None)


# ----------------------------------------------------------------------------------------
# Different taxonomies, aligned by category_id
# ----------------------------------------------------------------------------------------
def test_align_by_category(tmp_path):
    rng = np.random.default_rng(4)
    tax_a = make_taxonomy(species=6, genera=3, families=1)
    # Run b knows one extra species (category 999, in a new genus) and lacks species 0 of a.
    tax_b = Taxonomy(list(tax_a.category_ids[1:]) + [999], tax_a.species_names[1:] + ["Novum x"],
                     tax_a.genus_names + ["Novum"], tax_a.family_names,
                     list(tax_a.species_to_genus[1:]) + [3], [0] * 6, [5] * 6)
    ids = [f"t{i}" for i in range(25)]
    za, zb = rng.standard_normal((25, 6)), rng.standard_normal((25, 6))
    a = write_run(tmp_path, "a", tax_a, {"test": (ids, {"species": za}, None)})
    b = write_run(tmp_path, "b", tax_b, {"test": (ids, {"species": zb}, None)})
    with pytest.raises(HerbensError, match=r"run '.*b': taxonomy"):
        ensemble_runs([a, b], tmp_path / "s.csv", **NO_FIT, progress=False, log=lambda m: None)
    summary = ensemble_runs([a, b], tmp_path / "s.csv", **NO_FIT, align_by_category=True, progress=False,
                            log=lambda m: None)
    assert summary["classes"] == 5 and summary["dropped_species"] == {"a": 1, "b": 1}
    # Shared species: a's columns 1..5 are b's columns 0..4.
    expected = tax_a.category_of(1 + (half(za)[:, 1:] + half(zb)[:, :5]).argmax(axis=1))
    assert predictions(tmp_path / "s.csv").tolist() == expected.tolist()


def test_align_by_category_refuses_conflicting_names(tmp_path):
    tax_a = make_taxonomy(species=4, genera=2, families=1)
    tax_b = Taxonomy(tax_a.category_ids, ["Other name"] + tax_a.species_names[1:], tax_a.genus_names,
                     tax_a.family_names, tax_a.species_to_genus, tax_a.species_to_family, tax_a.counts)
    ids, z = ["t0"], np.zeros((1, 4))
    a = write_run(tmp_path, "a", tax_a, {"test": (ids, {"species": z}, None)})
    b = write_run(tmp_path, "b", tax_b, {"test": (ids, {"species": z}, None)})
    with pytest.raises(HerbensError, match=r"run '.*b': category_id 100 is 'Other name'.*cannot align"):
        ensemble_runs([a, b], tmp_path / "s.csv", **NO_FIT, align_by_category=True, progress=False,
                      log=lambda m: None)


# ----------------------------------------------------------------------------------------
# Vote mode, probability space, fixed values
# ----------------------------------------------------------------------------------------
def test_vote_mode_counts_per_view_top_k(tmp_path):
    runs, arrays, tax, _ = hierarchical_runs(tmp_path, num_runs=2, views=3)
    summary = ensemble_runs(runs, tmp_path / "v.csv", **NO_FIT, mode="vote", vote_k=2, top_k=2,
                            chunk_rows=5, progress=False, log=lambda m: None)
    assert summary["mode"] == "vote"
    votes = np.zeros((40, 12))
    for a in arrays:
        for v in range(3):
            top2 = np.argsort(-half(a["test"]["species"][:, v]), axis=1, kind="stable")[:, :2]
            np.put_along_axis(votes, top2, np.take_along_axis(votes, top2, 1) + 0.5 / 3, axis=1)
    mean = sum(0.5 * half(half(a["test"]["species"]).mean(axis=1)) for a in arrays)
    key = np.round(votes, 6) * 1e6 + mean / (np.abs(mean).max() + 1)  # votes first, then the mean score
    assert predictions(tmp_path / "v.csv").tolist() == tax.category_of(key.argmax(axis=1)).tolist()


def test_prob_space_and_given_values(tmp_path):
    runs, arrays, tax, _ = hierarchical_runs(tmp_path, num_runs=2)
    summary = ensemble_runs(runs, tmp_path / "p.csv", weights=(3, 1), calibrate=False, tau=0.5,
                            hierarchy=(0.5, 0.25), space="prob", progress=False, log=lambda m: None)
    assert summary["weights"] == [0.75, 0.25] and summary["tau"] == 0.5
    assert (summary["alpha"], summary["beta"]) == (0.5, 0.25)

    def mixture(level):
        return np.log(sum(w * np.exp(log_softmax64(half(a["test"][level]))) for w, a in zip((0.75, 0.25), arrays)))

    counts = np.maximum(tax.counts, 1)
    scores = (mixture("species") - 0.5 * np.log(counts / counts.sum())
              + 0.5 * log_softmax64(mixture("genus"))[:, tax.species_to_genus]
              + 0.25 * log_softmax64(mixture("family"))[:, tax.species_to_family])
    assert predictions(tmp_path / "p.csv").tolist() == tax.category_of(scores.argmax(axis=1)).tolist()


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------
def test_cli_writes_valid_csv_and_json(tmp_path, capsys):
    runs, _, tax, data = hierarchical_runs(tmp_path)
    out = tmp_path / "submissions" / "cli.csv"
    status = main(["ensemble", *map(str, runs), "-o", str(out), "--top-k", "3", "--chunk-rows", "16", "--no-progress"])
    assert status == 0
    test_ids = [f"imgtest{i:03d}" for i in range(len(data["test"]))]
    frame = read_submission(out, expected_ids=test_ids, valid_category_ids=tax.category_ids)
    assert frame["Id"].tolist() == test_ids
    summary = json.loads((tmp_path / "submissions" / "cli.json").read_text())
    for key in ("runs", "weights", "temperatures", "tau", "alpha", "beta", "mode", "steps", "val"):
        assert key in summary
    assert [r["name"] for r in summary["runs"]] == ["run0", "run1", "run2"]
    assert (tmp_path / "submissions" / "cli.topk.csv").exists()
    printed = capsys.readouterr().out
    assert "run run0" in printed and "mean of 3 runs" in printed and "final" in printed


def test_cli_options_and_errors(tmp_path, capsys):
    runs, *_ = hierarchical_runs(tmp_path, num_runs=2)
    out = tmp_path / "o.csv"
    args = ["ensemble", *map(str, runs), "-o", str(out), "--no-progress"]
    assert main(args + ["--weights", "1,3", "--no-calibrate", "--tau", "0.3", "--hierarchy", "none",
                        "--space", "prob", "--mode", "vote", "--vote-k", "2"]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["weights"] == [0.25, 0.75] and summary["mode"] == "vote" and summary["space"] == "prob"
    assert main(args + ["--weights", "1,2,3"]) == 2
    assert "3 weights given for 2 runs" in capsys.readouterr().err
    assert main(["ensemble", str(runs[0]), str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert "not a run directory" in capsys.readouterr().err
