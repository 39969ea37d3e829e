"""Tests of the synthetic herbarium generator (herbens.data.synth).

The generated dataset is the embedded demo and test data of every other module, so its layout
is checked field by field against the Kaggle Herbarium 2022 contract in DESIGN.md.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from herbens.cli.main import main
from herbens.data import synth
from herbens.data.synth import write as synth_write
from herbens.core.errors import HerbensError

SMALL = dict(species=12, seed=3, long_edge=64, min_images=2, max_images=30, test_per_species=2,
             institutions=3, progress=False)


def _synth(path: Path, **overrides) -> dict:
    return synth.synthesize(path, **{**SMALL, "workers": 1, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "h22"
    _synth(path)
    return path


def _train(dataset: Path) -> dict:
    return json.loads((dataset / "train_metadata.json").read_text())


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def test_train_metadata_has_the_kaggle_2022_fields(dataset):
    meta = _train(dataset)
    assert set(meta) == {"annotations", "categories", "genera", "images", "distances",
                         "institutions", "license"}
    assert all(set(i) == {"image_id", "file_name", "license"} for i in meta["images"])
    assert all(set(a) == {"image_id", "category_id", "genus_id", "institution_id"}
               for a in meta["annotations"])
    assert all(set(c) == {"category_id", "scientificName", "authors", "family", "genus", "species"}
               for c in meta["categories"])
    assert all(set(g) == {"genus_id", "genus"} for g in meta["genera"])
    assert all(set(d) == {"genus_id_x", "genus_id_y", "distance"} for d in meta["distances"])
    assert all(set(i) == {"institution_id", "collectionCode"} for i in meta["institutions"])
    licenses = {lic["id"] for lic in meta["license"]}
    assert {i["license"] for i in meta["images"]} <= licenses


def test_train_image_ids_and_paths_follow_the_kaggle_pattern(dataset):
    meta = _train(dataset)
    category_of = {a["image_id"]: a["category_id"] for a in meta["annotations"]}
    for image in meta["images"]:
        image_id, cid = image["image_id"], category_of[image["image_id"]]
        assert re.fullmatch(r"\d{5}__\d{3}", image_id)
        assert image_id.startswith(f"{cid:05d}__")
        assert image["file_name"] == f"{cid // 100:03d}/{cid % 100:02d}/{image_id}.jpg"
        assert (dataset / "train_images" / image["file_name"]).is_file()


def test_every_annotation_joins_to_exactly_one_image(dataset):
    meta = _train(dataset)
    image_ids = [i["image_id"] for i in meta["images"]]
    annotated = [a["image_id"] for a in meta["annotations"]]
    assert len(set(image_ids)) == len(image_ids)
    assert sorted(annotated) == sorted(image_ids)
    # Not in the same order: a reader that joins by position instead of image_id must fail.
    assert annotated != image_ids


def test_categories_ids_are_unique_and_not_contiguous(dataset):
    categories = _train(dataset)["categories"]
    ids = [c["category_id"] for c in categories]
    assert len(ids) == SMALL["species"] == len(set(ids))
    assert max(ids) - min(ids) + 1 > len(ids), "category_ids must have gaps"


def test_category_names_genera_and_annotations_agree(dataset):
    meta = _train(dataset)
    genus_id = {g["genus"]: g["genus_id"] for g in meta["genera"]}
    assert len(genus_id) == len(meta["genera"])
    by_id = {c["category_id"]: c for c in meta["categories"]}
    for c in meta["categories"]:
        assert c["scientificName"] == f"{c['genus']} {c['species']}"
        assert " " not in c["species"] and c["species"].islower()
        assert c["family"].endswith("aceae")
        assert c["genus"] in genus_id
    pairs = [(c["genus"], c["species"]) for c in meta["categories"]]
    assert len(set(pairs)) == len(pairs), "an epithet is unique within its genus"
    institutions = {i["institution_id"] for i in meta["institutions"]}
    for a in meta["annotations"]:
        assert a["genus_id"] == genus_id[by_id[a["category_id"]]["genus"]]
        assert a["institution_id"] in institutions
    families_of_genus = Counter()
    for genus, family in {(c["genus"], c["family"]) for c in meta["categories"]}:
        families_of_genus[genus] += 1
    assert max(families_of_genus.values()) == 1, "a genus belongs to one family"


def test_distances_cover_genus_pairs(dataset):
    meta = _train(dataset)
    ids = {g["genus_id"] for g in meta["genera"]}
    n = len(ids)
    assert len(meta["distances"]) == n * (n - 1) // 2
    for d in meta["distances"]:
        assert d["genus_id_x"] in ids and d["genus_id_y"] in ids and d["genus_id_x"] < d["genus_id_y"]
        assert 0 < d["distance"] <= 1


def test_training_counts_are_long_tailed_within_bounds(dataset):
    counts = Counter(a["category_id"] for a in _train(dataset)["annotations"])
    assert len(counts) == SMALL["species"]
    assert min(counts.values()) == SMALL["min_images"]
    assert max(counts.values()) == SMALL["max_images"]
    values = sorted(counts.values())
    assert values[len(values) // 2] < np.mean(values), "a long tail: median below mean"


def test_genus_and_family_sizes_are_uneven():
    plan = synth.make_plan(200, seed=0, min_images=3, max_images=80, test_per_species=1, institutions=4)
    species_per_genus = Counter(t.genus for t in plan.taxa)
    genera_per_family = Counter(f for f, _ in {(t.family, t.genus) for t in plan.taxa})
    assert min(species_per_genus.values()) == 1 and max(species_per_genus.values()) >= 6
    assert min(genera_per_family.values()) == 1 and max(genera_per_family.values()) >= 5


def test_visual_cues_are_nested_in_the_taxonomy():
    plan = synth.make_plan(120, seed=1, min_images=3, max_images=80, test_per_species=1, institutions=4)
    by_genus: dict = {}
    by_family: dict = {}
    for t in plan.taxa:
        by_genus.setdefault(t.genus, []).append(t.look)
        by_family.setdefault(t.family, []).append(t.look)
    for looks in by_family.values():
        assert len({(lk.arrangement, lk.venation) for lk in looks}) == 1
    for looks in by_genus.values():
        assert len({(lk.shape, lk.aspect) for lk in looks}) == 1
        coarse = [(lk.leaf_len, lk.hue, lk.nodes) for lk in looks]
        assert len(set(coarse)) == len(coarse), "sibling species differ in size, tint or leaf count"
    family_cues = {(looks[0].arrangement, looks[0].venation) for looks in by_family.values()}
    assert len(family_cues) == min(16, len(by_family))


def test_test_metadata_is_a_bare_list_with_kaggle_names(dataset):
    test = json.loads((dataset / "test_metadata.json").read_text())
    assert isinstance(test, list)
    assert len(test) == SMALL["species"] * SMALL["test_per_species"]
    for i, record in enumerate(test):
        assert set(record) == {"image_id", "file_name", "license"}
        assert str(record["image_id"]) == str(i)
        assert record["file_name"] == f"{i // 1000:03d}/test-{i:06d}.jpg"
        assert (dataset / "test_images" / record["file_name"]).is_file()


def test_solution_and_sample_submission(dataset):
    test_ids = [str(r["image_id"]) for r in json.loads((dataset / "test_metadata.json").read_text())]
    valid = {c["category_id"] for c in _train(dataset)["categories"]}
    header, rows = _read_csv(dataset / "test_solution.csv")
    assert header == ["Id", "Predicted"]
    assert [r[0] for r in rows] == test_ids
    truth = Counter(int(r[1]) for r in rows)
    assert set(truth) == valid and set(truth.values()) == {SMALL["test_per_species"]}
    assert (dataset / "sample_submission.csv").read_text().splitlines()[0] == "Id,Predicted"
    header, rows = _read_csv(dataset / "sample_submission.csv")
    assert [r[0] for r in rows] == test_ids
    assert all(int(r[1]) in valid for r in rows)


def test_images_are_portrait_sheets_of_the_requested_size(dataset):
    files = sorted((dataset / "train_images").rglob("*.jpg"))[:5]
    files += sorted((dataset / "test_images").rglob("*.jpg"))[:3]
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (round(64 * synth.SHEET_ASPECT), 64)


def test_render_sheet_draws_a_plant_on_pale_paper():
    plan = synth.make_plan(4, seed=0, min_images=1, max_images=2, test_per_species=0, institutions=1)
    image = synth.render_sheet(plan.taxa[0].look, plan.inst_looks[0], np.random.default_rng(0),
                               long_edge=300)
    assert image.size == (204, 300)
    pixels = np.asarray(image, dtype=np.float32)
    paper = pixels[90:110, 185:200].mean(axis=(0, 1))  # right edge, mid height: bare paper
    assert paper.min() > 180 and paper[0] >= paper[2], "cream paper, warmer than blue"
    greenish = (pixels[..., 1] > pixels[..., 2] + 15) & (pixels.mean(axis=2) < 170)
    assert greenish.mean() > 0.02, "a green plant covers part of the sheet"


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(dataset, tmp_path):
    # workers=2 uses the process pool (more than 64 images); the fixture was drawn with one.
    _synth(tmp_path / "again", workers=2)
    names = ["train_metadata.json", "test_metadata.json", "test_solution.csv",
             "sample_submission.csv"]
    images = [f"train_images/{i['file_name']}" for i in _train(dataset)["images"][::17]]
    images += ["test_images/000/test-000000.jpg", "test_images/000/test-000007.jpg"]
    for name in names + images:
        assert (tmp_path / "again" / name).read_bytes() == (dataset / name).read_bytes(), name


def test_another_seed_gives_another_dataset(dataset, tmp_path):
    _synth(tmp_path / "other", seed=4)
    assert (tmp_path / "other" / "train_metadata.json").read_bytes() != \
        (dataset / "train_metadata.json").read_bytes()
    ours = sorted((dataset / "test_images").rglob("*.jpg"))[0].read_bytes()
    theirs = sorted((tmp_path / "other" / "test_images").rglob("*.jpg"))[0].read_bytes()
    assert ours != theirs


def test_interrupted_run_leaves_no_metadata(tmp_path, monkeypatch):
    out = tmp_path / "h22"
    _synth(out, species=3, max_images=3)
    assert (out / "train_metadata.json").is_file()
    calls = []

    def crash(job):
        calls.append(job)
        if len(calls) > 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(synth_write, "_render_job", crash)
    with pytest.raises(KeyboardInterrupt):
        _synth(out, species=3, max_images=3)
    # The metadata of the earlier, complete run went first: no stale file can pass for new.
    for name in synth.METADATA_FILES:
        assert not (out / name).exists(), name


def test_summary_counts(tmp_path):
    summary = _synth(tmp_path, species=5, min_images=1, max_images=4, test_per_species=1)
    meta = _train(tmp_path)
    assert summary["species"] == 5 and summary["test_images"] == 5
    assert summary["train_images"] == len(meta["images"])
    assert summary["genera"] == len(meta["genera"])
    assert summary["families"] == len({c["family"] for c in meta["categories"]})


@pytest.mark.parametrize("bad", [dict(species=0), dict(min_images=5, max_images=4),
                                 dict(long_edge=8), dict(institutions=0), dict(difficulty=-1.0),
                                 dict(seed=-1)])
def test_bad_arguments_raise_herbens_error(tmp_path, bad):
    with pytest.raises(HerbensError, match="synth"):
        _synth(tmp_path, **bad)


def test_cli_writes_a_dataset_and_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    status = main(["synth", str(out), "--species", "6", "--long-edge", "64", "--min-images", "2",
                   "--max-images", "5", "--test-per-species", "1", "--seed", "1",
                   "--institutions", "2", "--difficulty", "0.5", "--workers", "1", "--no-progress"])
    assert status == 0
    assert "6 species" in capsys.readouterr().out
    meta = _train(out)
    assert len(meta["categories"]) == 6
    with Image.open(out / "train_images" / meta["images"][0]["file_name"]) as image:
        assert image.height == 64


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert main(["synth", str(tmp_path), "--species", "0", "--no-progress"]) == 2
    assert "herbens: error: synth: --species" in capsys.readouterr().err
