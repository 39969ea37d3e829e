"""Seeded stratified split and split.csv round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from herbens.data.splits import load_split, save_split, stratified_split
from herbens.core.errors import HerbensError


def make_images(counts: dict[int, int]) -> pd.DataFrame:
    rows = [{"image_id": f"{cid:05d}__{k:03d}", "file_name": f"{cid}/{k}.jpg", "category_id": cid}
            for cid, n in counts.items() for k in range(n)]
    return pd.DataFrame(rows)


COUNTS = {3: 10, 7: 2, 42: 1, 99: 7, 15505: 40}


def test_quota_per_species():
    train, val = stratified_split(make_images(COUNTS), val_fraction=0.2, seed=0)
    per_val = val["category_id"].value_counts().to_dict()
    per_train = train["category_id"].value_counts().to_dict()
    # round(n * 0.2) clamped to [1, n - 1]; the single-image species is never split
    assert per_val == {3: 2, 7: 1, 99: 1, 15505: 8}
    assert per_train == {3: 8, 7: 1, 42: 1, 99: 6, 15505: 32}
    assert set(train["image_id"]).isdisjoint(val["image_id"])
    assert len(train) + len(val) == sum(COUNTS.values())
    assert list(train.columns) == ["image_id", "file_name", "category_id"]


def test_half_rounds_up_and_clamps():
    _, val = stratified_split(make_images({1: 5, 2: 25, 3: 3}), val_fraction=0.1, seed=1)
    # 0.5 -> 1, 2.5 -> 3, 0.3 -> clamped to 1
    assert val["category_id"].value_counts().to_dict() == {1: 1, 2: 3, 3: 1}
    _, val = stratified_split(make_images({1: 4}), val_fraction=0.9, seed=1)
    assert len(val) == 3  # at least one image stays in training


def test_min_images():
    _, val = stratified_split(make_images({1: 2, 2: 3, 3: 4}), val_fraction=0.3, seed=0, min_images=4)
    assert set(val["category_id"]) == {3}


def test_deterministic_and_independent_of_row_order():
    images = make_images(COUNTS)
    _, a = stratified_split(images, 0.25, seed=7)
    shuffled = images.sample(frac=1.0, random_state=3).reset_index(drop=True)
    _, b = stratified_split(shuffled, 0.25, seed=7)
    assert a["image_id"].tolist() == b["image_id"].tolist()
    assert a["image_id"].is_monotonic_increasing


def test_seed_changes_the_split():
    images = make_images({1: 40, 2: 40})
    picks = {tuple(stratified_split(images, 0.25, seed=s)[1]["image_id"]) for s in range(4)}
    assert len(picks) == 4


def test_species_split_unaffected_by_other_species():
    _, alone = stratified_split(make_images({1: 30}), 0.2, seed=5)
    _, together = stratified_split(make_images({1: 30, 2: 12}), 0.2, seed=5)
    assert alone["image_id"].tolist() == together.loc[together["category_id"] == 1, "image_id"].tolist()


def test_selection_is_spread_not_first_rows():
    _, val = stratified_split(make_images({1: 100}), 0.1, seed=0)
    picked = sorted(int(i.split("__")[1]) for i in val["image_id"])
    assert picked != list(range(10)) and picked != list(range(90, 100))


def test_zero_fraction_and_int_ids():
    images = pd.DataFrame({"image_id": [3, 1, 2], "category_id": [5, 5, 5]})
    train, val = stratified_split(images, 0.0, seed=0)
    assert val.empty and train["image_id"].tolist() == ["1", "2", "3"]
    _, val = stratified_split(images, 0.34, seed=0)
    assert len(val) == 1 and isinstance(val["image_id"].iloc[0], str)


@pytest.mark.parametrize("kwargs,message", [
    ({"val_fraction": 1.0}, "val_fraction must be in"),
    ({"val_fraction": -0.1}, "val_fraction must be in"),
    ({"val_fraction": 0.2, "min_images": 1}, "min_images must be at least 2"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(HerbensError, match=message):
        stratified_split(make_images({1: 4}), seed=0, **kwargs)


def test_bad_tables():
    with pytest.raises(HerbensError, match="no category_id column"):
        stratified_split(pd.DataFrame({"image_id": ["a"]}), 0.2, seed=0)
    with pytest.raises(HerbensError, match="duplicate image_id 'a'"):
        stratified_split(pd.DataFrame({"image_id": ["a", "a"], "category_id": [1, 1]}), 0.2, seed=0)
    with pytest.raises(HerbensError, match="no category_id"):
        stratified_split(pd.DataFrame({"image_id": ["a", "b"], "category_id": [1, np.nan]}), 0.2, seed=0)


def test_save_load_round_trip(tmp_path):
    ids = ["007", "NA", "00026__004", "1"]
    path = tmp_path / "run" / "split.csv"
    save_split(path, ids)
    assert path.read_text().splitlines()[0] == "image_id"
    assert load_split(path) == ids
    assert not list(path.parent.glob(".*tmp*"))  # atomic write leaves no temporary file
    save_split(path, [])
    assert load_split(path) == []


def test_save_rejects_duplicates_and_keeps_old_file(tmp_path):
    path = tmp_path / "split.csv"
    save_split(path, ["a"])
    with pytest.raises(HerbensError, match="duplicate image_id 'b'"):
        save_split(path, ["b", "b"])
    assert load_split(path) == ["a"]


@pytest.mark.parametrize("text,message", [
    ("", "expected a header line"),
    ("id\na\n", "expected a header line"),
    ("image_id\na\na\n", "duplicate image_id 'a' \\(line 3\\)"),
    ("image_id\na\n\nb\n", "empty image_id \\(line 3\\)"),
])
def test_load_errors(tmp_path, text, message):
    path = tmp_path / "split.csv"
    path.write_text(text)
    with pytest.raises(HerbensError, match=message):
        load_split(path)


def test_load_missing(tmp_path):
    with pytest.raises(HerbensError, match="split file not found"):
        load_split(tmp_path / "split.csv")
