"""Metadata loading: Kaggle 2022 / 2021 / CSV, and a clear HerbensError on every bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from herbens.data.metadata import (find_dataset, inspect_train_metadata, load_test_metadata,
                                   load_train_metadata)
from herbens.core.errors import HerbensError

import kaggle_fixtures as kf


def write_meta(tmp_path, meta, name="train_metadata.json"):
    path = tmp_path / name
    path.write_text(json.dumps(meta))
    return path


# ----- Kaggle 2022 --------------------------------------------------------------------------

def test_kaggle2022_tidy_table_joined_on_image_id(tmp_path):
    root = kf.write_kaggle2022(tmp_path, images=False)
    meta = load_train_metadata(root / "train_metadata.json")
    assert meta.images_dir == root / "train_images"
    assert meta.source == root / "train_metadata.json"
    assert list(meta.images.columns) == ["image_id", "file_name", "category_id", "genus_id", "institution_id"]
    assert len(meta.images) == sum(kf.DEFAULT_COUNTS.values())
    # Annotations are listed in reverse order: each label must still match its own image.
    for row in meta.images.itertuples():
        assert row.image_id.startswith(f"{row.category_id:05d}__")
        assert row.file_name == kf.kaggle2022_file_name(row.category_id, row.image_id)
    assert all(isinstance(i, str) for i in meta.images["image_id"])
    assert str(meta.images["category_id"].dtype) == "int64"
    acer = meta.images[meta.images["category_id"] == 42]
    assert set(acer["genus_id"]) == {5}
    assert sorted(acer["institution_id"]) == [0, 0, 1, 1, 2]


def test_kaggle2022_categories_sorted_non_contiguous_with_epithet(tmp_path):
    root = kf.write_kaggle2022(tmp_path, images=False)
    cats = load_train_metadata(root / "train_metadata.json").categories
    assert cats["category_id"].tolist() == [3, 7, 42, 15505]
    assert list(cats.columns) == ["category_id", "scientific_name", "family", "genus", "species"]
    zizia = cats.iloc[3]
    assert (zizia.scientific_name, zizia.family, zizia.genus, zizia.species) == (
        "Zizia aurea", "Apiaceae", "Zizia", "aurea")


@pytest.mark.parametrize("license_key", ["license", "licenses", None])
def test_kaggle2022_license_key_spellings(tmp_path, license_key):
    meta = kf.kaggle2022_metadata(license_key=license_key or "license")
    if license_key is None:
        del meta["license"]
    path = write_meta(tmp_path, meta)
    assert len(load_train_metadata(path).images) == 14


def test_kaggle2022_integer_image_ids_become_strings(tmp_path):
    root = kf.write_kaggle2022(tmp_path, int_ids=True, images=False)
    meta = load_train_metadata(root / "train_metadata.json")
    assert sorted(meta.images["image_id"]) == [str(i) for i in range(1000, 1014)]
    # image 1000 is the first Abies balsamea image (categories are listed in count order)
    assert meta.images.set_index("image_id").loc["1000", "category_id"] == 3


def test_ids_given_as_strings_and_ints_collide(tmp_path):
    meta = kf.kaggle2022_metadata(int_ids=True)
    meta["images"][1]["image_id"] = "1000"  # same id as images[0], once as str once as int
    with pytest.raises(HerbensError, match=r"image_id listed more than once.*1000"):
        load_train_metadata(write_meta(tmp_path, meta))


def test_category_without_images_is_allowed(tmp_path):
    root = kf.write_kaggle2022(tmp_path, counts={3: 2, 7: 2, 42: 2}, images=False)
    meta = load_train_metadata(root / "train_metadata.json")
    assert 15505 in set(meta.categories["category_id"])
    assert 15505 not in set(meta.images["category_id"])


def test_forced_format_and_unknown_format(tmp_path):
    root = kf.write_kaggle2022(tmp_path, images=False)
    assert len(load_train_metadata(root / "train_metadata.json", format="kaggle2022").images) == 14
    with pytest.raises(HerbensError, match="unknown metadata format 'coco'"):
        load_train_metadata(root / "train_metadata.json", format="coco")


# ----- bad Kaggle 2022 input ----------------------------------------------------------------

def mutate_and_load(tmp_path, mutate):
    meta = kf.kaggle2022_metadata()
    mutate(meta)
    return load_train_metadata(write_meta(tmp_path, meta))


@pytest.mark.parametrize("key", ["annotations", "categories", "images"])
def test_missing_top_level_key(tmp_path, key):
    with pytest.raises(HerbensError, match=rf"train_metadata.json: missing top-level key\(s\) {key}"):
        mutate_and_load(tmp_path, lambda m: m.pop(key))


def test_missing_field_names_record_index_and_id(tmp_path):
    def drop(meta):
        del meta["images"][2]["file_name"]
    with pytest.raises(HerbensError, match=r"images\[2\] \(image_id '00003__002'\) has no field 'file_name'"):
        mutate_and_load(tmp_path, drop)


def test_missing_category_field(tmp_path):
    def drop(meta):
        del meta["categories"][1]["family"]
    with pytest.raises(HerbensError, match=r"categories\[1\] \(category_id 42\) has no field 'family'"):
        mutate_and_load(tmp_path, drop)


def test_null_field_is_missing(tmp_path):
    def null(meta):
        meta["annotations"][0]["category_id"] = None
    with pytest.raises(HerbensError, match=r"annotations\[0\].*has no field 'category_id'"):
        mutate_and_load(tmp_path, null)


def test_record_that_is_not_an_object(tmp_path):
    with pytest.raises(HerbensError, match=r"annotations\[0\] is a int"):
        mutate_and_load(tmp_path, lambda m: m["annotations"].insert(0, 5))


def test_top_level_key_that_is_not_a_list(tmp_path):
    with pytest.raises(HerbensError, match="images must be a list"):
        mutate_and_load(tmp_path, lambda m: m.update(images={"a": 1}))


def test_non_integer_category_id(tmp_path):
    def bad(meta):
        meta["annotations"][3]["category_id"] = "oak"
    with pytest.raises(HerbensError, match=r"annotations\[3\] has a non-integer category_id 'oak'"):
        mutate_and_load(tmp_path, bad)


def test_duplicate_image_id(tmp_path):
    def dup(meta):
        meta["images"].append(dict(meta["images"][0]))
    with pytest.raises(HerbensError, match=r"image_id listed more than once in images: 00003__000"):
        mutate_and_load(tmp_path, dup)


def test_annotation_of_unknown_image(tmp_path):
    def extra(meta):
        meta["annotations"].append({"image_id": "99999__999", "category_id": 3, "genus_id": 1,
                                    "institution_id": 0})
    with pytest.raises(HerbensError, match=r"not in images: 99999__999"):
        mutate_and_load(tmp_path, extra)


def test_annotation_with_unknown_category(tmp_path):
    def unknown(meta):
        meta["annotations"][0]["category_id"] = 12345
    with pytest.raises(HerbensError, match=r"category_id that is not in categories: .*category_id 12345"):
        mutate_and_load(tmp_path, unknown)


def test_image_without_annotation(tmp_path):
    def orphan(meta):
        meta["annotations"] = [a for a in meta["annotations"] if a["image_id"] != "00042__001"]
    with pytest.raises(HerbensError, match=r"no annotation.*00042__001"):
        mutate_and_load(tmp_path, orphan)


def test_duplicate_annotation(tmp_path):
    with pytest.raises(HerbensError, match="annotated more than once"):
        mutate_and_load(tmp_path, lambda m: m["annotations"].append(dict(m["annotations"][0])))


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "train_metadata.json"
    path.write_text('{"images": [\n  {"image_id": "a",}\n]}')
    with pytest.raises(HerbensError, match=r"train_metadata.json: malformed JSON at line 2"):
        load_train_metadata(path)


def test_test_metadata_given_as_train(tmp_path):
    path = write_meta(tmp_path, kf.kaggle2022_test_metadata())
    with pytest.raises(HerbensError, match="got a list .*test metadata"):
        load_train_metadata(path)


def test_missing_file(tmp_path):
    with pytest.raises(HerbensError, match="file not found"):
        load_train_metadata(tmp_path / "nope.json")


def test_inspect_collects_every_issue(tmp_path):
    meta = kf.kaggle2022_metadata()
    meta["images"].append(dict(meta["images"][0]))
    meta["annotations"][0]["category_id"] = 999
    meta["annotations"] = [a for a in meta["annotations"] if a["image_id"] != "00007__000"]
    meta["annotations"].append({"image_id": "ghost", "category_id": 3})
    tidy, issues = inspect_train_metadata(write_meta(tmp_path, meta))
    assert issues["duplicate_image_ids"] == ["00003__000"]
    assert issues["unannotated_images"] == ["00007__000"]
    assert issues["unknown_images"] == ["ghost"]
    assert len(issues["unknown_categories"]) == 1 and "999" in issues["unknown_categories"][0]
    assert issues["duplicate_annotations"] == []
    assert len(tidy.images) == 14 - 2  # the unannotated image and the unknown-category one
    assert tidy.images["image_id"].is_unique


# ----- test metadata ------------------------------------------------------------------------

def test_kaggle2022_test_metadata_bare_list(tmp_path):
    path = write_meta(tmp_path, kf.kaggle2022_test_metadata(4, int_ids=True), "test_metadata.json")
    frame = load_test_metadata(path)
    assert frame["image_id"].tolist() == ["0", "1", "2", "3"]
    assert frame["file_name"].iloc[1] == "000/test-000001.jpg"
    assert frame.attrs["images_dir"] == tmp_path / "test_images"


def test_test_metadata_errors(tmp_path):
    records = kf.kaggle2022_test_metadata(3, int_ids=False)
    del records[1]["file_name"]
    with pytest.raises(HerbensError, match=r"records\[1\] \(image_id '1'\) has no field 'file_name'"):
        load_test_metadata(write_meta(tmp_path, records, "test_metadata.json"))
    records = kf.kaggle2022_test_metadata(3) + [{"image_id": "2", "file_name": "x.jpg"}]
    with pytest.raises(HerbensError, match="image_id listed more than once: 2"):
        load_test_metadata(write_meta(tmp_path, records, "test_metadata.json"))
    with pytest.raises(HerbensError, match="expected a JSON list"):
        load_test_metadata(write_meta(tmp_path, "hello", "test_metadata.json"))


# ----- Kaggle 2021 --------------------------------------------------------------------------

def test_kaggle2021(tmp_path):
    root = kf.write_kaggle2021(tmp_path, images=False)
    meta = load_train_metadata(root / "train" / "metadata.json")
    assert meta.images_dir == root / "train"
    cats = meta.categories
    assert cats["category_id"].tolist() == [10, 11, 20]
    assert cats["genus"].tolist() == ["Abies", "Abies", "Acer"]
    assert cats["species"].tolist() == ["balsamea", "fraseri", "rubrum"]
    assert cats["scientific_name"].iloc[2] == "Acer rubrum L."
    images = meta.images.set_index("image_id")
    assert images.loc["500", "category_id"] == 10 and images.loc["506", "category_id"] == 20
    assert images.loc["506", "file_name"] == "images/020/506.jpg"
    # genus ids derived from the sorted genus names: Abies 0, Acer 1
    assert images.loc["500", "genus_id"] == 0 and images.loc["506", "genus_id"] == 1
    assert images.loc["501", "institution_id"] == 1
    test = load_test_metadata(root / "test" / "metadata.json")
    assert test["image_id"].tolist() == ["0", "1"]
    assert test.attrs["images_dir"] == root / "test"


def test_kaggle2021_missing_field(tmp_path):
    meta = kf.kaggle2021_metadata()
    del meta["categories"][0]["name"]
    with pytest.raises(HerbensError, match=r"categories\[0\] \(id 10\) has no field 'name'"):
        load_train_metadata(write_meta(tmp_path, meta, "metadata.json"))


# ----- CSV ----------------------------------------------------------------------------------

def test_csv_full(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("image_id,file_name,category_id,scientific_name,family,genus\n"
                    "007,a/007.jpg,5,Acer rubrum,Sapindaceae,Acer\n"
                    "NA,a/na.jpg,5,Acer rubrum,Sapindaceae,Acer\n"
                    "x,b/x.jpg,2,Abies balsamea,Pinaceae,Abies\n")
    meta = load_train_metadata(path)
    assert meta.images["image_id"].tolist() == ["007", "NA", "x"]  # leading zeros, "NA" kept
    assert meta.images_dir == tmp_path
    assert meta.categories["category_id"].tolist() == [2, 5]
    assert meta.categories["species"].tolist() == ["balsamea", "rubrum"]


def test_csv_minimal_columns(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("image_id,file_name,category_id\n1,a.jpg,9\n2,b.jpg,4\n")
    meta = load_train_metadata(path)
    assert meta.categories["category_id"].tolist() == [4, 9]
    assert meta.categories["family"].nunique() == 1
    assert meta.images["genus_id"].min() >= 0


@pytest.mark.parametrize("text,message", [
    ("image_id,category_id\n1,9\n", "missing column.*file_name"),
    ("image_id,file_name,category_id\n1,a.jpg,\n", "row 2 has no category_id"),
    ("image_id,file_name,category_id\n1,a.jpg,oak\n", "row 2 has a non-integer category_id 'oak'"),
    ("image_id,file_name,category_id,scientific_name\n1,a.jpg,9,Acer rubrum\n2,b.jpg,9,Acer nigrum\n",
     "category_id 9 has conflicting"),
    ("image_id,file_name,category_id\n1,a.jpg,9\n1,b.jpg,9\n", "image_id listed more than once"),
])
def test_csv_errors(tmp_path, text, message):
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(HerbensError, match=message):
        load_train_metadata(path)


def test_csv_test_metadata(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("image_id,file_name\n01,t/01.jpg\n")
    frame = load_test_metadata(path)
    assert frame["image_id"].tolist() == ["01"] and frame.attrs["images_dir"] == tmp_path


# ----- find_dataset -------------------------------------------------------------------------

def test_find_dataset_layouts(tmp_path):
    k22 = kf.write_kaggle2022(tmp_path / "h22", images=False)
    assert find_dataset(k22) == (k22 / "train_metadata.json", k22 / "test_metadata.json")
    k21 = kf.write_kaggle2021(tmp_path / "h21", images=False)
    assert find_dataset(k21) == (k21 / "train" / "metadata.json", k21 / "test" / "metadata.json")
    (k22 / "test_metadata.json").unlink()
    assert find_dataset(k22) == (k22 / "train_metadata.json", None)
    assert find_dataset(k22 / "train_metadata.json") == (k22 / "train_metadata.json", None)


def test_find_dataset_errors(tmp_path):
    with pytest.raises(HerbensError, match="no training metadata found"):
        find_dataset(tmp_path)
    with pytest.raises(HerbensError, match="dataset directory not found"):
        find_dataset(tmp_path / "missing")


def test_images_frame_is_plain_dataframe(tmp_path):
    root = kf.write_kaggle2022(tmp_path, images=False)
    meta = load_train_metadata(root / "train_metadata.json")
    assert isinstance(meta.images, pd.DataFrame) and meta.images.index.is_monotonic_increasing
