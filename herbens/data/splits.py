"""Seeded, stratified validation split and its ``split.csv`` file.

The split must be reproducible from (seed, data) alone, whatever order the metadata lists the
images in, so each image gets a pseudo-random key from a hash of (seed, image_id) and every
species sends its smallest-keyed images to validation. A species' split therefore does not
change when other species are added or removed.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write

SPLIT_COLUMN = "image_id"


def stratified_split(images: pd.DataFrame, val_fraction: float, seed: int,
                     min_images: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split labelled images into train and validation, per species.

    Each species with at least ``min_images`` images sends ``round(n * val_fraction)`` of them
    (half rounds up), clamped to ``[1, n - 1]``, to validation; rarer species stay entirely in
    training. ``val_fraction == 0`` gives an empty validation set.

    Args:
        images: table with ``image_id`` and ``category_id`` columns (other columns are kept).
        val_fraction: share of each species for validation, in ``[0, 1)``.
        seed: the split is a pure function of the seed and the set of rows.
        min_images: species with fewer images are not split (at least 2).

    Returns:
        ``(train, val)``, each sorted by ``image_id`` with a fresh index.

    Raises:
        HerbensError: on missing columns, duplicate image ids or bad parameters.
    """
    _check_split_args(images, val_fraction, min_images)
    frame = images.assign(image_id=images["image_id"].astype(str))
    frame = frame.sort_values("image_id", kind="stable").reset_index(drop=True)
    if frame.empty or val_fraction == 0:
        return frame, frame.iloc[0:0]
    is_val = _validation_mask(frame, val_fraction, seed, min_images)
    return frame[~is_val].reset_index(drop=True), frame[is_val].reset_index(drop=True)


def _check_split_args(images: pd.DataFrame, val_fraction: float, min_images: int) -> None:
    missing = [c for c in ("image_id", "category_id") if c not in images.columns]
    if missing:
        raise HerbensError(f"split: the image table has no {', '.join(missing)} column")
    if not 0 <= val_fraction < 1:
        raise HerbensError(f"split: val_fraction must be in [0, 1), got {val_fraction}")
    if min_images < 2:
        raise HerbensError(f"split: min_images must be at least 2 (one train and one val image), got {min_images}")
    if images["category_id"].isna().any():
        raise HerbensError("split: some images have no category_id (only labelled images can be split)")
    ids = images["image_id"].astype(str)
    if ids.duplicated().any():
        raise HerbensError(f"split: duplicate image_id {ids[ids.duplicated()].iloc[0]!r}")


def _validation_mask(frame: pd.DataFrame, val_fraction: float, seed: int, min_images: int) -> np.ndarray:
    keys = _image_keys(frame["image_id"], seed)
    order = np.lexsort((keys, frame["category_id"].to_numpy()))  # by species, then key
    species = frame["category_id"].to_numpy()[order]
    rank = pd.Series(species).groupby(species).cumcount().to_numpy()
    n = pd.Series(species).groupby(species).transform("size").to_numpy()
    quota = np.clip(np.floor(n * val_fraction + 0.5), 1, n - 1)
    chosen = (n >= min_images) & (rank < quota)
    mask = np.zeros(len(frame), dtype=bool)
    mask[order] = chosen
    return mask


def _image_keys(image_ids: pd.Series, seed: int) -> np.ndarray:
    """64-bit key per image from (seed, image_id): stable across runs, machines and versions."""
    prefix = f"{int(seed)}\0".encode()
    return np.array([int.from_bytes(hashlib.blake2b(prefix + i.encode(), digest_size=8).digest(), "little")
                     for i in image_ids], dtype=np.uint64)


def save_split(path: str | Path, val_ids) -> None:
    """Write the validation image ids to ``split.csv`` (one ``image_id`` column), atomically.

    Raises:
        HerbensError: on duplicate or empty ids.
    """
    ids = [str(i) for i in val_ids]
    _check_ids(ids, path)
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([SPLIT_COLUMN])
        writer.writerows([i] for i in ids)


def load_split(path: str | Path) -> list[str]:
    """Read the validation image ids written by :func:`save_split`.

    Raises:
        HerbensError: on a missing file, a wrong header, or duplicate/empty ids.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError as exc:
        raise HerbensError(f"{path}: split file not found") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise HerbensError(f"{path}: not a readable split file ({exc})") from exc
    if not rows or [c.strip() for c in rows[0]] != [SPLIT_COLUMN]:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise HerbensError(f"{path}: expected a header line '{SPLIT_COLUMN}', got {found!r}")
    ids = [row[0] if row else "" for row in rows[1:]]
    _check_ids(ids, path)
    return ids


def _check_ids(ids: list[str], path) -> None:
    seen: set[str] = set()
    for line, image_id in enumerate(ids, start=2):
        if not image_id:
            raise HerbensError(f"{path}: empty image_id (line {line})")
        if image_id in seen:
            raise HerbensError(f"{path}: duplicate image_id {image_id!r} (line {line})")
        seen.add(image_id)
