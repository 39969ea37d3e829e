"""Taxonomy built from Kaggle metadata: index maps, round trips, hash, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from herbens.data.metadata import load_train_metadata
from herbens.data.taxonomy import LEVELS, Taxonomy
from herbens.core.errors import HerbensError

import kaggle_fixtures as kf


@pytest.fixture
def meta(tmp_path):
    # 15505 (Zizia) gets no training image: it stays in the taxonomy with count 0.
    root = kf.write_kaggle2022(tmp_path, counts={3: 4, 7: 3, 42: 5}, images=False)
    return load_train_metadata(root / "train_metadata.json")


@pytest.fixture
def tax(meta):
    return Taxonomy.from_metadata(meta)


def test_maps_from_metadata(tax):
    assert tax.category_ids.tolist() == [3, 7, 42, 15505]
    assert tax.species_names == ["Abies balsamea", "Abies fraseri", "Acer rubrum", "Zizia aurea"]
    assert tax.genus_names == ["Abies", "Acer", "Zizia"]
    assert tax.family_names == ["Apiaceae", "Pinaceae", "Sapindaceae"]
    assert tax.species_to_genus.tolist() == [0, 0, 1, 2]
    assert tax.species_to_family.tolist() == [1, 1, 2, 0]
    assert tax.counts.tolist() == [4, 3, 5, 0]
    assert [tax.num_classes(level) for level in LEVELS] == [4, 3, 3]


def test_level_counts(tax):
    assert tax.level_counts("species").tolist() == [4, 3, 5, 0]
    assert tax.level_counts("genus").tolist() == [7, 5, 0]
    assert tax.level_counts("family").tolist() == [0, 7, 5]


def test_level_indices_numpy_and_torch(tax):
    species = np.array([3, 0, 2])
    assert tax.level_indices("genus", species).tolist() == [2, 0, 1]
    assert tax.level_indices("family", torch.tensor([3, 0, 2])).tolist() == [0, 1, 2]
    assert tax.level_indices("species", species).tolist() == [3, 0, 2]
    with pytest.raises(HerbensError, match="unknown level 'order'"):
        tax.level_indices("order", species)


def test_index_of_category_of_round_trip(tax):
    ids = np.array([15505, 3, 42, 7, 42])
    idx = tax.index_of(ids)
    assert idx.tolist() == [3, 0, 2, 1, 2]  # non-contiguous ids map to contiguous indices
    assert tax.category_of(idx).tolist() == ids.tolist()
    assert tax.index_of(tax.category_of(np.arange(4))).tolist() == [0, 1, 2, 3]
    assert tax.index_of(["42"]).tolist() == [2]  # ids read from a CSV as text


@pytest.mark.parametrize("bad", [4, 15504, "oak"])
def test_unknown_category_id(tax, bad):
    with pytest.raises(HerbensError, match=f"unknown category_id {bad!r}"):
        tax.index_of([3, bad])


def test_save_load_keeps_hash(tax, tmp_path):
    path = tmp_path / "run" / "taxonomy.json"
    tax.save(path)
    loaded = Taxonomy.load(path)
    assert loaded.hash == tax.hash and loaded == tax
    assert loaded.counts.tolist() == tax.counts.tolist()
    assert loaded.category_ids.dtype == np.int64
    assert json.loads(path.read_text())["hash"] == tax.hash


def test_hash_is_16_hex_and_ignores_counts(tax):
    assert len(tax.hash) == 16 and int(tax.hash, 16) >= 0
    recounted = Taxonomy(tax.category_ids, tax.species_names, tax.genus_names, tax.family_names,
                         tax.species_to_genus, tax.species_to_family, tax.counts * 2)
    assert recounted.hash == tax.hash


def test_hash_changes_with_order_and_hierarchy(tax):
    d = tax.to_dict()
    swapped_ids = Taxonomy(d["category_ids"][::-1], d["species_names"][::-1], d["genus_names"],
                           d["family_names"], d["species_to_genus"][::-1], d["species_to_family"][::-1],
                           d["counts"][::-1])
    assert swapped_ids.hash != tax.hash
    moved = list(d["species_to_genus"])
    moved[1] = 1  # Abies fraseri moved to Acer
    regrouped = Taxonomy(d["category_ids"], d["species_names"], d["genus_names"], d["family_names"],
                         moved, d["species_to_family"], d["counts"])
    assert regrouped.hash != tax.hash
    refamilied = list(d["species_to_family"])
    refamilied[0] = 2
    assert Taxonomy(d["category_ids"], d["species_names"], d["genus_names"], d["family_names"],
                    d["species_to_genus"], refamilied, d["counts"]).hash != tax.hash


def test_hash_stable_regardless_of_metadata_order(tmp_path, tax):
    meta = kf.kaggle2022_metadata(counts={3: 4, 7: 3, 42: 5})
    meta["categories"].reverse()
    meta["images"].reverse()
    path = tmp_path / "other.json"
    path.write_text(json.dumps(meta))
    assert Taxonomy.from_metadata(load_train_metadata(path)).hash == tax.hash


def test_load_rejects_edited_file(tax, tmp_path):
    path = tmp_path / "taxonomy.json"
    tax.save(path)
    data = json.loads(path.read_text())
    data["species_to_genus"][1] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(HerbensError, match="does not match its content"):
        Taxonomy.load(path)
    del data["genus_names"]
    path.write_text(json.dumps(data))
    with pytest.raises(HerbensError, match="not a herbens taxonomy file"):
        Taxonomy.load(path)


def test_inconsistent_lengths_and_duplicates_rejected():
    with pytest.raises(HerbensError, match="counts has 1 entries for 2 species"):
        Taxonomy([1, 2], ["a b", "c d"], ["a"], ["f"], [0, 0], [0, 0], [1])
    with pytest.raises(HerbensError, match="duplicate category_id"):
        Taxonomy([1, 1], ["a b", "c d"], ["a"], ["f"], [0, 0], [0, 0], [1, 1])


# ----- counts of a run: its training split --------------------------------------------------------

@pytest.mark.parametrize("limit_train", [None, 9])
def test_run_counts_are_its_training_rows(tmp_path, limit_train):
    from herbens.data.run_data import load_run_data
    from herbens.data.taxonomy import COUNTS_TRAIN_SPLIT

    root = kf.write_kaggle2022(tmp_path / "data", counts={3: 6, 7: 4, 42: 5}, images=False)
    cfg = {"data": {"root": str(root), "format": "auto", "limit_train": limit_train, "val_fraction": 0.34,
                    "split_seed": 1, "val_min_images": 2}}
    data = load_run_data(cfg, tmp_path / "run", reuse_split=False)
    per_species = data.train["category_id"].value_counts()
    expected = [int(per_species.get(c, 0)) for c in data.taxonomy.category_ids]
    assert data.taxonomy.counts.tolist() == expected
    assert data.taxonomy.counts.sum() == len(data.train) and len(data.val) > 0  # validation not counted
    assert data.taxonomy.counts_source == COUNTS_TRAIN_SPLIT
    if limit_train:
        assert len(data.train) + len(data.val) == limit_train
    # What the run stores, and reads back, is that prior (the hash ignores counts).
    data.taxonomy.save(tmp_path / "run" / "taxonomy.json")
    loaded = Taxonomy.load(tmp_path / "run" / "taxonomy.json")
    assert loaded.counts.tolist() == expected and loaded.counts_source == COUNTS_TRAIN_SPLIT
    assert loaded.hash == Taxonomy.from_metadata(load_train_metadata(root / "train_metadata.json")).hash


def test_old_taxonomy_files_load_with_metadata_counts(tax, tmp_path):
    from herbens.data.taxonomy import COUNTS_METADATA

    d = tax.to_dict()
    del d["counts_source"]
    path = tmp_path / "taxonomy.json"
    path.write_text(json.dumps(d))
    loaded = Taxonomy.load(path)
    assert loaded.counts.tolist() == tax.counts.tolist() and loaded.counts_source == COUNTS_METADATA
