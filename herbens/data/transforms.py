"""Image transforms: timm's training pipeline, the evaluation crop and test-time views.

Normalisation and interpolation come from the model's own data config (never hard-coded
ImageNet statistics); the input size comes from the recipe and may be non-square.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image

from timm.data import create_transform
from torchvision import transforms as T

from herbens.data.views import VIEW_KINDS, Views, parse_view, view_row_names

# parse_view, view_row_names and VIEW_KINDS live with the Views value type; named here too
# because the transforms are where view names meet pixels.
__all__ = ["VIEW_KINDS", "Views", "build_eval_transform", "build_train_transform", "build_tta_views",
           "eval_decode_size", "model_data_config", "parse_view", "view_row_names"]


def model_data_config(model_data_config: dict, input_cfg: dict) -> dict:
    """The model's timm data config with the recipe's input size (and crop_pct) applied."""
    height, width = input_cfg["size"]
    config = dict(model_data_config)
    config["input_size"] = (3, height, width)
    if input_cfg["crop_pct"] is not None:
        config["crop_pct"] = float(input_cfg["crop_pct"])
    return config


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
    """Evaluation transform: resize the shorter side to size / crop_pct, centre crop, normalise."""
    _, height, width = data_config["input_size"]
    return _resize_crop(data_config, _default_scale(data_config), T.CenterCrop((height, width)))


def _default_scale(data_config: dict) -> float:
    return 1.0 / float(data_config.get("crop_pct") or 0.875)


def _resize_crop(data_config: dict, scale: float, crop) -> Callable:
    """Resize the shorter side to ``scale`` x the input size, then ``crop`` and normalise."""
    _, height, width = data_config["input_size"]
    resize = T.Resize(int(round(min(height, width) * scale)), interpolation=_interpolation(data_config))
    return T.Compose([resize, crop, _stack_normalised(data_config)])


def _interpolation(data_config: dict):
    return T.InterpolationMode(data_config.get("interpolation", "bilinear"))


def _normalise(data_config: dict) -> Callable:
    return T.Compose([T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])


def _stack_normalised(data_config: dict) -> Callable:
    """PIL image, or tuple of them (five/ten-crop), -> [C,H,W] or [K,C,H,W] tensor."""
    normalise = _normalise(data_config)

    def apply(images):
        if isinstance(images, (tuple, list)):
            return torch.stack([normalise(image) for image in images])
        return normalise(images)

    return apply


def _squash(data_config: dict) -> Callable:
    """The whole sheet resized to the input size, aspect ratio not kept."""
    _, height, width = data_config["input_size"]
    return T.Compose([T.Resize((height, width), interpolation=_interpolation(data_config)),
                      _normalise(data_config)])


def _letterbox(data_config: dict) -> Callable:
    """The whole sheet fitted inside the input size, aspect kept, padded with white paper."""
    _, height, width = data_config["input_size"]
    normalise = _normalise(data_config)

    def apply(image: Image.Image):
        factor = min(height / image.height, width / image.width)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(image.resize(size, Image.BILINEAR), ((width - size[0]) // 2, (height - size[1]) // 2))
        return normalise(canvas)

    return apply


class FixedResizedCrops:
    """``count`` random-resized crops drawn once from a seed: the same relative boxes for
    every image, so test-time views are reproducible and independent of image order."""

    def __init__(self, data_config: dict, count: int, seed: int = 0,
                 scale=(0.35, 1.0), ratio=(0.75, 1.3333)):
        _, self.height, self.width = data_config["input_size"]
        generator = torch.Generator().manual_seed(seed)
        self.boxes = []
        probe = Image.new("RGB", (1000, 1000))
        for _ in range(count):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
                top, left, h, w = T.RandomResizedCrop.get_params(probe, list(scale), list(ratio))
            self.boxes.append((top / 1000, left / 1000, h / 1000, w / 1000))
        self.interpolation = _interpolation(data_config)
        self.normalise = _normalise(data_config)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        crops = []
        for top, left, h, w in self.boxes:
            box = (round(top * image.height), round(left * image.width),
                   max(1, round(h * image.height)), max(1, round(w * image.width)))
            crop = T.functional.resized_crop(image, *box, [self.height, self.width],
                                             interpolation=self.interpolation)
            crops.append(self.normalise(crop))
        return torch.stack(crops)


def eval_decode_size(data_config: dict, views: Views | list[str] = ("center",)) -> tuple[int, int] | None:
    """Smallest decoded ``(height, width)`` for the test-time views (:func:`build_tta_views`).

    The centre, flip and five/ten-crop views resize the shorter side to ``S x min(H, W)`` (``S``
    from ``@S``, else ``1 / crop_pct``) before cropping, so an image whose shorter side is at
    least that is only ever downscaled, exactly as at full size; ``full`` and ``letterbox``
    resize the whole sheet to at most ``H x W``. Seeded random crops (``rrcN``) and views this
    rule does not know are decoded at full size (None).
    """
    _, height, width = data_config["input_size"]
    need = (1, 1)
    for view in Views.of(views).items:
        kind, scale = view.kind, view.scale
        if kind in ("center", "hflip", "vflip", "fivecrop", "tencrop"):
            side = math.ceil(min(height, width) * (scale or _default_scale(data_config)))
            size = (side, side)
        elif kind in ("full", "letterbox"):
            size = (height, width)
        else:
            return None
        need = (max(need[0], size[0]), max(need[1], size[1]))
    return need


def build_tta_views(views: Views | list[str], data_config: dict) -> list[tuple[str, Callable]]:
    """Named test-time views; each maps a PIL image to a [C,H,W] or [K,C,H,W] tensor.

    Views: ``center`` (the eval transform), ``hflip``/``vflip`` (of the centre view), ``full``
    (the whole sheet squashed to the input size), ``letterbox`` (whole sheet, aspect kept,
    white padding: herbarium sheets are portrait), ``fivecrop``/``tencrop`` (four corners and
    centre, plus their mirrors), ``rrcN`` (N seeded random-resized crops). ``@S`` scales the
    resize before cropping to S x the input size (``center@1.14``, ``tencrop@1.2``); the
    default is the model's crop_pct.
    """
    _, height, width = data_config["input_size"]
    out = []
    for item in Views.of(views).items:
        kind, name = item.kind, item.name
        scale = item.scale or _default_scale(data_config)
        if kind == "center":
            view = _resize_crop(data_config, scale, T.CenterCrop((height, width)))
        elif kind in ("hflip", "vflip"):
            flip = T.RandomHorizontalFlip(1.0) if kind == "hflip" else T.RandomVerticalFlip(1.0)
            view = T.Compose([flip, _resize_crop(data_config, scale, T.CenterCrop((height, width)))])
        elif kind == "full":
            view = _squash(data_config)
        elif kind == "letterbox":
            view = _letterbox(data_config)
        elif kind == "fivecrop":
            view = _resize_crop(data_config, scale, T.FiveCrop((height, width)))
        elif kind == "tencrop":
            view = _resize_crop(data_config, scale, T.TenCrop((height, width)))
        else:  # rrc (parse_view refuses anything else)
            view = FixedResizedCrops(data_config, item.count)
        out.append((name, view))
    return out
