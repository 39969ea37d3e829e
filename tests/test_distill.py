"""A student trains on a teacher's sparse targets: aligned by image id, checked before epoch 1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import train_tiny
from herbens.data.metadata import load_train_metadata
from herbens.data.taxonomy import Taxonomy
from herbens.targets import open_targets_writer


def _planted_teacher(root, out, drop: int = 0, taxonomy_hash: str | None = None):
    """Targets for every training-metadata image: 90 % on the true class, the rest spread."""
    meta = load_train_metadata(root / "train_metadata.json")
    taxonomy = Taxonomy.from_metadata(meta)
    ids = meta.images["image_id"].astype(str).tolist()[drop:]
    species = taxonomy.index_of(meta.images["category_id"].to_numpy())[drop:]
    shapes = {level: (3, taxonomy.num_classes(level)) for level in ("species", "genus")}
    with open_targets_writer(out, "train", ids, shapes, {"taxonomy_hash": taxonomy_hash or taxonomy.hash}) as writer:
        for level, (_, c) in shapes.items():
            probs = np.full((len(ids), c), 0.1 / c)
            probs[np.arange(len(ids)), taxonomy.level_indices(level, species)] += 0.9
            writer.write(level, 0, np.log(probs))
    return out


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_student_trains_on_the_teacher_targets_of_its_levels(tiny_herbarium, tmp_path):
    teacher = _planted_teacher(tiny_herbarium, tmp_path / "teacher")
    assert train_tiny(tiny_herbarium, tmp_path, extra=[
        "name=student", "train.epochs=1", f"distill.teacher={teacher}", "distill.alpha=0.7",
        "distill.temperature=2.0"]) == 0
    record = _history(tmp_path / "student")[-1]
    # The teacher stored species and genus: both are distilled, family keeps its own loss only.
    assert np.isfinite(record["loss_species_distill"]) and np.isfinite(record["loss_genus_distill"])
    assert "loss_family_distill" not in record


def test_alpha_zero_trains_exactly_like_no_teacher(tiny_herbarium, tmp_path):
    teacher = _planted_teacher(tiny_herbarium, tmp_path / "teacher")
    common = ["train.epochs=1", "train.deterministic=true"]
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=plain", *common]) == 0
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=zero", *common, f"distill.teacher={teacher}",
                                                       "distill.alpha=0"]) == 0
    assert _history(tmp_path / "plain")[-1]["train_loss"] == pytest.approx(_history(tmp_path / "zero")[-1]["train_loss"])


def test_a_teacher_missing_training_images_is_refused_before_training(tiny_herbarium, tmp_path, capsys):
    teacher = _planted_teacher(tiny_herbarium, tmp_path / "teacher", drop=3)
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=s", f"distill.teacher={teacher}"]) == 2
    err = capsys.readouterr().err
    assert "have no teacher targets" in err and "same data.root, split and limit_train" in err
    assert not (tmp_path / "s" / "checkpoints").exists()


def test_a_teacher_of_another_taxonomy_is_refused(tiny_herbarium, tmp_path, capsys):
    teacher = _planted_teacher(tiny_herbarium, tmp_path / "teacher", taxonomy_hash="0123456789abcdef")
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=s", f"distill.teacher={teacher}"]) == 2
    assert "written for taxonomy 0123456789abcdef" in capsys.readouterr().err


def test_distillation_with_mixup_is_refused(tiny_herbarium, tmp_path, capsys):
    teacher = _planted_teacher(tiny_herbarium, tmp_path / "teacher")
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=s", f"distill.teacher={teacher}",
                                                       "augment.mixup=0.2"]) == 2
    assert "cannot be combined with mixup" in capsys.readouterr().err
