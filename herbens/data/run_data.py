"""The images of one run: labelled train/val frames, the test frame, and the class order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from herbens.data.metadata import find_dataset, load_test_metadata, load_train_metadata
from herbens.data.splits import load_split, stratified_split
from herbens.data.taxonomy import Taxonomy
from herbens.core.errors import HerbensError


@dataclass
class RunData:
    """The labelled and unlabelled images of a run, and the class order."""

    taxonomy: Taxonomy
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame | None
    images_dir: Path
    test_images_dir: Path | None


def load_run_data(cfg: dict, run_dir: Path, reuse_split: bool) -> RunData:
    """Read metadata, build the taxonomy, and split (or re-read the run's split).

    The taxonomy's counts are those of the training rows (after the split and
    ``data.limit_train``): the prior the losses, the ensembler and the analyses use.
    """
    train_file, test_file = find_dataset(Path(cfg["data"]["root"]))
    meta = load_train_metadata(train_file, cfg["data"]["format"])
    taxonomy = Taxonomy.from_metadata(meta)
    saved = run_dir / "taxonomy.json"
    if reuse_split and saved.exists() and Taxonomy.load(saved) != taxonomy:
        raise HerbensError(f"{train_file} gives a different taxonomy than the run's {saved} "
                           f"({taxonomy.hash} vs {Taxonomy.load(saved).hash}): wrong data.root?")
    images = meta.images
    if cfg["data"]["limit_train"]:
        images = images.sort_values("image_id").head(int(cfg["data"]["limit_train"]))
    split_file = run_dir / "split.csv"
    if reuse_split and split_file.exists():
        val_ids = set(load_split(split_file))
        is_val = images["image_id"].isin(val_ids)
        train, val = images[~is_val], images[is_val]
    else:
        train, val = stratified_split(images, cfg["data"]["val_fraction"], cfg["data"]["split_seed"],
                                      cfg["data"]["val_min_images"])
    if train.empty:
        raise HerbensError(f"{train_file}: no training images" + (
            " (the metadata lists none)" if meta.images.empty else
            f" left: all {len(images)} listed images are in the validation split"))
    taxonomy = taxonomy.with_training_rows(train["category_id"])
    test = test_dir = None
    if test_file is not None:
        test = load_test_metadata(test_file)
        test_dir = Path(test.attrs["images_dir"])
    return RunData(taxonomy, train.reset_index(drop=True), val.reset_index(drop=True), test,
                   Path(meta.images_dir), test_dir)
