"""``herbens prepare DATA_DIR --size S``: a resized copy of a dataset, made once, for fast training.

Decoding 1000 px JPEGs is most of the cost of a training epoch on a CPU-bound loader; a model
trained at 224-384 px needs a fraction of those pixels. ``prepare`` writes every train and test
image with its long edge at most ``S`` (JPEG quality 90, EXIF orientation applied), under the
same relative paths, plus the metadata files, so that ``data.root=OUT`` is a drop-in
replacement for the original folder.

- Each image is written to a temporary sibling and renamed, so a file that exists is complete.
- The metadata is copied last: an interrupted ``prepare`` leaves no dataset that looks complete.
- Rerunning skips the images already done (newer than their source, with the expected long edge),
  so an interrupted run resumes and a finished one costs only a scan.
- Images no larger than ``S`` are copied byte for byte; unreadable ones are copied unchanged too,
  so that training treats them exactly as it would the originals (``data.bad_images``).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from PIL import Image

from herbens.data.dataset import allow_large_images, load_rgb
from herbens.data.metadata import find_dataset, load_test_metadata, load_train_metadata
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write
from herbens.core.progress import progress_bar

JPEG_QUALITY = 90
_ORIENTATION_TAG = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that exchange width and height
# Decode at least this many times the target size before the final Lanczos resize, as Pillow's
# own ``thumbnail`` does: reduced-scale JPEG decoding is fast but slightly soft on its own.
REDUCING_GAP = 2
OUTCOMES = ("resized", "copied", "done", "unreadable", "missing")


def default_output(root: Path, size: int) -> Path:
    """``DATA_DIR/../<name>_<size>``: next to the original, named after it and the size."""
    root = root.resolve()
    return root.parent / f"{root.name}_{size}"


def prepare_dataset(root: str | os.PathLike, size: int, out: str | os.PathLike | None = None,
                    workers: int | None = None, quality: int = JPEG_QUALITY,
                    progress: bool = True) -> dict:
    """Write a copy of a dataset with every image's long edge at most ``size`` pixels.

    Args:
        root: dataset directory (Kaggle 2022 or 2021 layout, or CSV metadata).
        size: long edge of the written images, in pixels (e.g. twice the training input).
        out: output directory; default :func:`default_output`.
        workers: processes (default: all CPUs); 1 runs in this process.
        quality: JPEG quality of resized images.
        progress: show progress (herbens.core.progress).

    Returns:
        ``{"out", "images", "seconds", <outcome>: count}`` for every outcome in ``OUTCOMES``.

    Raises:
        HerbensError: bad arguments, no dataset at ``root``, images outside ``root``, or an
            output that cannot be written.
    """
    if size < 16:
        raise HerbensError(f"prepare: --size must be at least 16 pixels, got {size}")
    if not 1 <= quality <= 100:
        raise HerbensError(f"prepare: --quality must be 1..100, got {quality}")
    started = time.perf_counter()
    root = Path(root).resolve()
    out = Path(out).resolve() if out else default_output(root, size)
    if out == root:
        raise HerbensError(f"prepare: the output {out} is the dataset itself; choose another --out")
    images, metadata = _dataset_files(root)
    jobs = [(str(root / rel), str(out / rel), int(size), int(quality)) for rel in images]
    counts = Counter(_run_jobs(jobs, workers or os.cpu_count() or 1, progress))
    for rel in metadata:  # last: their presence marks a finished copy
        _copy_atomic(root / rel, out / rel)
    return {"out": str(out), "images": len(jobs), "seconds": round(time.perf_counter() - started, 2),
            **{outcome: counts.get(outcome, 0) for outcome in OUTCOMES}}


def _dataset_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Image paths (train and test, unique) and metadata files, relative to ``root``."""
    train_file, test_file = find_dataset(root)
    meta = load_train_metadata(train_file)
    tables = [(meta.images["file_name"], Path(meta.images_dir))]
    if test_file is not None:
        test = load_test_metadata(test_file)
        tables.append((test["file_name"], Path(test.attrs["images_dir"])))
    images: dict[Path, None] = {}
    for names, images_dir in tables:
        for name in names.astype(str):
            images[_relative(Path(images_dir).resolve() / name, root)] = None
    metadata = {_relative(p.resolve(), root) for p in (train_file, test_file) if p is not None}
    # Other top-level files travel too (sample_submission.csv, test_solution.csv, licences...).
    metadata |= {Path(p.name) for p in root.iterdir() if p.is_file() and Path(p.name) not in images}
    return list(images), sorted(metadata)


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        raise HerbensError(f"prepare: {path} lies outside the dataset folder {root}; "
                           f"only datasets whose images are inside it can be copied") from None


