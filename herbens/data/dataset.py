"""Herbarium image dataset: decode robustly, label through the taxonomy, return dict samples.

Decoding is the hot path of training on ~1M JPEGs, and real collections contain odd files
(CMYK and 16-bit scans, palette PNGs, EXIF-rotated photographs, huge full-resolution sheets,
truncated downloads). :func:`load_rgb` turns any of them into a correct RGB image, decoding JPEGs
at a reduced scale when the model needs far fewer pixels than the file holds.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from herbens.core.errors import HerbensError

BAD_IMAGE_POLICIES = ("error", "skip")

# Decompression bombs: a small file declaring a huge image (a 20000 x 20000 PNG decodes to 1.2 GB
# of RGB and takes seconds). Images over the limit are refused from the header alone, before any
# pixel is decoded. The default is Pillow's own hard limit (twice its 89.5 MP warning limit):
# 537 MB as RGB, enough for a 600 dpi scan of a 29 x 43 cm herbarium sheet (~7,000 x 10,000 px,
# 70 MP) with room to spare, and for the 1,000 px Kaggle images by far. Settable per recipe
# (``data.max_image_pixels``) and per check (``herbens check --max-image-pixels``).
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# Below this many pixels on its shorter side a file is a placeholder, an icon or a broken
# export, not a specimen: resized to the input it still gets a confident (meaningless) name.
# Training, inference and predict refuse it from the header, as an unreadable image
# (``data.min_image_size``; 0 turns the check off). 16 px keeps the synthetic test sheets.
DEFAULT_MIN_IMAGE_SIDE = 16

_WHITE = (255, 255, 255)  # herbarium paper: transparent areas are blank sheet, not black
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that exchange width and height
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class BadImageWarning(UserWarning):
    """An image could not be decoded and was replaced by another (``bad_image_policy="skip"``)."""


class ImageTooSmallError(HerbensError):
    """An image whose shorter side is under the minimum: too small to be a specimen image."""


class ImageTooLargeError(HerbensError):
    """An image declares more pixels than the limit (a possible decompression bomb).

    Attributes:
        size: the declared ``(width, height)``.
    """

    def __init__(self, message: str, size: tuple[int, int] | None = None):
        super().__init__(message)  # size None: rebuilt from a DataLoader worker's message
        self.size = size


# ----- decoding -----------------------------------------------------------------------------

def allow_large_images() -> None:
    """Turn Pillow's own decompression-bomb guard off: :func:`load_rgb` checks every image
    against its settable ``max_pixels`` instead (Pillow's fixed limit would warn, then refuse,
    below a limit the user raised)."""
    Image.MAX_IMAGE_PIXELS = None


def load_rgb(source: str | os.PathLike | io.BytesIO, decode_size: tuple[int, int] | None = None,
             name: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
             min_side: int | None = None) -> Image.Image:
    """Decode an image file into an upright RGB image.

    Args:
        source: a path or a binary file object.
        decode_size: ``(height, width)`` the caller needs at least; JPEGs are then decoded at
            the smallest DCT scale (1/2, 1/4, 1/8) that still covers it, and other formats are
            box-reduced by whole factors, so the result is never smaller than this in either
            dimension (unless the file itself is).
        name: how to name the image in error messages (defaults to the path).
        max_pixels: refuse images with more pixels than this, from the header, before
            decoding (None: no limit).
        min_side: refuse images whose shorter side is under this, from the header (None or 0:
            no minimum; the datasets pass :data:`DEFAULT_MIN_IMAGE_SIDE`).

    Returns:
        An RGB image with the EXIF orientation applied.

    Raises:
        ImageTooLargeError: naming the file and its size when it is over ``max_pixels``.
        ImageTooSmallError: naming the file and its size when a side is under ``min_side``.
        HerbensError: naming the file when it is missing or cannot be decoded.
    """
    name = name or str(source)
    allow_large_images()
    try:
        img = _decode(source, decode_size, max_pixels, name, min_side)
        img = to_rgb(img)
        if decode_size:
            img = _reduce(img, decode_size)
    except HerbensError:
        raise
    except FileNotFoundError:
        raise HerbensError(f"image file not found: {name}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means the file is bad
        raise HerbensError(f"cannot decode image {name}: {describe_decode_error(exc)}") from exc
    return img


def describe_decode_error(exc: BaseException) -> str:
    """A short reason for a decoding failure, free of object reprs (stable across processes)."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image file (empty, corrupt or another format)"
    return f"{type(exc).__name__}: {exc}"


