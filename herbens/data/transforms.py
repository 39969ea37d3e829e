"""Image transforms: thin wrappers over timm's ``create_transform`` plus test-time views.

Normalisation and interpolation come from the model's own data config (never hard-coded
ImageNet statistics); the input size comes from the recipe and may be non-square.
"""

from __future__ import annotations

from typing import Callable

from timm.data import create_transform
from torchvision import transforms as T

from herbens.errors import HerbensError


def model_data_config(model_data_config: dict, input_cfg: dict) -> dict:
    """The model's timm data config with the recipe's input size (and crop_pct) applied."""
    height, width = _size(input_cfg["size"])
    config = dict(model_data_config)
    config["input_size"] = (3, height, width)
    if input_cfg.get("crop_pct") is not None:
        config["crop_pct"] = float(input_cfg["crop_pct"])
    return config


def _size(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise HerbensError(f"input.size must be an int or [height, width], got {size!r}")


def build_train_transform(data_config: dict, augment: dict) -> Callable:
    """Training transform: timm's random-resized-crop pipeline with the recipe's augmentations."""
    transform = create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        scale=tuple(augment["scale"]),
        ratio=tuple(augment["ratio"]),
        hflip=augment["hflip"],
        vflip=augment["vflip"],
        color_jitter=augment["color_jitter"] or None,
        auto_augment=augment["auto_augment"],
        re_prob=augment["re_prob"],
        interpolation=data_config.get("interpolation", "bilinear"),
        mean=data_config["mean"],
        std=data_config["std"],
    )
    if augment.get("rotation"):
        # timm has no rotation option; the paper's baselines rotate by +-15 degrees. Rotate
        # the PIL image before cropping, filling with white (sheet paper, not black borders).
        rotation = T.RandomRotation(augment["rotation"], fill=(255, 255, 255))
        transform = T.Compose([rotation, transform])
    return transform


def build_eval_transform(data_config: dict) -> Callable:
    """Evaluation transform: resize, centre crop, normalise (timm's eval pipeline)."""
    return create_transform(
        input_size=data_config["input_size"],
        is_training=False,
        crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode", "center"),
        interpolation=data_config.get("interpolation", "bilinear"),
        mean=data_config["mean"],
        std=data_config["std"],
    )


def build_tta_views(names: list[str], data_config: dict) -> list[tuple[str, Callable]]:
    """Named test-time views; each maps a PIL image to one normalised tensor."""
    center = build_eval_transform(data_config)
    views = {
        "center": center,
        "hflip": T.Compose([T.RandomHorizontalFlip(p=1.0), center]),
        "vflip": T.Compose([T.RandomVerticalFlip(p=1.0), center]),
    }
    out = []
    for name in names:
        if name not in views:
            raise HerbensError(f"unknown test-time view {name!r}; known: {', '.join(views)}")
        out.append((name, views[name]))
    return out
