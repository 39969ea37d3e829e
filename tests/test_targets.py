"""Sparse teacher targets: sparsify, the store's round trip and refusals, the distillation loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from herbens.core.errors import HerbensError
from herbens.losses.distill import sparse_kl_div
from herbens.stores.targets import open_targets_writer, read_targets, sparsify, targets_dir


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _dense_teacher(classes, logp, rest, num_classes):
    """Slow reference: stored classes exactly, the rest spread evenly over the other classes."""
    n, k = classes.shape
    probs = np.zeros((n, num_classes))
    for i in range(n):
        others = [c for c in range(num_classes) if c not in set(classes[i].tolist())]
        for c in others:
            probs[i, c] = rest[i] / len(others)
        for j in range(k):
            probs[i, classes[i, j]] = np.exp(logp[i, j])
    return probs


def _reference_kl(student, teacher_probs, t):
    loss = 0.0
    for z, q in zip(student, teacher_probs):
        qt = q ** (1.0 / t)
        qt = qt / qt.sum()
        s = z / t
        log_s = s - np.log(np.exp(s - s.max()).sum()) - s.max()
        loss += sum(qi * (np.log(qi) - li) for qi, li in zip(qt, log_s) if qi > 0)
    return loss / len(student) * t * t


def test_sparsify_keeps_the_dense_top_k_exactly_and_the_remaining_mass():
    rng = np.random.default_rng(0)
    logp = _log_softmax(rng.normal(size=(6, 11)).astype(np.float32) * 3)
    classes, top, rest = sparsify(logp, 4)
    for i in range(6):
        expected = sorted(range(11), key=lambda c: (-logp[i, c], c))[:4]
        assert classes[i].tolist() == expected
        np.testing.assert_array_equal(top[i], logp[i, expected])
        assert rest[i] == pytest.approx(1 - np.exp(logp[i, expected].astype(np.float64)).sum(), abs=1e-6)
    assert classes.dtype == np.int32 and top.dtype == np.float32 and (rest >= 0).all()


def test_sparsify_with_k_at_least_the_class_count_keeps_everything():
    logp = _log_softmax(np.array([[0.0, 1.0, 2.0]], dtype=np.float32))
    classes, top, rest = sparsify(logp, 10)
    assert classes.tolist() == [[2, 1, 0]] and rest[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_sparse_kl_equals_the_dense_reference(t, k):
    rng = np.random.default_rng(k)
    c = 7
    teacher = _log_softmax(rng.normal(size=(5, c)) * 2)
    classes, logp, rest = sparsify(teacher, k)
    student = rng.normal(size=(5, c)) * 2
    got = sparse_kl_div(torch.tensor(student), torch.tensor(classes).long(), torch.tensor(logp),
                        torch.tensor(rest), t)
    expected = _reference_kl(student, _dense_teacher(classes, logp, rest, c), t)
    assert float(got) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_weighted_sparse_kl_is_the_plain_mean_of_each_image_weighted_term():
    rng = np.random.default_rng(5)
    c, k, t = 6, 3, 2.0
    classes, logp, rest = sparsify(_log_softmax(rng.normal(size=(4, c)) * 2), k)
    student = rng.normal(size=(4, c))
    weights = np.array([0.5, 2.0, 0.0, 1.5])
    got = sparse_kl_div(torch.tensor(student), torch.tensor(classes).long(), torch.tensor(logp),
                        torch.tensor(rest), t, weights=torch.tensor(weights))
    dense = _dense_teacher(classes, logp, rest, c)
    per_image = [_reference_kl(student[i:i + 1], dense[i:i + 1], t) for i in range(4)]
    assert float(got) == pytest.approx(float(np.dot(weights, per_image)) / 4, rel=1e-4, abs=1e-6)


def test_sparse_kl_gradient_matches_the_dense_kl_gradient():
    rng = np.random.default_rng(3)
    c, k, t = 9, 4, 2.0
    classes, logp, rest = sparsify(_log_softmax(rng.normal(size=(4, c)) * 2), k)
    dense = torch.tensor(_dense_teacher(classes, logp, rest, c), dtype=torch.float64)
    z1 = torch.tensor(rng.normal(size=(4, c)), requires_grad=True)
    z2 = z1.detach().clone().requires_grad_(True)
    sparse_kl_div(z1, torch.tensor(classes).long(), torch.tensor(logp), torch.tensor(rest), t).backward()
    qt = dense ** (1 / t)
    qt = qt / qt.sum(dim=1, keepdim=True)
    (torch.nn.functional.kl_div(torch.log_softmax(z2 / t, 1), qt, reduction="batchmean") * t * t).backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-4, atol=1e-6)


def test_kl_is_zero_when_the_student_equals_a_fully_stored_teacher():
    z = torch.randn(3, 5)
    classes, logp, rest = sparsify(torch.log_softmax(z, 1).numpy(), 5)
    loss = sparse_kl_div(z, torch.tensor(classes).long(), torch.tensor(logp), torch.tensor(rest), 1.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-5)


def _write(tmp_path, ids=("a", "b", "c"), taxonomy_hash="h1", k=2, c=5, seed=0):
    rng = np.random.default_rng(seed)
    logp = {"species": _log_softmax(rng.normal(size=(len(ids), c))), "genus": _log_softmax(rng.normal(size=(len(ids), 3)))}
    with open_targets_writer(tmp_path, "train", ids, {"species": (k, c), "genus": (k, 3)},
                             {"taxonomy_hash": taxonomy_hash, "teacher": "test"}) as writer:
        writer.write("species", 0, logp["species"][:2])
        writer.write("species", 2, logp["species"][2:])
        writer.write("genus", 0, logp["genus"])
    return logp


def test_store_round_trip(tmp_path):
    logp = _write(tmp_path)
    store = read_targets(tmp_path, "train")
    assert store.image_ids == ["a", "b", "c"] and store.levels == ("species", "genus")
    species = store.level("species")
    classes, top, rest = sparsify(logp["species"], 2)
    np.testing.assert_array_equal(species.classes, classes)
    np.testing.assert_array_equal(species.logp, top)
    np.testing.assert_array_equal(species.rest, rest)
    assert store.rows_of(["c", "a"]).tolist() == [2, 0]
    rows = species.rows(np.array([2, 0]))
    np.testing.assert_array_equal(rows["classes"], classes[[2, 0]])


def test_rows_of_unknown_ids_names_them(tmp_path):
    _write(tmp_path)
    with pytest.raises(HerbensError, match="1 of 2 training images have no teacher targets.*zz"):
        read_targets(tmp_path, "train").rows_of(["a", "zz"])


def test_another_taxonomy_is_refused(tmp_path):
    _write(tmp_path, taxonomy_hash="other")

    class Tax:
        hash = "mine"

        def num_classes(self, level):
            return 5

    with pytest.raises(HerbensError, match="targets were written for taxonomy other but the run's taxonomy.json is mine"):
        read_targets(tmp_path, "train", taxonomy=Tax())


def test_truncated_file_and_half_written_store_are_refused(tmp_path):
    _write(tmp_path)
    path = targets_dir(tmp_path, "train")
    data = (path / "species.logp.npy").read_bytes()
    (path / "species.logp.npy").write_bytes(data[:-4])
    with pytest.raises(HerbensError, match="species.logp.npy.*truncated"):
        read_targets(tmp_path, "train")
    (path / "meta.json").unlink()
    with pytest.raises(HerbensError, match="meta.json is missing"):
        read_targets(tmp_path, "train")


def test_out_of_range_classes_are_refused(tmp_path):
    _write(tmp_path)
    file = targets_dir(tmp_path, "train") / "species.classes.npy"
    arr = np.load(file)
    arr[1, 0] = 99
    np.save(file, arr)
    with pytest.raises(HerbensError, match="class indices outside 0..4"):
        read_targets(tmp_path, "train")


def test_a_failed_write_publishes_nothing_and_keeps_the_old_store(tmp_path):
    _write(tmp_path)
    with pytest.raises(HerbensError, match="never written"):
        with open_targets_writer(tmp_path, "train", ["a", "b"], {"species": (2, 5)}, {"taxonomy_hash": "h2"}) as w:
            w.write("species", 0, _log_softmax(np.zeros((1, 5))))
    assert read_targets(tmp_path, "train").meta["taxonomy_hash"] == "h1"


def test_nan_teacher_rows_are_refused(tmp_path):
    bad = _log_softmax(np.zeros((2, 5)))
    bad[1, 0] = np.nan
    with pytest.raises(HerbensError, match="not finite at row 1"):
        with open_targets_writer(tmp_path, "train", ["a", "b"], {"species": (5, 5)}, {"taxonomy_hash": "h"}) as w:
            w.write("species", 0, bad)
