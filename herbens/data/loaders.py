"""DataLoaders for training and prediction, built from a tidy frame and the recipe.

Both loaders decode JPEGs at a reduced scale when the transform that follows needs fewer pixels
than the file holds (:func:`train_decode_size`, :func:`eval_decode_size`): a 1000 px sheet for a
128 px model input is decoded at 1/2 or 1/4 scale by libjpeg's DCT scaling, several times faster,
and the model still never sees a pixel that was upsampled when it would not have been at full
size.
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from herbens.data.dataset import DEFAULT_MIN_IMAGE_SIDE, HerbariumDataset
from herbens.data.samplers import build_sampler
from herbens.data.taxonomy import Taxonomy
from herbens.data.transforms import build_tta_views, eval_decode_size
from herbens.data.views import Views
from herbens.core.errors import HerbensError

@contextlib.contextmanager
def seeded_rngs(seed: int):
    """Run a block with torch, numpy and python RNGs seeded, then restore all three.

    torchvision and timm augmentations draw from the global generators; seeding them per
    sample makes an augmented sample a pure function of (seed, epoch, index), whatever the
    worker count, and leaves the trainer's own random stream untouched.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class EpochKeys:
    """Wraps a sampler so that it yields ``epoch * n + index`` keys instead of indices.

    The key carries the epoch into DataLoader workers (whose dataset copies never see
    ``set_epoch``), so :class:`TrainingDataset` can seed each sample's augmentation from it.
    """

    def __init__(self, sampler, dataset_size: int):
        self.sampler = sampler
        self.size = dataset_size
        self.epoch = 0
        self.is_batch_sampler = bool(getattr(sampler, "is_batch_sampler", False))

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        offset = self.epoch * self.size
        for item in self.sampler:
            yield [offset + int(i) for i in item] if self.is_batch_sampler else offset + int(item)