def _decode(source, decode_size: tuple[int, int] | None, max_pixels: int | None, name: str,
            min_side: int | None = None) -> Image.Image:
    """Open, check the declared size, decode (at reduced scale if asked) and turn upright."""
    img = Image.open(source)  # reads the header only: the size is known, nothing decoded yet
    try:
        if min_side and min(img.size) < min_side:
            raise ImageTooSmallError(f"image {name} is {img.width} x {img.height} pixels: too small to be a "
                                     f"specimen image (a side under {min_side} px, data.min_image_size)")
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ImageTooLargeError(f"image {name} is {img.width} x {img.height} = {img.width * img.height:,} "
                                     f"pixels, over the limit of {max_pixels:,} (data.max_image_pixels; a "
                                     "decompression bomb?): resize it (`herbens prepare`) or raise the limit",
                                     size=img.size)
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
        if decode_size:
            _request_draft(img, decode_size, orientation)
        img.load()  # also closes a file Pillow opened itself
    except BaseException:
        img.close()
        raise
    # exif_transpose copies the image even when nothing changes: only call it when needed.
    return ImageOps.exif_transpose(img) if orientation not in (1, None) else img


def _request_draft(img: Image.Image, decode_size: tuple[int, int], orientation: int) -> None:
    """Ask the JPEG decoder for a reduced scale that still covers ``decode_size``.

    ``draft`` is a no-op for other formats. Its size is in file (pre-rotation) coordinates, so
    swap the request when the EXIF orientation will turn the image by 90 degrees.
    """
    height, width = decode_size
    if orientation in _SWAPPING_ORIENTATIONS:
        height, width = width, height
    img.draft("RGB", (int(width), int(height)))


