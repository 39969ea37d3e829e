"""A student trains on a teacher's sparse targets: aligned by image id, checked before epoch 1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import planted_teacher, train_tiny
from herbens.data.taxonomy import Taxonomy


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_student_trains_on_the_teacher_targets_of_its_levels(tiny_herbarium, tmp_path):
    teacher = planted_teacher(tiny_herbarium, tmp_path / "teacher")
    assert train_tiny(tiny_herbarium, tmp_path, extra=[
        "name=student", "train.epochs=1", f"distill.teacher={teacher}", "distill.alpha=0.7",
        "distill.temperature=2.0", "distill.class_balanced_beta=0.9"]) == 0
    record = _history(tmp_path / "student")[-1]
    # The teacher stored species and genus: both are distilled, family keeps its own loss only.
    assert np.isfinite(record["loss_species_distill"]) and np.isfinite(record["loss_genus_distill"])
    assert "loss_family_distill" not in record


def test_alpha_zero_trains_exactly_like_no_teacher(tiny_herbarium, tmp_path):
    teacher = planted_teacher(tiny_herbarium, tmp_path / "teacher")
    common = ["train.epochs=1", "train.deterministic=true"]
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=plain", *common]) == 0
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=zero", *common, f"distill.teacher={teacher}",
                                                       "distill.alpha=0"]) == 0
    assert _history(tmp_path / "plain")[-1]["train_loss"] == pytest.approx(_history(tmp_path / "zero")[-1]["train_loss"])


def test_a_teacher_missing_training_images_is_refused_before_training(tiny_herbarium, tmp_path, capsys):
    teacher = planted_teacher(tiny_herbarium, tmp_path / "teacher", drop=3)
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=s", f"distill.teacher={teacher}"]) == 2
    err = capsys.readouterr().err
    assert "have no teacher targets" in err and "same data.root, split and limit_train" in err
    assert not (tmp_path / "s" / "checkpoints").exists()


def test_a_teacher_of_another_taxonomy_is_refused(tiny_herbarium, tmp_path, capsys):
    teacher = planted_teacher(tiny_herbarium, tmp_path / "teacher", taxonomy_hash="0123456789abcdef")
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=s", f"distill.teacher={teacher}"]) == 2
    assert "written for taxonomy 0123456789abcdef" in capsys.readouterr().err


def test_distillation_with_mixup_is_refused(tiny_herbarium, tmp_path, capsys):
    teacher = planted_teacher(tiny_herbarium, tmp_path / "teacher")
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=s", f"distill.teacher={teacher}",
                                                       "augment.mixup=0.2"]) == 2
    assert "cannot be combined with augment.mixup" in capsys.readouterr().err


@pytest.fixture(scope="module")
def teacher(tiny_herbarium, tiny_run, tmp_path_factory):
    """A two-run ensemble of the tiny herbarium and its teacher folder (``herbens teach``)."""
    import shutil

    from herbens.cli.main import main
    from herbens.ensemble.pipeline import ensemble_runs

    work = tmp_path_factory.mktemp("teach")
    runs = work / "runs"
    shutil.copytree(tiny_run, runs / "tiny")
    assert train_tiny(tiny_herbarium, runs, recipe="demo_seesaw", extra=["name=tiny2", "train.epochs=1", "seed=5"]) == 0
    submission = work / "ens.csv"
    ensemble_runs([runs / "tiny", runs / "tiny2"], submission, progress=False, log=lambda _: None)
    assert main(["teach", str(submission.with_suffix(".json")), "-o", str(work / "teacher"), "--k", "3"]) == 0
    return work / "teacher", runs


def test_teacher_targets_are_the_bundle_predictions_of_the_training_images(teacher, tiny_herbarium):
    from herbens.bundle.load import load_bundle
    from herbens.data.run_data import load_run_data
    from herbens.bundle.predict import block_probabilities
    from herbens.config import load_run_config
    from herbens.stores.targets import read_targets

    folder, runs = teacher
    taxonomy = Taxonomy.load(folder / "taxonomy.json")
    store = read_targets(folder, "train", taxonomy=taxonomy)
    data = load_run_data(load_run_config(runs / "tiny"), runs / "tiny", reuse_split=True)
    assert sorted(store.image_ids) == sorted(data.train["image_id"].astype(str))
    assert (folder / "split.csv").read_bytes() == (runs / "tiny" / "split.csv").read_bytes()
    # The slow way: predict the same training images with the bundle and compare every level.
    paths = [str(data.images_dir / f) for f in data.train["file_name"]]
    (_, good, probs, errors, _), = list(block_probabilities(load_bundle(folder / "bundle"), paths, progress=False))
    assert not errors and len(good) == len(paths)
    rows = store.rows_of(data.train["image_id"].astype(str).tolist())
    for level in ("species", "genus", "family"):
        stored = store.level(level).rows(rows)
        dense = probs.level(level).astype(np.float64)
        k = min(3, dense.shape[1])
        assert stored["classes"].shape == (len(paths), k)
        np.testing.assert_array_equal(stored["classes"][:, 0], dense.argmax(axis=1))
        np.testing.assert_allclose(np.exp(stored["logp"]), np.take_along_axis(dense, stored["classes"], 1), rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(stored["rest"], 1 - np.take_along_axis(dense, stored["classes"], 1).sum(1), atol=1e-5)


def test_student_of_a_written_teacher_trains(teacher, tiny_herbarium, tmp_path):
    folder, _ = teacher
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=student", "train.epochs=1",
                                                       f"distill.teacher={folder}"]) == 0
    record = _history(tmp_path / "student")[-1]
    assert all(np.isfinite(record[f"loss_{level}_distill"]) for level in ("species", "genus", "family"))


def test_teach_refuses_members_with_different_splits(teacher, tmp_path, capsys):
    import shutil

    from herbens.cli.main import main
    from herbens.ensemble.pipeline import ensemble_runs

    _, runs = teacher
    other = tmp_path / "runs"
    shutil.copytree(runs / "tiny", other / "a")
    shutil.copytree(runs / "tiny2", other / "b")
    split = other / "b" / "split.csv"
    split.write_text("\n".join(split.read_text().splitlines()[:-1]) + "\n")
    ensemble_runs([other / "a", other / "b"], tmp_path / "e.csv", progress=False, log=lambda _: None)
    assert main(["teach", str(tmp_path / "e.json"), "-o", str(tmp_path / "t")]) == 2
    assert "split.csv differs" in capsys.readouterr().err
    assert not (tmp_path / "t" / "targets").exists()
