"""``herbens teach ENSEMBLE.json -o runs/NAME``: an ensemble's soft targets for its training images.

The teacher is exactly the ensemble its JSON record describes: it is exported into
``<out>/bundle/`` (:func:`herbens.bundle.export.export_bundle`) and the training images are
predicted through the bundle (:func:`herbens.bundle.predict.block_probabilities`: each member's own
test-time views and data config, combined with the ensemble's fitted weights, temperatures, tau
and alpha/beta). Per level, the top-K classes and log-probabilities of every training image and
the remaining mass go into ``<out>/targets/train/`` (:mod:`herbens.targets`), beside the
taxonomy and split of the member runs, block by block with bounded memory. A student recipe
names ``<out>`` in ``distill.teacher``.

The targets come from the bundle's test-time views (centre and flip by default), computed once;
the student's augmented views are not re-predicted online.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from herbens.bundle.export import export_bundle
from herbens.bundle.load import load_bundle
from herbens.bundle.predict import block_probabilities
from herbens.bundle.sources import resolve_source
from herbens.config import load_run_config
from herbens.core.errors import HerbensError
from herbens.data.run_data import load_run_data
from herbens.data.taxonomy import LEVELS
from herbens.stores.targets import open_targets_writer

DEFAULT_K = 64


def member_training_images(run_dirs: list[Path]):
    """The training frame and images folder shared by the member runs (same taxonomy and split)."""

    first = run_dirs[0]
    for run in run_dirs[1:]:
        for name in ("taxonomy.json", "split.csv"):
            if (run / name).read_bytes() != (first / name).read_bytes():
                raise HerbensError(f"run '{run}': its {name} differs from run '{first}'; the teacher's training "
                                   "images must be the same for every member (train them with the same data.root, "
                                   "data.split_seed and data.limit_train)")
    data = load_run_data(load_run_config(first), first, reuse_split=True)
    return data.train, data.images_dir, data.taxonomy


def write_teacher(source: str | Path, out: str | Path, *, k: int = DEFAULT_K, batch_size: int = 32,
                  device: str = "cpu", workers: int = 0, progress: bool = True,
                  log: Callable[[str], None] = print) -> Path:
    """Export the ensemble ``source`` into ``out/bundle`` and write its training-split targets.

    Args:
        source: an ensemble's JSON record (or a run directory: a one-model teacher).
        out: the teacher folder (``taxonomy.json``, ``split.csv``, ``bundle/``, ``targets/train/``).
        k: species classes kept per image (genus and family keep min(k, classes)).

    Raises:
        HerbensError: on a source the exporter refuses, members that disagree on their training
            images, or training images no member can read (listed, nothing written).
    """

    if k < 1:
        raise HerbensError(f"--k must be at least 1, got {k}")
    out = Path(out)
    _check_teacher_folder(out)
    run_dirs, _, _ = resolve_source(source)
    frame, images_dir, taxonomy = member_training_images(run_dirs)
    export_bundle(source, out / "bundle", overwrite=True, log=log)  # the teacher's own bundle
    bundle = load_bundle(out / "bundle", device=device)
    paths = [str(images_dir / name) for name in frame["file_name"]]
    ids = frame["image_id"].astype(str).tolist()
    shapes = {level: (k, taxonomy.num_classes(level)) for level in LEVELS}
    meta = {"taxonomy_hash": taxonomy.hash, "teacher": str(source), "bundle": str(out / "bundle"),
            "views": {m.name: m.views for m in bundle.members}}
    out.mkdir(parents=True, exist_ok=True)
    for name in ("taxonomy.json", "split.csv"):
        shutil.copyfile(run_dirs[0] / name, out / name)
    with open_targets_writer(out, "train", ids, shapes, meta) as writer:
        for start, good, probs, errors, _ in block_probabilities(bundle, paths, batch_size=batch_size, device=device,
                                                              workers=workers, progress=progress):
            if errors:
                listed = "; ".join(f"{paths[start + i]}: {m}" for i, m in sorted(errors.items())[:3])
                raise HerbensError(f"{len(errors)} training image(s) could not be read, so the teacher has no "
                                   f"targets for them (first: {listed}); fix or remove them (`herbens check`)")
            for level in LEVELS:
                with np.errstate(divide="ignore"):
                    writer.write(level, start, np.log(probs.level(level)))
    log(f"wrote teacher targets for {len(ids)} training images into {out / 'targets' / 'train'} (top {k} species)")
    return out


def _check_teacher_folder(out: Path) -> None:
    """Refuse an output folder that holds something else (a trained run's taxonomy.json and
    split.csv would be overwritten): only a new or empty folder or an earlier teacher."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "config.yaml").exists() or not ((out / "bundle").is_dir() or (out / "targets").is_dir()):
        raise HerbensError(f"{out} exists and is not a teacher folder (no bundle/ or targets/; a run has "
                           "config.yaml): teach does not write into it; choose another -o")