def _reduce(img: Image.Image, decode_size: tuple[int, int]) -> Image.Image:
    """Box-reduce by the largest whole factor that keeps both sides at least ``decode_size``."""
    height, width = decode_size
    factor = min(img.width // max(int(width), 1), img.height // max(int(height), 1))
    return img.reduce(factor) if factor >= 2 else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB with correct colours.

    Pillow's own ``convert("RGB")`` clips 16-bit grey to white and blackens transparent pixels;
    those cases are handled here.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    if img.mode == "CMYK":
        return _cmyk_to_rgb(img)
    if img.mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") or "transparency" in img.info:
        return _flatten_on_white(img.convert("RGBA"))
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale 16-bit / 32-bit grey to 8 bits over its full nominal range."""
    values = np.asarray(img).astype(np.float32)
    if img.mode in _SIXTEEN_BIT_MODES:
        scale = 255.0 / 65535.0
    elif img.mode == "I":  # 32-bit container: 16-bit data when it exceeds 8 bits
        scale = 1.0 if values.max(initial=0) <= 255 else 255.0 / 65535.0
    else:  # "F": floats in [0, 1] are normalised intensities
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """Use the embedded ICC profile when there is one; Pillow's naive formula otherwise."""
    icc = img.info.get("icc_profile")
    if icc:
        try:

            return ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                             ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile must not make the image unreadable
            pass
    return img.convert("RGB")


def _flatten_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


# ----- dataset ------------------------------------------------------------------------------

class HerbariumDataset(torch.utils.data.Dataset):
    """Images listed in a metadata table, returned as dict samples.

    Args:
        frame: table with ``file_name`` (relative to ``images_dir``) and, for labelled data,
            ``category_id``.
        images_dir: directory of the image files.
        taxonomy: maps category ids to species/genus/family indices; ``None`` (or a frame
            without ``category_id``) gives labels of -1.
        transform: callable PIL image -> tensor; ``None`` returns the PIL image.
        bad_image_policy: ``"error"`` raises HerbensError naming the file; ``"skip"`` warns once
            per file, records it in ``bad_images`` and returns the next readable image
            ((i + 1) % n, with that image's labels) so an epoch never dies, flagging the
            sample ``"unreadable": True`` so that prediction never stores those scores as the
            unreadable image's own.
        decode_size: ``(height, width)`` the transform needs at least; enables reduced-scale
            JPEG decoding (see :func:`load_rgb`).
        views: list of callables PIL -> tensor used instead of ``transform`` for test-time
            augmentation; ``"image"`` is then a tensor [V, C, H, W] (a view returning several
            crops [K, C, H, W] contributes K rows).
        max_pixels: images with more pixels are bad images (see :func:`load_rgb`).

    Each sample is ``{"image", "species", "genus", "family", "index", "unreadable"}``; ``index``
    is always the requested position ``i`` so that predictions can be gathered back by position,
    and ``unreadable`` says that the image at ``i`` could not be decoded (another was returned).
    """

    def __init__(self, frame: pd.DataFrame, images_dir: str | os.PathLike, taxonomy,
                 transform: Callable | None, bad_image_policy: str = "error",
                 decode_size: tuple[int, int] | None = None, views: Sequence[Callable] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, min_side: int | None = DEFAULT_MIN_IMAGE_SIDE):
        if bad_image_policy not in BAD_IMAGE_POLICIES:
            raise HerbensError(f"unknown bad_image_policy {bad_image_policy!r}; "
                               f"expected one of {', '.join(BAD_IMAGE_POLICIES)}")
        if "file_name" not in frame.columns:
            raise HerbensError("dataset: the image table has no file_name column")
        self.images_dir = Path(images_dir)
        # Plain strings and numpy arrays: cheap to pickle into DataLoader workers.
        self.paths = [os.path.join(self.images_dir, f) for f in frame["file_name"].astype(str)]
        self.labels = _label_matrix(frame, taxonomy)
        self.transform = transform
        self.views = list(views) if views else None
        self.decode_size = tuple(int(s) for s in decode_size) if decode_size else None
        self.bad_image_policy = bad_image_policy
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self.min_side = int(min_side or 0)
        self.bad_images: list[str] = []
        self._bad_positions: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"dataset index {index} out of range for {len(self)} images")
        image, position = self._load_readable(index)
        species, genus, family = (int(v) for v in self.labels[position])
        return {"image": self._apply(image), "species": species, "genus": genus, "family": family,
                "index": index, "unreadable": position != index}

    def _load_readable(self, index: int) -> tuple[Image.Image, int]:
        """The image at ``index`` or, under "skip", the next readable one and its position."""
        n = len(self)
        for step in range(n):
            position = (index + step) % n
            if position in self._bad_positions:
                continue
            try:
                return load_rgb(self.paths[position], self.decode_size, max_pixels=self.max_pixels,
                                min_side=self.min_side), position
            except HerbensError as exc:
                if self.bad_image_policy == "error":
                    raise
                self._record_bad(position, exc)
        raise HerbensError(f"no readable image among the {n} images under {self.images_dir}")

    def _record_bad(self, position: int, exc: HerbensError) -> None:
        self._bad_positions.add(position)
        self.bad_images.append(self.paths[position])
        warnings.warn(f"skipping unreadable image ({exc})", BadImageWarning, stacklevel=3)

    def _apply(self, image: Image.Image):
        if self.views is not None:
            outputs = [view(image) for view in self.views]
            return torch.cat([o if o.dim() == 4 else o.unsqueeze(0) for o in outputs])
        return self.transform(image) if self.transform is not None else image


def _label_matrix(frame: pd.DataFrame, taxonomy) -> np.ndarray:
    """[n, 3] species/genus/family indices; -1 for unlabelled data."""
    if taxonomy is None or "category_id" not in frame.columns:
        return np.full((len(frame), 3), -1, dtype=np.int64)
    species = taxonomy.index_of(frame["category_id"].to_numpy())
    return np.stack([species, taxonomy.level_indices("genus", species),
                     taxonomy.level_indices("family", species)], axis=1).astype(np.int64)
