"""The knn OOD score: k-th nearest training embedding distance, against a slow reference, and a
bundle exported with it (banks stored, threshold fitted, predictions scored and explained)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from herbens.bundle import distance
from herbens.bundle.export import export_bundle
from herbens.bundle.load import load_bundle
from herbens.cli.main import main
from herbens.core.errors import HerbensError
from herbens.stores.embeddings import read_embeddings
from test_enrol import held_out  # noqa: F401 - the module-scoped run with embeddings


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(queries, vectors, species, k):
    """The slow obvious score: per species its k_c-th largest cosine, the closest species."""
    out = []
    for q in queries:
        per_species = []
        for c in sorted(set(species.tolist())):
            sims = sorted((float(q @ v) for v, s in zip(vectors, species) if s == c), reverse=True)
            per_species.append(1 - sims[min(k, len(sims)) - 1])
        out.append(min(per_species))
    return out


def test_species_distance_matches_a_loop_over_species():
    rng = np.random.default_rng(0)
    queries, vectors = _unit(rng, 7, 5), _unit(rng, 11, 5)
    species = np.array([30, 4, 4, 30, 9, 30, 4, 30, 30, 30, 4])  # 6, 4 and 1 rows, unsorted
    bank = distance.Bank(vectors, species)
    for k in (1, 3, 5, 50):
        expected = _reference(queries, vectors, species, k)
        np.testing.assert_allclose(distance.species_distance(queries, bank, k), expected, atol=1e-6)
        # Blocks of one or two query rows give the same numbers.
        np.testing.assert_allclose(distance.species_distance(queries, bank, k, block_cells=20), expected, atol=1e-6)
    both = distance.combined_distance([queries, queries], [bank, distance.Bank(vectors[:4], species[:4])], k=2)
    np.testing.assert_allclose(both, (np.array(_reference(queries, vectors, species, 2))
                                      + _reference(queries, vectors[:4], species[:4], 2)) / 2, atol=1e-6)
    with pytest.raises(HerbensError, match="empty"):
        distance.species_distance(queries, distance.Bank(vectors[:0], species[:0]))


def test_a_species_of_two_rows_is_near_its_own_images_and_far_images_stay_far():
    """The score is class-conditional: a species enrolled from 2 images is judged by those 2,
    where the 5th nearest row over all species would be another species' far row."""
    rng = np.random.default_rng(1)
    centres = _unit(rng, 4, 16)
    def around(centre, n, spread=0.05):
        x = centre + spread * rng.normal(size=(n, 16))
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    trained = np.concatenate([around(c, 20) for c in centres[:3]])
    enrolled = around(centres[3], 2)
    bank = distance.Bank(np.concatenate([trained, enrolled]), np.repeat([10, 11, 12, 99], [20, 20, 20, 2]))
    known = np.concatenate([around(c, 10) for c in centres[:3]])
    # A threshold between the within-species scale (spread 0.05: 1 - cos ~ 0.03) and random
    # directions (1 - cos ~ 1): every known sheet is kept.
    threshold = 0.1
    assert (distance.species_distance(known, bank) <= threshold).all()
    new_sheets, far = around(centres[3], 5), _unit(rng, 5, 16)
    assert (distance.species_distance(new_sheets, bank) <= threshold).all()
    assert (distance.species_distance(far, bank) > threshold).all()
    # The 5th nearest over all rows (the old score) flagged the enrolled species' sheets.
    pooled = distance.Bank(bank.vectors, np.zeros(len(bank), np.int64))
    assert (distance.species_distance(new_sheets, pooled) > threshold).all()


def test_stratified_sample_caps_every_species_and_keeps_small_ones():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 5)
    rows = distance.stratified_sample(labels, 3, seed=0)
    assert np.bincount(labels[rows]).tolist() == [3, 2, 3]
    assert list(rows) == sorted(set(rows.tolist()))
    assert list(rows) == list(distance.stratified_sample(labels, 3, seed=0))  # seeded