class TrainingDataset(HerbariumDataset):
    """HerbariumDataset for training: seeded augmentation and an unreadable-image flag.

    Items are requested by :class:`EpochKeys` keys; each sample's augmentation is seeded from
    (seed, epoch, index), so an exactly resumed run sees exactly the same pixels.

    With ``bad_image_policy="skip"`` a bad file is replaced by the next readable one; the
    sample's ``"unreadable"`` flag travels with the batch (also out of DataLoader worker
    processes, whose copies of the dataset the trainer cannot see) so that the trainer can count
    and report them.
    """

    def __init__(self, *args, seed: int = 0, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self.teacher = teacher  # herbens.stores.targets.TeacherRows when distilling

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(int(key), len(self))
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with seeded_rngs(sample_seed):
            sample = super().__getitem__(index)
        if self.teacher is not None:
            sample.update(self.teacher.sample(index))
        return sample


def _loader_kwargs(num_workers: int) -> dict:
    # Workers stay alive across epochs: re-forking them each epoch costs seconds per epoch.
    return {"num_workers": num_workers, "persistent_workers": num_workers > 0,
            "pin_memory": False}


def train_decode_size(cfg: dict) -> tuple[int, int] | None:
    """Smallest decoded ``(height, width)`` at which random-resized crops are never upsampled
    where the full-size image would not have been.

    The rule: RandomResizedCrop cuts a crop of area ``s * A`` (``s >= scale_min`` of the image
    area ``A``) with pixel aspect ``r = w / h`` in ``[ratio_min, ratio_max]`` and resizes it to
    the input ``H x W``. Its narrowest crop is ``sqrt(scale_min * A * ratio_min)`` wide and its
    shortest ``sqrt(scale_min * A / ratio_max)`` high. Requiring both to be at least ``W`` and
    ``H`` pixels gives ``A >= H * W * k**2`` with
    ``k**2 = max(W / (H * ratio_min), H * ratio_max / W) / scale_min``; asking for at least
    ``k * H`` rows and ``k * W`` columns guarantees that area. Decoding at any reduced scale
    that still covers this size changes only the resampling source of crops that are
    downscaled anyway; crops that would be upsampled at full size are never decoded smaller
    than full size (the decoder never goes below the file's own size).

    Returns:
        ``(height, width)`` for :class:`HerbariumDataset`'s ``decode_size``, or None when the
        augmentation allows arbitrarily small crops (``scale_min <= 0``).
    """
    height, width = cfg["input"]["size"]
    scale_min = float(min(cfg["augment"]["scale"]))
    ratio_min, ratio_max = (float(r) for r in sorted(cfg["augment"]["ratio"]))
    if scale_min <= 0 or ratio_min <= 0:
        return None
    k = math.sqrt(max(width / (height * ratio_min), height * ratio_max / width) / scale_min)
    k = max(k, 1.0)
    return math.ceil(k * height), math.ceil(k * width)


def train_loader(frame, images_dir: Path, taxonomy: Taxonomy, transform, cfg: dict, teacher=None):
    """Shuffled (or re-balanced) training loader; returns (loader, sampler with set_epoch).

    Samples carry ``"unreadable"`` (see :class:`TrainingDataset`) and, with ``teacher``
    (:class:`herbens.stores.targets.TeacherRows`), their own teacher targets. The loader has its own
    seeded generator, so starting an epoch (or resuming one) draws nothing from torch's global
    generator, which the trainer checkpoints.
    """
    labels = taxonomy.index_of(frame["category_id"].to_numpy())
    params = dict(cfg["sampler"])
    sampler = build_sampler(params.pop("name"), labels, seed=cfg["seed"], **params)
    dataset = TrainingDataset(frame, images_dir, taxonomy, transform,
                              bad_image_policy=cfg["data"]["bad_images"],
                              decode_size=train_decode_size(cfg), seed=cfg["seed"],
                              max_pixels=cfg["data"]["max_image_pixels"], min_side=min_image_size(cfg),
                              teacher=teacher)
    kwargs = _loader_kwargs(cfg["data"]["num_workers"])
    kwargs["generator"] = torch.Generator().manual_seed(int(cfg["seed"]))
    keys = EpochKeys(sampler, len(dataset))
    if keys.is_batch_sampler:  # P x K: the sampler makes the batches
        return DataLoader(dataset, batch_sampler=keys, **kwargs), keys
    return DataLoader(dataset, batch_size=cfg["train"]["batch_size"], sampler=keys, drop_last=True,
                      **kwargs), keys


def min_image_size(cfg: dict) -> int:
    """``data.min_image_size`` (hand-made configs without it get the default)."""
    return int(cfg["data"].get("min_image_size", DEFAULT_MIN_IMAGE_SIDE) or 0)


def predict_loader(frame, images_dir: Path, taxonomy: Taxonomy | None, views, cfg: dict,
                   batch_size: int | None = None, data_config: dict | None = None):
    """Ordered loader over every row of ``frame``; one stacked tensor of views per image.

    Args:
        views: the test-time :class:`herbens.data.views.Views` (their transforms are built
            from ``data_config``), or ready ``[(name, transform)]`` pairs (:func:`build_tta_views`).
        data_config: the model's data config with the recipe's input size; when given, images
            are decoded at the reduced scale the views allow (:func:`eval_decode_size`).

    Unreadable images follow ``data.bad_images``: under ``skip`` the sample carries the next
    readable image's pixels flagged ``"unreadable"``, and the caller replaces those scores by
    the ``infer.bad_images`` fallback or fails the split (:func:`herbens.infer.splits.write_split_logits`).
    """
    if isinstance(views, Views):
        parsed, views = views, build_tta_views(views, data_config)
    else:
        parsed = Views.parse([name for name, _ in views])
    dataset = HerbariumDataset(frame, images_dir, taxonomy, transform=None,
                               bad_image_policy=cfg["data"]["bad_images"],
                               decode_size=eval_decode_size(data_config, parsed) if data_config else None,
                               views=[fn for _, fn in views], max_pixels=cfg["data"]["max_image_pixels"],
                               min_side=min_image_size(cfg))
    return DataLoader(dataset, batch_size=batch_size or int(cfg["infer"]["batch_size"]), shuffle=False,
                      **_loader_kwargs(cfg["data"]["num_workers"]))


class ReportingPaths(torch.utils.data.Dataset):
    """Images by path with test-time views; an unreadable file gives its error, not a crash.

    What ``herbens predict`` reads: any image may be bad, and each is reported by its row while
    the others are still predicted (:func:`collate_reporting`).
    """

    def __init__(self, paths: list[str], views: Views, data_config: dict, max_pixels: int | None,
                 min_side: int | None = DEFAULT_MIN_IMAGE_SIDE):
        self.inner = HerbariumDataset(pd.DataFrame({"file_name": paths}), "", None, transform=None,
                                      decode_size=eval_decode_size(data_config, views),
                                      views=[fn for _, fn in build_tta_views(views, data_config)],
                                      max_pixels=max_pixels, min_side=min_side)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int) -> dict:
        try:
            return {"index": i, "image": self.inner[i]["image"], "error": None}
        except HerbensError as exc:
            return {"index": i, "image": None, "error": str(exc)}


def collate_reporting(items: list[dict]) -> dict:
    """Stack the readable images of a batch; ``"errors"``: ``[(index, message)]`` of the others.

    ``"image"`` is None when no image of the batch could be read.
    """
    ok = [it for it in items if it["error"] is None]
    return {"index": torch.as_tensor([it["index"] for it in ok], dtype=torch.int64),
            "image": torch.stack([it["image"] for it in ok]) if ok else None,
            "errors": [(it["index"], it["error"]) for it in items if it["error"] is not None]}


def paths_loader(paths: list[str], views: Views, data_config: dict, batch_size: int, workers: int = 0,
                 max_pixels: int | None = None, pin_memory: bool = False,
                 min_side: int | None = DEFAULT_MIN_IMAGE_SIDE) -> DataLoader:
    """Ordered loader over image paths (:class:`ReportingPaths`, :func:`collate_reporting`)."""
    return DataLoader(ReportingPaths(paths, views, data_config, max_pixels, min_side), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=collate_reporting, pin_memory=pin_memory)