def _run_jobs(jobs: list[tuple], workers: int, progress: bool):
    """Yield each job's outcome, from a process pool when ``workers > 1``."""
    bar = progress_bar(total=len(jobs), desc="prepare", unit="img", enabled=progress, leave=True)
    try:
        if workers <= 1 or len(jobs) < 2:
            for job in jobs:
                yield prepare_image(*job)
                bar.update(1)
            return
        chunk = max(1, min(64, len(jobs) // (workers * 8)))
        with _pool_context().Pool(workers, initializer=allow_large_images) as pool:
            for outcome in pool.imap_unordered(_prepare_job, jobs, chunksize=chunk):
                yield outcome
                bar.update(1)
    finally:
        bar.close()


def _pool_context():
    # fork starts workers without re-importing torch; elsewhere (macOS, Windows) use the default.
    if "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _prepare_job(job: tuple) -> str:
    return prepare_image(*job)


def prepare_image(src: str, dst: str, size: int, quality: int = JPEG_QUALITY) -> str:
    """Write one image's resized copy; returns its outcome (one of ``OUTCOMES``).

    Raises:
        HerbensError: the output cannot be written (full disk, read-only folder).
    """
    src_path, dst_path = Path(src), Path(dst)
    _refuse_folder_clash(src_path, dst_path)
    try:
        upright, fmt = _header(src_path)
    except FileNotFoundError:
        return "missing"
    except Exception:  # noqa: BLE001 - any header failure means an unreadable file
        _copy_atomic(src_path, dst_path)
        return "unreadable"
    if _is_done(src_path, dst_path, min(max(upright), size)):
        return "done"
    if max(upright) <= size:
        _copy_atomic(src_path, dst_path)
        return "copied"
    try:
        image = _resized(src_path, upright, size)
    except HerbensError:
        _copy_atomic(src_path, dst_path)
        return "unreadable"
    _save_atomic(image, dst_path, fmt, quality)
    return "resized"


def _refuse_folder_clash(src: Path, dst: Path) -> None:
    # A folder where an image file is named would otherwise surface as IsADirectoryError.
    if src.is_dir():
        raise HerbensError(f"prepare: {src} is listed in the metadata as an image but is a folder")
    if dst.is_dir():
        raise HerbensError(f"prepare: a folder {dst} stands where the copy of {src} goes; "
                           "move it away or choose another --out")


def _header(path: Path) -> tuple[tuple[int, int], str]:
    """Upright ``(width, height)`` (after the EXIF rotation) and format, from the header only."""
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(_ORIENTATION_TAG, 1) in _SWAPPING_ORIENTATIONS:
            width, height = height, width
        return (width, height), image.format or "JPEG"


def _is_done(src: Path, dst: Path, expected_long_edge: int) -> bool:
    """Whether ``dst`` is a finished copy of the current ``src`` at the requested size."""
    try:
        if dst.stat().st_mtime < src.stat().st_mtime:
            return False
        with Image.open(dst) as image:
            return max(image.size) == expected_long_edge
    except Exception:  # noqa: BLE001 - missing or unreadable copy: do it again
        return False


def _resized(src: Path, upright: tuple[int, int], size: int) -> Image.Image:
    """Decode upright RGB at reduced scale and resize so that the long edge is ``size``."""
    scale = size / max(upright)
    width, height = (max(1, round(side * scale)) for side in upright)
    image = load_rgb(src, decode_size=(height * REDUCING_GAP, width * REDUCING_GAP))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _save_atomic(image: Image.Image, dst: Path, fmt: str, quality: int) -> None:
    options = {"quality": quality} if fmt == "JPEG" else {}
    with atomic_write(dst, "wb", durable=False) as handle:
        image.save(handle, format=fmt, **options)


def _copy_atomic(src: Path, dst: Path) -> None:
    if not src.exists():
        return  # a missing source stays missing in the copy, where check/training report it
    with open(src, "rb") as source, atomic_write(dst, "wb", durable=False) as handle:
        shutil.copyfileobj(source, handle)