def test_knn_bundle_scores_images_by_distance_and_says_so(held_out, tmp_path):  # noqa: F811
    run = held_out[0]
    bundle_dir = export_bundle(run, tmp_path / "knn", ood_score="knn", log=lambda _: None)
    bundle = load_bundle(bundle_dir)
    record = json.loads((bundle_dir / "bundle.json").read_text())
    train = read_embeddings(run, "train")
    (bank,) = bundle.ood_banks
    assert record["ood_bank"]["rows"] == [len(bank)] and len(bank) <= distance.PER_SPECIES * 5
    assert "members/" + record["members"][0] + "/ood_bank.npy" in json.loads((bundle_dir / "manifest.json").read_text())["files"]
    # The threshold keeps ~95 % of the known validation images (in sample).
    assert record["thresholds"]["in_sample"]["ood_flagged"] <= 0.1
    # Predicted OOD scores are the negated distances of the images' embeddings to the bank.
    folder = tmp_path / "far"
    folder.mkdir()
    Image.new("RGB", (64, 96), (255, 255, 255)).save(folder / "blank.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)).save(folder / "noise.png")
    sheets = held_out[2][:2]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(folder / "blank.png"), str(folder / "noise.png"), *sheets]) + "\n")
    out = tmp_path / "p.json"
    main(["predict", str(bundle_dir), str(listing), "-o", str(out), "--format", "json", "--no-progress"])
    items = json.loads(out.read_text())["predictions"]
    assert len(items) == 4
    test = read_embeddings(run, "test")
    # The held-out sheets are the run's test split: their stored embeddings give the reference distance.
    meta = pd.read_csv(run.parent.parent / "data" / "test_metadata.csv")
    image_id = {f: str(i) for f, i in zip(meta["file_name"], meta["image_id"])}
    for item in items[2:]:
        row = test.image_ids.index(image_id[item["path"]])
        reference = distance.species_distance(np.asarray(test.matrix[[row]], np.float32), bank)[0]
        assert -item["ood_score"] == pytest.approx(reference, abs=5e-3)  # float16 storage and rounding
    for item in items:
        if item["decision"] == "unknown" and item["ood_score"] < bundle.thresholds["ood"]:
            assert item["reason"].startswith("OOD distance ") and "above its threshold" in item["reason"]
    assert len(train) >= len(bank) and np.isfinite([it["ood_score"] for it in items]).all()


def test_enrolment_adds_its_images_to_the_banks_and_unenrol_removes_them(held_out, tmp_path):  # noqa: F811
    from herbens.bundle.enrolment import enrol_species, unenrol_species
    from test_enrol import _files, _shots

    run, _, held, _ = held_out
    bundle_dir = export_bundle(run, tmp_path / "knn", ood_score="knn", log=lambda _: None)
    before, (trained,) = _files(bundle_dir), load_bundle(bundle_dir).ood_banks
    enrol_species(bundle_dir, _shots(held[:3], tmp_path / "shots"), "Novelia prima", family="Novaceae",
                  log=lambda _: None)
    enrolled = load_bundle(bundle_dir)
    (bank,) = enrolled.ood_banks
    assert len(bank) == len(trained) + 3 and np.array_equal(bank.vectors[:len(trained)], trained.vectors)
    assert set(bank.species[len(trained):].tolist()) == set(enrolled.names["category_id"].tolist()[-1:])
    # The held-out species' other sheets are now nearer the bank than before (their own shots joined it).
    out = tmp_path / "p.json"
    listing = tmp_path / "l.txt"
    listing.write_text("\n".join(held[3:]) + "\n")
    main(["predict", str(bundle_dir), str(listing), "-o", str(out), "--format", "json", "--no-progress"])
    after = [-it["ood_score"] for it in json.loads(out.read_text())["predictions"]]
    test = read_embeddings(run, "test")
    meta = pd.read_csv(run.parent.parent / "data" / "test_metadata.csv")
    image_id = {f: str(i) for f, i in zip(meta["file_name"], meta["image_id"])}
    rows = [test.image_ids.index(image_id[p]) for p in held[3:]]
    queries = np.asarray(test.matrix[rows], np.float32)
    np.testing.assert_allclose(after, distance.species_distance(queries, bank), atol=5e-3)
    assert (distance.species_distance(queries, bank) <= distance.species_distance(queries, trained) + 1e-9).all()
    unenrol_species(bundle_dir, name="Novelia prima", log=lambda _: None)
    assert _files(bundle_dir) == before


def test_a_species_enrolled_from_two_sheets_is_not_flagged_by_a_knn_bundle(held_out, tmp_path):  # noqa: F811
    """Its other sheets are measured against its own 2 rows (k_c = 2), blank and noise pages
    against every species: the sheets are kept, the far pages flagged."""
    from herbens.bundle.enrolment import enrol_species
    from test_enrol import _shots

    run, _, held, _ = held_out
    bundle_dir = export_bundle(run, tmp_path / "knn", ood_score="knn", log=lambda _: None)
    enrol_species(bundle_dir, _shots(held[:2], tmp_path / "shots"), "Novelia prima", family="Novaceae",
                  log=lambda _: None)
    folder = tmp_path / "far"
    folder.mkdir()
    Image.new("RGB", (64, 96), (255, 255, 255)).save(folder / "blank.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 64, 3), dtype=np.uint8)).save(folder / "noise.png")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*held[2:], str(folder / "blank.png"), str(folder / "noise.png")]) + "\n")
    out = tmp_path / "p.json"
    main(["predict", str(bundle_dir), str(listing), "-o", str(out), "--format", "json", "--no-progress"])
    items = json.loads(out.read_text())["predictions"]
    threshold = load_bundle(bundle_dir).thresholds["ood"]
    sheets, far = items[:-2], items[-2:]
    assert len(sheets) == len(held) - 2 and all(it["ood_score"] >= threshold for it in sheets)
    assert all(it["ood_score"] < threshold and it["reason"].startswith("OOD distance ") for it in far)
