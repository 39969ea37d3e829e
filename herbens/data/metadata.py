"""Training and test metadata -> one tidy table, whatever the source format.

Three sources are understood:

* Kaggle Herbarium 2022 (``train_metadata.json`` / ``test_metadata.json``): images and
  annotations are separate lists joined on ``image_id`` (never on position); category ids are
  not contiguous; the licence key is ``license`` in the real file and ``licenses`` in the docs.
* Kaggle Herbarium 2021 (``train/metadata.json`` / ``test/metadata.json``): images carry
  ``id``, categories ``{id, name, family, order}`` with the genus as the first word of ``name``.
* CSV: ``image_id,file_name,category_id[,scientific_name,family,genus]``.

Bad input raises HerbensError naming the file and the key, record or id at fault. Problems that
are about consistency rather than structure (duplicate ids, annotations of unknown images or
categories, images without an annotation) are collected by :func:`inspect_train_metadata`, so
that ``herbens check`` can list all of them; :func:`load_train_metadata` raises on the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from herbens.core.errors import HerbensError
from herbens.data.records import (int_column, json_records, optional_int_column, read_csv_text,
                                  record_frame, require_keys)
from herbens.core.fileio import read_json

FORMATS = ("auto", "kaggle2022", "kaggle2021", "csv")

IMAGE_COLUMNS = ["image_id", "file_name", "category_id", "genus_id", "institution_id"]
CATEGORY_COLUMNS = ["category_id", "scientific_name", "family", "genus", "species"]

# Consistency problems, in the order they are reported, with a sentence per kind.
ISSUE_MESSAGES = {
    "duplicate_category_ids": "category_id listed more than once in categories",
    "duplicate_image_ids": "image_id listed more than once in images",
    "duplicate_annotations": "image_id annotated more than once",
    "unknown_images": "annotation names an image_id that is not in images",
    "unknown_categories": "annotation names a category_id that is not in categories",
    "unannotated_images": "image has no annotation (no category)",
}


@dataclass
class TrainMetadata:
    """Labelled training images and the categories they are drawn from.

    Attributes:
        images: one row per labelled image; columns ``image_id`` (str), ``file_name`` (str,
            relative to ``images_dir``), ``category_id``, ``genus_id``, ``institution_id``
            (int; -1 where the source has no such field).
        categories: one row per category, sorted by ``category_id``; columns ``category_id``
            (int), ``scientific_name``, ``family``, ``genus``, ``species`` (str). A category
            may have no training image (the checker reports those).
        images_dir: directory the ``file_name`` paths are relative to.
        source: the metadata file read.
    """

    images: pd.DataFrame
    categories: pd.DataFrame
    images_dir: Path
    source: Path


# ----- public entry points ------------------------------------------------------------------

def load_train_metadata(path: str | Path, format: str = "auto") -> TrainMetadata:
    """Read training metadata; any structural or consistency problem raises HerbensError.

    Args:
        path: ``train_metadata.json`` (Kaggle 2022), ``metadata.json`` (Kaggle 2021) or a CSV.
        format: ``"auto"`` (guess from the file), ``"kaggle2022"``, ``"kaggle2021"`` or ``"csv"``.

    Returns:
        The tidy metadata; ``images_dir`` is ``<dir>/train_images`` for Kaggle 2022 and the
        file's directory otherwise.

    Raises:
        HerbensError: naming the file and the key, record or id at fault.
    """
    meta, issues = inspect_train_metadata(path, format)
    for kind, ids in issues.items():
        if ids:
            raise HerbensError(f"{meta.source}: {ISSUE_MESSAGES[kind]}: {_examples(ids)}")
    return meta


def inspect_train_metadata(path: str | Path, format: str = "auto") -> tuple[TrainMetadata, dict[str, list]]:
    """Read training metadata, collecting consistency problems instead of raising on them.

    Structural problems (unreadable file, missing keys or fields, non-integer ids) still raise
    HerbensError, since nothing sensible can be built from such a file.

    Returns:
        ``(meta, issues)``: ``meta`` keeps only the rows that are consistent (first of
        duplicates, annotated images of known categories); ``issues`` maps each kind in
        ``ISSUE_MESSAGES`` to the offending ids (empty lists when clean).
    """
    path = Path(path)
    fmt = _resolve_format(path, format)
    if fmt == "csv":
        return _train_from_csv(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise HerbensError(f"{path}: expected a JSON object with images, annotations and categories, "
                           f"got a {type(data).__name__} (is this test metadata?)")
    if fmt == "json":
        fmt = _json_flavour(data)
    if fmt == "kaggle2021":
        return _train_from_kaggle2021(data, path)
    return _train_from_kaggle2022(data, path)


def load_test_metadata(path: str | Path) -> pd.DataFrame:
    """Read test metadata into a table of ``image_id`` (str) and ``file_name`` (str).

    Kaggle 2022 stores a bare JSON list (images under ``<dir>/test_images``); Kaggle 2021 a dict
    with ``images`` (paths relative to the file's directory); a CSV needs ``image_id,file_name``.
    The images directory is in ``frame.attrs["images_dir"]``.

    Raises:
        HerbensError: on a malformed file, missing fields or duplicate image ids.
    """
    frame, duplicates = inspect_test_metadata(path)
    if duplicates:
        raise HerbensError(f"{path}: image_id listed more than once: {_examples(duplicates)}")
    return frame


def inspect_test_metadata(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Like :func:`load_test_metadata` but returns duplicate image ids instead of raising.

    Returns:
        ``(frame, duplicate_ids)``; the frame keeps the first row of each duplicated id.
    """
    path = Path(path)
    if path.suffix.lower() == ".csv":
        frame = read_csv_text(path, required=["image_id", "file_name"])[["image_id", "file_name"]]
        images_dir = path.parent
    else:
        frame, images_dir = _test_from_json(read_json(path), path)
    frame = frame.assign(image_id=frame["image_id"].astype(str), file_name=frame["file_name"].astype(str))
    duplicated = frame["image_id"].duplicated()
    duplicates = sorted(set(frame.loc[duplicated, "image_id"]))
    frame = frame.loc[~duplicated].reset_index(drop=True)
    frame.attrs["images_dir"] = images_dir
    return frame, duplicates


def find_dataset(root: str | Path) -> tuple[Path, Path | None]:
    """Locate the train and test metadata files of a dataset directory.

    Looks for ``train_metadata.json`` + ``test_metadata.json`` (Kaggle 2022),
    ``train/metadata.json`` + ``test/metadata.json`` (Kaggle 2021), then
    ``train_metadata.csv`` + ``test_metadata.csv``. A metadata file may also be given directly.

    Returns:
        ``(train_path, test_path or None)``.

    Raises:
        HerbensError: when no training metadata is found.
    """
    root = Path(root)
    if root.is_file():
        return root, None
    if not root.is_dir():
        raise HerbensError(f"{root}: dataset directory not found")
    layouts = [("train_metadata.json", "test_metadata.json"),
               ("train/metadata.json", "test/metadata.json"),
               ("train_metadata.csv", "test_metadata.csv")]
    for train_name, test_name in layouts:
        if (root / train_name).is_file():
            test = root / test_name
            return root / train_name, test if test.is_file() else None
    looked = ", ".join(name for name, _ in layouts)
    raise HerbensError(f"{root}: no training metadata found (looked for {looked})")


# ----- format detection ---------------------------------------------------------------------

def _resolve_format(path: Path, format: str) -> str:
    if format not in FORMATS:
        raise HerbensError(f"unknown metadata format {format!r}; expected one of {', '.join(FORMATS)}")
    if format != "auto":
        return format
    if path.suffix.lower() == ".csv":
        return "csv"
    if not path.exists():
        raise HerbensError(f"{path}: file not found")
    return "json"  # refined once the JSON is read, see _json_flavour


def _json_flavour(data: dict) -> str:
    """Kaggle 2022 records carry ``image_id``/``category_id``; Kaggle 2021 ones carry ``id``."""
    for key, marker_2022 in (("images", "image_id"), ("categories", "category_id")):
        records = data.get(key)
        if isinstance(records, list) and records and isinstance(records[0], dict):
            return "kaggle2022" if marker_2022 in records[0] else "kaggle2021"
    return "kaggle2022"


# ----- Kaggle 2022 --------------------------------------------------------------------------

def _train_from_kaggle2022(data: dict, path: Path) -> tuple[TrainMetadata, dict[str, list]]:
    require_keys(data, ["images", "annotations", "categories"], path)
    images = json_records(data, "images", ["image_id", "file_name"], "image_id", path)
    annotations = json_records(data, "annotations", ["image_id", "category_id"], "image_id", path)
    raw_categories = json_records(data, "categories", ["category_id", "scientificName", "family", "genus",
                                                   "species"], "category_id", path)
    categories = pd.DataFrame({
        "category_id": int_column(raw_categories, "category_id", "categories", path),
        "scientific_name": raw_categories["scientificName"].astype(str),
        "family": raw_categories["family"].astype(str),
        "genus": raw_categories["genus"].astype(str),
        "species": raw_categories["species"].astype(str),
    })
    labels = pd.DataFrame({
        "image_id": annotations["image_id"].astype(str),
        "category_id": int_column(annotations, "category_id", "annotations", path),
        "genus_id": optional_int_column(annotations, "genus_id", "annotations", path),
        "institution_id": optional_int_column(annotations, "institution_id", "annotations", path),
    })
    files = pd.DataFrame({"image_id": images["image_id"].astype(str),
                          "file_name": images["file_name"].astype(str)})
    return _assemble(files, labels, categories, path.parent / "train_images", path)


# ----- Kaggle 2021 --------------------------------------------------------------------------

def _train_from_kaggle2021(data: dict, path: Path) -> tuple[TrainMetadata, dict[str, list]]:
    require_keys(data, ["images", "annotations", "categories"], path)
    images = json_records(data, "images", ["id", "file_name"], "id", path)
    annotations = json_records(data, "annotations", ["image_id", "category_id"], "id", path)
    raw_categories = json_records(data, "categories", ["id", "name", "family"], "id", path)
    names = raw_categories["name"].astype(str).str.strip()
    words = names.str.split()
    categories = pd.DataFrame({
        "category_id": int_column(raw_categories, "id", "categories", path),
        "scientific_name": names,
        "family": raw_categories["family"].astype(str),
        # 2021 has no genus field: the genus is the first word of the binomial.
        "genus": words.str[0].fillna("").astype(str),
        "species": words.str[1].fillna("").astype(str),
    })
    labels = pd.DataFrame({
        "image_id": annotations["image_id"].astype(str),
        "category_id": int_column(annotations, "category_id", "annotations", path),
        "genus_id": -1,
        "institution_id": optional_int_column(annotations, "institution_id", "annotations", path),
    })
    files = pd.DataFrame({"image_id": images["id"].astype(str), "file_name": images["file_name"].astype(str)})
    return _assemble(files, labels, categories, path.parent, path, derive_genus_id=True)


# ----- CSV ----------------------------------------------------------------------------------

def _train_from_csv(path: Path) -> tuple[TrainMetadata, dict[str, list]]:
    raw = read_csv_text(path, required=["image_id", "file_name", "category_id"])
    category_ids = int_column(raw, "category_id", "rows", path)
    if "scientific_name" in raw.columns:
        names = raw["scientific_name"].fillna("").astype(str).str.strip()
    else:
        names = pd.Series([f"category {c}" for c in category_ids], index=raw.index)
    genus = _text_or(raw, "genus", names.str.split().str[0].fillna(""))
    family = _text_or(raw, "family", pd.Series("unknown", index=raw.index))
    per_row = pd.DataFrame({"category_id": category_ids, "scientific_name": names, "family": family,
                            "genus": genus, "species": names.str.split().str[1].fillna("")})
    categories = _categories_from_rows(per_row, path)
    labels = pd.DataFrame({"image_id": raw["image_id"].astype(str), "category_id": category_ids,
                           "genus_id": -1,
                           "institution_id": optional_int_column(raw, "institution_id", "rows", path)})
    files = labels[["image_id"]].assign(file_name=raw["file_name"].astype(str))
    return _assemble(files, labels, categories, path.parent, path, derive_genus_id=True)


def _text_or(raw: pd.DataFrame, column: str, default: pd.Series) -> pd.Series:
    if column not in raw.columns:
        return default.astype(str)
    return raw[column].fillna("").astype(str).str.strip()


def _categories_from_rows(per_row: pd.DataFrame, path: Path) -> pd.DataFrame:
    """One row per category_id; a category named differently on two rows is an error."""
    unique = per_row.drop_duplicates()
    clash = unique["category_id"].duplicated(keep=False)
    if clash.any():
        bad = int(unique.loc[clash, "category_id"].iloc[0])
        raise HerbensError(f"{path}: category_id {bad} has conflicting scientific_name/family/genus "
                           "on different rows")
    return unique.reset_index(drop=True)


# ----- test metadata ------------------------------------------------------------------------

def _test_from_json(data: object, path: Path) -> tuple[pd.DataFrame, Path]:
    if isinstance(data, list):  # Kaggle 2022: a bare list of {image_id, file_name, license}
        frame = record_frame(data, "records", ["image_id", "file_name"], "image_id", path)
        return frame[["image_id", "file_name"]], path.parent / "test_images"
    if isinstance(data, dict):  # Kaggle 2021: {"images": [{id, file_name, ...}], ...}
        require_keys(data, ["images"], path)
        records = data["images"]
        id_key = "image_id" if records and isinstance(records[0], dict) and "image_id" in records[0] else "id"
        frame = json_records(data, "images", [id_key, "file_name"], id_key, path)
        return frame[[id_key, "file_name"]].rename(columns={id_key: "image_id"}), path.parent
    raise HerbensError(f"{path}: expected a JSON list of test images (or an object with images), "
                       f"got a {type(data).__name__}")


# ----- joining images, annotations and categories -------------------------------------------

def _assemble(files: pd.DataFrame, labels: pd.DataFrame, categories: pd.DataFrame, images_dir: Path,
              source: Path, derive_genus_id: bool = False) -> tuple[TrainMetadata, dict[str, list]]:
    """Join annotations to images on image_id, recording every inconsistency found."""
    issues: dict[str, list] = {kind: [] for kind in ISSUE_MESSAGES}
    categories = _dedupe(categories, "category_id", issues["duplicate_category_ids"])
    files = _dedupe(files, "image_id", issues["duplicate_image_ids"])
    labels = _dedupe(labels, "image_id", issues["duplicate_annotations"])

    # One hash lookup (annotation -> image row) gives every join result: pandas' isin + merge
    # would hash the ~1M string ids four more times.
    file_row = pd.Index(files["image_id"]).get_indexer(labels["image_id"])
    known_image = file_row >= 0
    known_category = labels["category_id"].isin(categories["category_id"]).to_numpy()
    issues["unknown_images"] = labels.loc[~known_image, "image_id"].tolist()
    issues["unknown_categories"] = [f"{i} (category_id {c})" for i, c in
                                    labels.loc[known_image & ~known_category, ["image_id", "category_id"]]
                                    .itertuples(index=False)]
    labelled = np.zeros(len(files), dtype=bool)
    labelled[file_row[known_image]] = True
    issues["unannotated_images"] = files.loc[~labelled, "image_id"].tolist()

    keep = np.flatnonzero(known_image & known_category)
    keep = keep[np.argsort(file_row[keep], kind="stable")]  # images in metadata order
    images = labels.iloc[keep].reset_index(drop=True)
    images["file_name"] = files["file_name"].to_numpy()[file_row[keep]]
    categories = categories.sort_values("category_id").reset_index(drop=True)
    if derive_genus_id:
        images["genus_id"] = _genus_ids(images, categories)
    images = images[IMAGE_COLUMNS].astype({"category_id": "int64", "genus_id": "int64",
                                           "institution_id": "int64"})
    return TrainMetadata(images.reset_index(drop=True), categories[CATEGORY_COLUMNS], images_dir, source), issues


def _dedupe(frame: pd.DataFrame, column: str, duplicates_out: list) -> pd.DataFrame:
    repeated = frame[column].duplicated()
    duplicates_out.extend(sorted(set(frame.loc[repeated, column].tolist())))
    return frame.loc[~repeated].reset_index(drop=True)


def _genus_ids(images: pd.DataFrame, categories: pd.DataFrame) -> np.ndarray:
    """Sources without genus ids get the index of the genus name in sorted order."""
    genus_index = {g: i for i, g in enumerate(sorted(set(categories["genus"])))}
    genus_of = dict(zip(categories["category_id"], categories["genus"].map(genus_index)))
    return images["category_id"].map(genus_of).fillna(-1).to_numpy(dtype=np.int64)


def _examples(ids: list, limit: int = 5) -> str:
    shown = ", ".join(map(str, ids[:limit]))
    more = len(ids) - limit
    return shown + (f" (and {more} more)" if more > 0 else "")
