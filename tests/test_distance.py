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


def test_kth_distance_matches_a_sorted_loop():
    rng = np.random.default_rng(0)
    queries, bank = _unit(rng, 7, 5), _unit(rng, 11, 5)
    for k in (1, 3, 11, 50):
        expected = [1 - sorted((q @ b for b in bank), reverse=True)[min(k, 11) - 1] for q in queries]
        np.testing.assert_allclose(distance.kth_distance(queries, bank, k), expected, atol=1e-6)
    both = distance.combined_distance([queries, queries], [bank, bank[:4]], k=2)
    np.testing.assert_allclose(both, (distance.kth_distance(queries, bank, 2) + distance.kth_distance(queries, bank[:4], 2)) / 2)
    with pytest.raises(HerbensError, match="empty"):
        distance.kth_distance(queries, bank[:0])


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
        reference = distance.kth_distance(np.asarray(test.matrix[[row]], np.float32), bank)[0]
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
    assert len(bank) == len(trained) + 3 and np.array_equal(bank[:len(trained)], trained)
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
    np.testing.assert_allclose(after, distance.kth_distance(queries, bank), atol=5e-3)
    assert (distance.kth_distance(queries, bank) <= distance.kth_distance(queries, trained) + 1e-9).all()
    unenrol_species(bundle_dir, name="Novelia prima", log=lambda _: None)
    assert _files(bundle_dir) == before
