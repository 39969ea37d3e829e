"""Tiny datasets in the real Kaggle Herbarium 2022 and 2021 formats, written into tmp dirs.

Field names and quirks follow the real files: 2022 uses ``license`` at the top level (the docs
say ``licenses``), image ids may be str or int, category ids are not contiguous, annotations
are listed in a different order from images (so joining by position would be wrong), and the
test metadata is a bare list.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

# Non-contiguous ids, up to 15505 like the real data; two genera share a family.
CATEGORIES_2022 = [
    {"category_id": 3, "scientificName": "Abies balsamea", "authors": "(L.) Mill.",
     "family": "Pinaceae", "genus": "Abies", "species": "balsamea"},
    {"category_id": 7, "scientificName": "Abies fraseri", "authors": "(Pursh) Poir.",
     "family": "Pinaceae", "genus": "Abies", "species": "fraseri"},
    {"category_id": 42, "scientificName": "Acer rubrum", "authors": "L.",
     "family": "Sapindaceae", "genus": "Acer", "species": "rubrum"},
    {"category_id": 15505, "scientificName": "Zizia aurea", "authors": "(L.) W.D.J.Koch",
     "family": "Apiaceae", "genus": "Zizia", "species": "aurea"},
]
GENERA_2022 = [{"genus_id": 1, "genus": "Abies"}, {"genus_id": 5, "genus": "Acer"},
               {"genus_id": 2563, "genus": "Zizia"}]
DEFAULT_COUNTS = {3: 4, 7: 3, 42: 5, 15505: 2}


def colour(i: int) -> tuple[int, int, int]:
    """A distinct solid colour per image, so no two fixture files have the same bytes."""
    return tuple(int(v) for v in np.random.default_rng(i).integers(0, 256, 3))


def write_image(path: Path, i: int, size=(24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(i)).save(path, "JPEG", quality=90)


def kaggle2022_image_id(category_id: int, n: int) -> str:
    return f"{category_id:05d}__{n:03d}"


def kaggle2022_file_name(category_id: int, image_id: str) -> str:
    return f"{category_id // 100:03d}/{category_id % 100:02d}/{image_id}.jpg"


def kaggle2022_metadata(counts: dict[int, int] | None = None, int_ids: bool = False,
                        license_key: str = "license") -> dict:
    """The train_metadata.json object (not written)."""
    counts = DEFAULT_COUNTS if counts is None else counts
    genus_id = {g["genus"]: g["genus_id"] for g in GENERA_2022}
    categories = [c for c in CATEGORIES_2022 if c["category_id"] in counts] + [
        c for c in CATEGORIES_2022 if c["category_id"] not in counts]
    images, annotations = [], []
    serial = 1000
    for cat in categories:
        cid = cat["category_id"]
        for n in range(counts.get(cid, 0)):
            image_id = kaggle2022_image_id(cid, n)
            images.append({"image_id": serial if int_ids else image_id,
                           "file_name": kaggle2022_file_name(cid, image_id), "license": 0})
            annotations.append({"genus_id": genus_id[cat["genus"]], "institution_id": n % 3,
                                "category_id": cid, "image_id": serial if int_ids else image_id})
            serial += 1
    annotations.reverse()  # a loader that joins by position gets every label wrong
    # Deep copy: tests mutate the result and must not touch the module-level records.
    return copy.deepcopy({"annotations": annotations, "categories": list(reversed(categories)),
            "distances": [{"genus_id_x": 1, "genus_id_y": 5, "distance": 0.5}],
            "genera": GENERA_2022, "images": images,
            "institutions": [{"institution_id": k, "collectionCode": f"C{k}"} for k in range(3)],
            license_key: [{"id": 0, "name": "CC BY-NC", "url": "https://example.org"}]})


def kaggle2022_test_metadata(n: int = 3, int_ids: bool = True) -> list:
    """The bare-list test_metadata.json object."""
    return [{"image_id": i if int_ids else str(i), "file_name": f"000/test-{i:06d}.jpg", "license": 0}
            for i in range(n)]


def write_kaggle2022(root: Path, counts: dict[int, int] | None = None, int_ids: bool = False,
                     license_key: str = "license", test_images: int = 3, images: bool = True,
                     meta: dict | None = None) -> Path:
    """Write a Kaggle 2022 dataset (metadata and, optionally, JPEGs); returns ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = kaggle2022_metadata(counts, int_ids, license_key) if meta is None else meta
    (root / "train_metadata.json").write_text(json.dumps(meta))
    test = kaggle2022_test_metadata(test_images)
    (root / "test_metadata.json").write_text(json.dumps(test))
    if images:
        for i, record in enumerate(meta["images"]):
            write_image(root / "train_images" / record["file_name"], i)
        for i, record in enumerate(test):
            write_image(root / "test_images" / record["file_name"], 1000 + i)
    return root


def kaggle2021_metadata() -> dict:
    """The Kaggle 2021 train/metadata.json object: 3 categories, ids 10/11/20."""
    categories = [{"id": 10, "name": "Abies balsamea (L.) Mill.", "family": "Pinaceae", "order": "Pinales"},
                  {"id": 11, "name": "Abies fraseri (Pursh) Poir.", "family": "Pinaceae", "order": "Pinales"},
                  {"id": 20, "name": "Acer rubrum L.", "family": "Sapindaceae", "order": "Sapindales"}]
    images, annotations = [], []
    for k, cid in enumerate([10, 10, 11, 11, 20, 20, 20]):
        image_id = 500 + k
        images.append({"id": image_id, "width": 24, "height": 16, "license": 1,
                       "file_name": f"images/{cid:03d}/{image_id}.jpg"})
        annotations.append({"id": 9000 + k, "image_id": image_id, "category_id": cid,
                            "institution_id": k % 2})
    annotations.reverse()
    return {"annotations": annotations, "categories": categories, "images": images,
            "info": {"year": 2021}, "licenses": [{"id": 1, "name": "CC"}],
            "institutions": [{"id": 0, "name": "A"}, {"id": 1, "name": "B"}]}


def write_kaggle2021(root: Path, images: bool = True) -> Path:
    """Write a Kaggle 2021 dataset (train/metadata.json, test/metadata.json, images)."""
    root = Path(root)
    meta = kaggle2021_metadata()
    test = {"images": [{"id": i, "file_name": f"images/{i // 100:03d}/{i}.jpg", "license": 1}
                       for i in range(2)], "info": {}, "licenses": []}
    for part, obj in (("train", meta), ("test", test)):
        (root / part).mkdir(parents=True, exist_ok=True)
        (root / part / "metadata.json").write_text(json.dumps(obj))
        if images:
            for i, record in enumerate(obj["images"]):
                write_image(root / part / record["file_name"], i + (0 if part == "train" else 500))
    return root
