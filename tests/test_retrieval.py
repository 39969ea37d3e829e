"""Retrieval classifiers against slow references, the pseudo-run through the ensembler on a
planted case where retrieval helps, faiss agreeing with the exact search, and the verb."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import train_tiny
from herbens.cli.main import main
from herbens.data.taxonomy import Taxonomy
from herbens.ensemble.pipeline import ensemble_runs
from herbens.core.errors import HerbensError
from herbens.core.numerics import stratified_folds
from herbens.retrieval.command import retrieval_run
from herbens.retrieval.fit import fit_temperature
from herbens.retrieval.knn import KnnClassifier, knn_logits
from herbens.retrieval.prototypes import (Prototypes, class_prototypes, cosine_scores, fuse_with_head,
                                          species_prototype)
from herbens.retrieval.pseudorun import derived_logits
from herbens.retrieval.search import exact_topk, faiss_topk, merge_topk
from herbens.stores.embeddings import read_embeddings, write_embeddings
from herbens.stores.logits import read_logits, write_logits


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def tiny_taxonomy(species=12, genera=4, families=2):
    to_genus = np.arange(species) % genera
    to_family = (np.arange(genera) % families)[to_genus]
    return Taxonomy(10 + 2 * np.arange(species), [f"Planta sp{i}" for i in range(species)],
                    [f"G{g}" for g in range(genera)], [f"F{f}" for f in range(families)],
                    to_genus, to_family, np.full(species, 10))


# ----------------------------------------------------------------------------------------
# Against slow references
# ----------------------------------------------------------------------------------------
def test_prototypes_equal_a_slow_per_class_mean():
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((300, 6)))
    labels = rng.integers(0, 9, 300)
    labels[labels == 4] = 5  # species 4 has no images: no prototype, lowest score
    labels[:7] = -1  # unlabelled rows are ignored
    protos = class_prototypes(x, labels, 9, chunk_rows=32)
    want = []
    for c in range(9):
        rows = [x[i] for i in range(len(x)) if labels[i] == c]
        if rows:
            mean = sum(r.astype(np.float64) for r in rows) / len(rows)
            want.append(mean / np.sqrt((mean ** 2).sum()))
    np.testing.assert_array_equal(protos.owners, [0, 1, 2, 3, 5, 6, 7, 8])
    np.testing.assert_allclose(protos.vectors, np.array(want), atol=1e-6)
    np.testing.assert_allclose(species_prototype(x[labels == 3]), protos.vectors[3:4], atol=1e-6)
    q = unit(rng.standard_normal((5, 6)))
    scores = cosine_scores(q, protos)
    assert (scores[:, 4] == -1).all()
    np.testing.assert_allclose(scores[:, [0, 1, 2, 3, 5, 6, 7, 8]], q @ np.array(want).T, atol=1e-6)


def test_sub_centres_score_the_best_centre_and_find_planted_modes():
    rng = np.random.default_rng(1)
    modes = unit(rng.standard_normal((4, 16)))  # species 0: modes 0, 1; species 1: modes 2, 3
    x = unit(np.repeat(modes, 30, axis=0) + 0.05 * rng.standard_normal((120, 16)))
    labels = np.repeat([0, 0, 1, 1], 30)
    protos = class_prototypes(x, labels, 2, sub_centers=2, seed=3)
    np.testing.assert_array_equal(protos.owners, [0, 0, 1, 1])
    # Each centre sits on one planted mode.
    assert (np.sort((protos.vectors @ modes.T).max(axis=0)) > 0.99).all()
    scores = cosine_scores(modes, protos)
    slow = np.array([[max(float(m @ v) for v, o in zip(protos.vectors, protos.owners) if o == c) for c in (0, 1)]
                     for m in modes])
    np.testing.assert_allclose(scores, slow, atol=1e-6)
    # Enrolment appends a class (index == num_classes) beside the others.
    grown = protos.with_species(species_prototype(x[:3]), 2)
    assert grown.num_classes == 3 and grown.owners.tolist() == [0, 0, 1, 1, 2]
    back = grown.without_species(2)  # unenrolment restores the prototypes exactly
    assert back.num_classes == 2 and back.vectors.tobytes() == protos.vectors.tobytes()
    assert back.owners.tolist() == protos.owners.tolist()
    shifted = grown.without_species(0)
    assert shifted.owners.tolist() == [0, 0, 1] and shifted.num_classes == 2


def brute_force_knn(q, index, labels, classes, k, t, alpha):
    out = np.zeros((len(q), classes))
    for i, v in enumerate(q):
        sims = [(float(v @ row), j) for j, row in enumerate(index)]
        sims.sort(key=lambda s: (-s[0], s[1]))
        best = sims[0][0]
        for s, j in sims[:k]:
            out[i, labels[j]] += np.exp((s - best) / t)
    return np.log(out + alpha)


def test_knn_equals_a_brute_force_reference():
    rng = np.random.default_rng(2)
    index, q = unit(rng.standard_normal((200, 8))), unit(rng.standard_normal((23, 8)))
    labels = rng.integers(0, 7, 200)
    clf = KnnClassifier(index, labels, 7, k=9, temperature=0.07)
    np.testing.assert_allclose(clf.scores(q), brute_force_knn(q, index, labels, 7, 9, 0.07, 1e-3), atol=1e-5)
    sims, rows = exact_topk(q, index, 9, query_rows=5, index_rows=17)
    np.testing.assert_allclose(knn_logits(sims, labels[rows], 7, 9, 0.07), clf.scores(q), atol=1e-5)


def test_exact_search_matches_full_sort_with_ties_and_faiss_agrees():
    rng = np.random.default_rng(3)
    index = unit(rng.standard_normal((1000, 32)))
    index[500] = index[10]  # exact duplicates tie: the lower row comes first
    q = unit(rng.standard_normal((64, 32)))
    q[0] = index[10]
    sims, rows = exact_topk(q, index, 12, query_rows=16, index_rows=97)
    full = q @ index.T
    ref = np.lexsort((np.broadcast_to(np.arange(1000), full.shape), -full), axis=1)[:, :12]
    np.testing.assert_array_equal(rows, ref)
    np.testing.assert_allclose(sims, np.take_along_axis(full, ref, axis=1), atol=1e-6)
    assert rows[0, 0] == 10 and rows[0, 1] == 500
    pytest.importorskip("faiss")
    f_sims, f_rows = faiss_topk(q, index, 12)
    np.testing.assert_array_equal(f_rows, rows)
    np.testing.assert_allclose(f_sims, sims, atol=1e-5)


def test_merge_keeps_ties_across_chunks():
    best_s, best_r = np.array([[0.9, 0.5]], np.float32), np.array([[7, 8]])
    s, r = merge_topk(best_s, best_r, np.array([[0.5, 0.9, 0.1]], np.float32), np.array([[2, 3, 4]]), 3)
    assert r.tolist() == [[3, 7, 2]] and s[0].tolist() == pytest.approx([0.9, 0.9, 0.5])


def test_genus_and_family_logits_are_logsumexp_over_members():
    tax = tiny_taxonomy()
    s = np.random.default_rng(4).standard_normal((5, 12)).astype(np.float32) * 5
    got = derived_logits(s, tax)
    for level in ("genus", "family"):
        groups = tax.level_map(level)
        want = np.stack([np.log(np.exp(s[:, groups == g].astype(np.float64)).sum(axis=1))
                         for g in range(tax.num_classes(level))], axis=1)
        np.testing.assert_allclose(got[level], want, rtol=1e-5, atol=1e-5)


def test_derived_logits_stay_finite_with_a_sharp_temperature():
    # ArcFace embeddings fit T ~ 0.001: a whole genus hundreds below the row's best species
    # used to underflow to exp(...) = 0 and log(0) = -inf (issue 23).
    tax = tiny_taxonomy()
    cos = np.random.default_rng(5).uniform(-1, 1, (6, 12)).astype(np.float32)
    cos[:, tax.species_to_genus == 0] = -1.0  # genus 0: species without a prototype
    got = derived_logits(cos / np.float32(0.001), tax)
    for level in ("genus", "family"):
        assert np.isfinite(got[level]).all() and np.isfinite(got[level].astype(np.float16)).all()
        groups = tax.level_map(level)
        scores = cos.astype(np.float64) / 0.001
        want = np.stack([_slow_logsumexp(scores[:, groups == g]) for g in range(tax.num_classes(level))], axis=1)
        np.testing.assert_allclose(got[level], want, rtol=1e-6)


def _slow_logsumexp(block: np.ndarray) -> np.ndarray:
    best = block.max(axis=1)
    return best + np.log(np.exp(block - best[:, None]).sum(axis=1))


def test_prototype_retrieval_on_an_arcface_run(tiny_herbarium, tmp_path):
    assert train_tiny(tiny_herbarium, tmp_path, recipe="demo_arcface",
                      extra=["name=arc", "train.epochs=1", "infer.embeddings=true"]) == 0
    out = tmp_path / "arc_proto"
    assert main(["retrieval", str(tmp_path / "arc"), "--method", "prototype", "-o", str(out), "--no-progress"]) == 0
    for split in ("val", "test"):
        logits = read_logits(out, split)
        for level in logits.levels:
            assert np.isfinite(np.asarray(logits.level(level), dtype=np.float32)).all()


def test_fuse_with_head_is_the_head_when_nothing_is_enrolled():
    rng = np.random.default_rng(5)
    head, proto = rng.standard_normal((8, 6)), rng.standard_normal((8, 6))
    fused = fuse_with_head(head, proto, 6)
    np.testing.assert_allclose(fused, head - np.log(np.exp(head).sum(axis=1, keepdims=True)), atol=1e-5)
    grown = fuse_with_head(head, np.concatenate([proto, rng.standard_normal((8, 2))], axis=1), 6)
    np.testing.assert_allclose(np.exp(grown).sum(axis=1), 1.0, atol=1e-5)
    assert (grown[:, :6].argmax(axis=1) == head.argmax(axis=1)).all()
    with pytest.raises(HerbensError, match="fuse"):
        fuse_with_head(head, proto[:, :4], 6)


def test_prototypes_refuse_unsorted_owners():
    with pytest.raises(HerbensError, match="ascending"):
        Prototypes(np.eye(2, dtype=np.float32), np.array([1, 0]), 2)


# ----------------------------------------------------------------------------------------
# A planted case: a weak head whose embeddings know better
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A head run whose logits are noisy, and good embeddings of the same images."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(6)
    tax = tiny_taxonomy()
    means = unit(rng.standard_normal((12, 16)))
    run = root / "head"
    tax.save(run / "taxonomy.json")
    (run / "split.csv").write_text("image_id\n")
    truth = {}
    for split, n in (("train", 240), ("val", 240), ("test", 120)):
        y = np.tile(np.arange(12), n // 12)
        ids = [f"{split}{i:04d}" for i in range(n)]
        emb = means[y] + 0.35 * rng.standard_normal((n, 16))
        write_embeddings(run, split, ids, emb, {"taxonomy_hash": tax.hash}, labels=None if split == "test" else y,
                         num_species=12)
        if split != "train":
            head = 1.0 * np.eye(12)[y] + 1.0 * rng.standard_normal((n, 12))
            write_logits(run, split, ids, {"species": head, "genus": 2 * np.eye(4)[tax.species_to_genus[y]]
                                           + rng.standard_normal((n, 4))},
                         {"taxonomy_hash": tax.hash, "model": "head"}, labels=None if split == "test" else y)
        truth[split] = y
    return root, run, tax, truth


@pytest.mark.parametrize("method", ["prototype", "knn"])
def test_pseudo_run_helps_the_ensemble(planted, method):
    root, head, tax, truth = planted
    out = root / f"head_{method}"
    record = retrieval_run(head, out, method, progress=False, log=lambda *_: None)
    assert record["fitted"]["temperature"] > 0 and (method != "knn" or record["fitted"]["k"] >= 1)
    assert json.loads((out / "retrieval.json").read_text())["method"] == method
    # The store's checks accept it as a run of the same taxonomy (the ensembler's below).
    assert Taxonomy.load(out / "taxonomy.json").hash == tax.hash
    assert read_logits(out, "test", taxonomy=tax).image_ids == read_logits(head, "test").image_ids
    val = read_logits(out, "val", taxonomy=tax)
    assert val.levels == ("species", "genus", "family") and (val.labels == truth["val"]).all()
    quiet = dict(progress=False, log=lambda *_: None)
    alone = ensemble_runs([head], root / f"alone_{method}.csv", **quiet)
    both = ensemble_runs([head, out], root / f"both_{method}.csv", **quiet)
    f1 = lambda s: s["val"]["out_of_fold"]["species_macro_f1"]  # noqa: E731
    assert f1(both) >= f1(alone)
    assert both["weights"][1] > 0
    # Out of sample too: on the test rows (labels known here) retrieval lifts accuracy clearly.
    import pandas as pd

    def test_accuracy(summary):
        pred = pd.read_csv(summary["submission"]).sort_values("Id")["Predicted"].to_numpy()
        return float((tax.index_of(pred) == truth["test"]).mean())

    assert test_accuracy(both) > test_accuracy(alone) + 0.1


def test_sub_centres_and_faiss_through_the_verb(planted):
    root, head, tax, _ = planted
    assert main(["retrieval", str(head), "--method", "prototype", "--sub-centers", "3",
                 "-o", str(root / "sub"), "--no-progress"]) == 0
    assert json.loads((root / "sub" / "retrieval.json").read_text())["fitted"]["prototypes"] == 36
    pytest.importorskip("faiss")
    assert main(["retrieval", str(head), "--method", "knn", "--backend", "faiss", "--k", "5",
                 "-o", str(root / "kf"), "--no-progress"]) == 0
    assert main(["retrieval", str(head), "--method", "knn", "--k", "5", "-o", str(root / "ke"), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(read_logits(root / "kf", "test").level("species")),
                                  np.asarray(read_logits(root / "ke", "test").level("species")))


def test_verb_refusals(planted, tmp_path):
    root, head, _, _ = planted
    assert main(["retrieval", str(tmp_path), "--method", "knn"]) == 2  # not a run
    assert main(["retrieval", str(head), "--method", "knn", "-o", str(head)]) == 2  # would overwrite the source
    assert main(["retrieval", str(head), "--method", "prototype", "--sub-centers", "0"]) == 2
    copy = tmp_path / "copy"
    shutil.copytree(head, copy)
    shutil.rmtree(copy / "embeddings" / "train")
    with pytest.raises(HerbensError, match="embeddings split 'train'.*herbens infer RUN --embeddings"):
        retrieval_run(copy, tmp_path / "x", progress=False, log=lambda *_: None)


@pytest.mark.slow
def test_retrieval_bench_runs_and_agrees_with_naive(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "retrieval_bench.py"
    spec = importlib.util.spec_from_file_location("retrieval_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--index", "3000", "--queries", "50", "--dim", "32", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("same neighbours as naive 50/50") >= 2, out
    assert "ratio streaming / naive: peak RSS" in out


def test_fewshot_enrols_planted_new_species_without_hurting_known_ones():
    from herbens.retrieval.fewshot import evaluate_fewshot, topk_hits

    rng = np.random.default_rng(8)
    means = unit(rng.standard_normal((10, 32)))  # 8 known species, 2 held out

    def images(species, n):
        y = np.repeat(species, n)
        return unit(means[y] + 0.12 * rng.standard_normal((len(y), 32))), y

    train_emb, train_y = images(np.arange(8), 20)
    val_emb, val_y = images(np.arange(8), 10)
    new_emb, new_y = images(np.array([8, 9]), 15)
    val_head = 4.0 * np.eye(8)[val_y] + rng.standard_normal((len(val_y), 8))
    new_head = rng.standard_normal((len(new_y), 8)) + 2.0  # the head has never seen them
    known = class_prototypes(train_emb, train_y, 8)
    rows = evaluate_fewshot(known, 0.05, val_head, val_emb, val_y, new_head, new_emb, new_y - 8, draws=3)
    assert [r["k"] for r in rows] == [1, 3, 5] and rows[0]["eval_images"] == 20
    assert rows[2]["enrolled_top1"] > 0.9 and rows[2]["prototype_top5"] == 1.0
    assert rows[2]["enrolled_top1"] >= rows[0]["enrolled_top1"] - 0.05
    assert abs(rows[2]["known_f1_change"]) < 0.05 and rows[0]["known_f1_head"] > 0.9
    scores = np.array([[0.1, 0.5, 0.5], [0.9, 0.0, 0.2]])
    assert topk_hits(scores, np.array([2, 0]), 1).tolist() == [True, True]
    assert topk_hits(scores, np.array([0, 1]), 2).tolist() == [False, False]
    with pytest.raises(HerbensError, match="more than 5 images"):
        evaluate_fewshot(known, 0.05, val_head, val_emb, val_y, new_head[:5], new_emb[:5], np.zeros(5, int))


# ----------------------------------------------------------------------------------------
# Cross-fitted temperature and k: reported in sample and out of fold
# ----------------------------------------------------------------------------------------
def _row_log_loss(logits_row, label):
    """Slow reference: -log softmax(logits)[label]."""
    total = sum(math.exp(v - max(logits_row)) for v in logits_row)
    return max(logits_row) + math.log(total) - logits_row[label]


def test_fit_temperature_in_sample_is_optimistic_out_of_fold_is_honest():
    # Planted: candidate g fits exactly the rows of fold g (loss 0) and no other (loss 1). In
    # sample every candidate fits a fifth of the rows (mean loss 0.8); out of fold, a fold's
    # rows are judged by a candidate chosen without them, which never fits them (loss 1).
    labels = np.repeat(np.arange(5), 4)
    folds = stratified_folds(labels)
    losses = (folds.fold[:, None] != np.arange(5)[None, :]).astype(np.float64)
    record = fit_temperature(losses, labels, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert record["log_loss"] == {"in_sample": pytest.approx(0.8), "out_of_fold": pytest.approx(1.0)}
    assert record["folds"] == 5 and record["temperature"] == 0.1
    assert [c["temperature"] for c in record["fold_choices"]] == [0.2, 0.1, 0.1, 0.1, 0.1]


@pytest.mark.parametrize("method", ["prototype", "knn"])
def test_retrieval_reports_and_writes_validation_out_of_fold(planted, method):
    """The out-of-fold log-loss is each validation row's loss under the values fitted without its
    fold (recomputed by slow references), and the pseudo-run's validation logits are those rows'
    scores under those values; test logits use the values fitted on every row."""
    root, head, tax, truth = planted
    out = root / f"oof_{method}"
    lines = []
    record = retrieval_run(head, out, method, progress=False, log=lines.append)
    fitted = record["fitted"]
    assert any("in-sample" in line and "out-of-fold" in line for line in lines)
    assert set(record["val_scores"]) == {"in_sample", "out_of_fold"} and record["val_logits"].startswith("out-of-fold")
    train, val = read_embeddings(head, "train"), read_embeddings(head, "val")
    index, queries = np.asarray(train.matrix, np.float32), np.asarray(val.matrix, np.float32)
    fold = stratified_folds(truth["val"]).fold
    choices = fitted["fold_choices"]
    protos = class_prototypes(index, train.labels, 12)

    def reference(q, choice):
        if method == "prototype":
            return cosine_scores(q[None], protos)[0].astype(np.float64) / choice["temperature"]
        return brute_force_knn(q[None], index, train.labels, 12, choice["k"], choice["temperature"], 1e-3)[0]

    stored = np.asarray(read_logits(out, "val").level("species"))
    oof, ins = [], []
    for r in range(len(queries)):
        expected = reference(queries[r], choices[fold[r]])
        np.testing.assert_allclose(stored[r], expected, rtol=2e-3, atol=2e-3)  # float16 store
        oof.append(_row_log_loss(list(expected), truth["val"][r]))
        ins.append(_row_log_loss(list(reference(queries[r], fitted)), truth["val"][r]))
    assert fitted["log_loss"]["out_of_fold"] == pytest.approx(np.mean(oof), rel=1e-4)
    assert fitted["log_loss"]["in_sample"] == pytest.approx(np.mean(ins), rel=1e-4)
    # Some fold chose other values than the full fit (else the check above could not tell the
    # out-of-fold logits from the full fit's), and in sample is the optimistic one here.
    assert any(any(c[key] != fitted[key] for key in c) for c in choices)
    assert fitted["log_loss"]["in_sample"] < fitted["log_loss"]["out_of_fold"]
    test = np.asarray(read_logits(out, "test").level("species"))
    test_q = np.asarray(read_embeddings(head, "test").matrix, np.float32)
    np.testing.assert_allclose(test[3], reference(test_q[3], fitted), rtol=2e-3, atol=2e-3)


def test_given_values_are_not_fitted_so_in_sample_equals_out_of_fold(planted):
    root, head, _, _ = planted
    record = retrieval_run(head, root / "fixed", "knn", k=5, temperature=0.05, progress=False, log=lambda *_: None)
    fitted = record["fitted"]
    assert (fitted["k"], fitted["temperature"]) == (5, 0.05)
    assert all(c == {"k": 5, "temperature": 0.05} for c in fitted["fold_choices"])
    assert fitted["log_loss"]["in_sample"] == pytest.approx(fitted["log_loss"]["out_of_fold"])
    assert record["val_scores"]["in_sample"] == record["val_scores"]["out_of_fold"]
