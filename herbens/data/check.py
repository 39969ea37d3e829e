"""``herbens check DATA_DIR``: find what would break or bias training before spending GPU hours.

Checks the metadata (duplicate ids, annotations of unknown images or categories, images without
annotation, categories without any training image) and every image file (missing, not
decodable, byte-identical duplicates, within and across train and test). Each file is read
once: the same bytes are hashed and decoded, in a process pool for large datasets.
"""

from __future__ import annotations

import functools
import hashlib
import io
import multiprocessing
import os
from collections import defaultdict
from pathlib import Path

import pandas as pd

from herbens.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, ImageTooLargeError, describe_decode_error, load_rgb
from herbens.data.metadata import (ISSUE_MESSAGES, find_dataset, inspect_test_metadata,
                                   inspect_train_metadata)
from herbens.core.errors import HerbensError
from herbens.core.progress import progress_bar

# Problem kinds in report order, with the heading printed for each.
PROBLEMS = {
    **ISSUE_MESSAGES,
    "empty_classes": "category without any training image",
    "missing_images": "training image file missing",
    "unreadable_images": "training image file cannot be decoded",
    "oversized_images": "training image over the pixel limit (possible decompression bomb)",
    "duplicate_test_ids": "test image_id listed more than once",
    "missing_test_images": "test image file missing",
    "unreadable_test_images": "test image file cannot be decoded",
    "oversized_test_images": "test image over the pixel limit (possible decompression bomb)",
    "duplicate_images": "files with identical bytes",
}

# Decoding at 1/8 JPEG scale still reads every byte of the entropy-coded data, so truncation
# and corruption are found at a fraction of the cost of a full decode.
_CHECK_DECODE_SIZE = (64, 64)


def check_dataset(root: str | Path, workers: int = 1, progress: bool = True,
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> dict:
    """Check a dataset directory and return a report.

    Args:
        root: dataset directory (see :func:`herbens.data.metadata.find_dataset`) or a training
            metadata file.
        workers: processes used to read, hash and decode the image files (1: in-process).
        progress: show progress (a bar on a terminal, plain lines in a log: herbens.core.progress).
        max_pixels: images declaring more pixels are reported as oversized (and not decoded);
            use the recipe's ``data.max_image_pixels``.

    Returns:
        ``{"root", "train_metadata", "test_metadata", "counts": {...}, "problems": {kind:
        [ids or paths]}, "ok": bool}``; ``problems`` has every kind of ``PROBLEMS``.

    Raises:
        HerbensError: when the metadata cannot be read at all (missing, malformed, missing
            keys or fields).
    """
    root = Path(root)
    train_path, test_path = find_dataset(root)
    meta, issues = inspect_train_metadata(train_path)
    problems: dict[str, list] = {kind: [] for kind in PROBLEMS}
    for kind, ids in issues.items():
        problems[kind] = [str(i) for i in ids]
    problems["empty_classes"] = _empty_classes(meta.categories, meta.images)

    files = _file_table(meta.images["file_name"], meta.images_dir, "train")
    test_count = 0
    if test_path is not None:
        test, duplicate_test_ids = inspect_test_metadata(test_path)
        problems["duplicate_test_ids"] = duplicate_test_ids
        test_count = len(test)
        files = pd.concat([files, _file_table(test["file_name"], test.attrs["images_dir"], "test")],
                          ignore_index=True)

    results = _scan_files(files["path"].tolist(), workers, progress, max_pixels)
    _file_problems(files, results, _display_base(root, train_path), problems)
    counts = {"train_images": len(meta.images), "categories": len(meta.categories),
              "genera": int(meta.categories["genus"].nunique()),
              "families": int(meta.categories["family"].nunique()),
              "test_images": test_count, "files_checked": len(files)}
    return {"root": str(root), "train_metadata": str(train_path),
            "test_metadata": str(test_path) if test_path else None, "counts": counts,
            "problems": problems, "ok": not any(problems.values())}


def _empty_classes(categories: pd.DataFrame, images: pd.DataFrame) -> list[str]:
    used = set(images["category_id"])
    empty = categories[~categories["category_id"].isin(used)]
    return [f"{cid} ({name})" for cid, name in zip(empty["category_id"], empty["scientific_name"])]


def _file_table(file_names: pd.Series, images_dir: Path, split: str) -> pd.DataFrame:
    paths = [os.path.join(images_dir, f) for f in file_names.astype(str)]
    return pd.DataFrame({"path": paths, "split": split})


def _display_base(root: Path, train_path: Path) -> Path:
    return root if root.is_dir() else train_path.parent


# ----- reading, hashing and decoding every file ---------------------------------------------

def scan_file(path: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[str, str]:
    """Read one image file once: ``("ok", content hash)``, ``("missing", "")``,
    ``("oversized", size)`` or ``("unreadable", reason)``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return "missing", ""
    except OSError as exc:
        return "unreadable", f"cannot read: {exc.strerror or exc}"
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        load_rgb(io.BytesIO(data), _CHECK_DECODE_SIZE, name=path, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        width, height = exc.size
        return "oversized", f"{width} x {height} = {width * height:,} pixels, over {max_pixels:,}"
    except HerbensError as exc:
        cause = exc.__cause__  # the decoder's own words, without the path repeated
        return "unreadable", describe_decode_error(cause) if cause else str(exc)
    return "ok", digest


def _scan_files(paths: list[str], workers: int, progress: bool,
                max_pixels: int | None) -> list[tuple[str, str]]:
    bar = progress_bar(total=len(paths), desc="checking images", unit="img", enabled=progress)
    scan = functools.partial(scan_file, max_pixels=max_pixels)
    try:
        if workers <= 1 or len(paths) < 2:
            return [_tick(bar, scan(p)) for p in paths]
        chunksize = max(1, min(256, len(paths) // (workers * 8)))
        with multiprocessing.get_context().Pool(workers) as pool:
            return [_tick(bar, r) for r in pool.imap(scan, paths, chunksize=chunksize)]
    finally:
        bar.close()


def _tick(bar, result):
    bar.update(1)
    return result


def _file_problems(files: pd.DataFrame, results: list[tuple[str, str]], base: Path,
                   problems: dict[str, list]) -> None:
    by_digest: dict[str, list[str]] = defaultdict(list)
    for path, split, (status, detail) in zip(files["path"], files["split"], results):
        shown = _relative(path, base)
        prefix = "" if split == "train" else "test_"
        if status == "missing":
            problems[f"missing_{prefix}images"].append(shown)
        elif status in ("unreadable", "oversized"):
            problems[f"{status}_{prefix}images"].append(f"{shown}: {detail}")
        else:
            by_digest[detail].append(shown)
    problems["duplicate_images"] = [" = ".join(group) for group in by_digest.values() if len(group) > 1]


def _relative(path: str, base: Path) -> str:
    try:
        return str(Path(path).relative_to(base))
    except ValueError:
        return path


# ----- report and command line --------------------------------------------------------------

def format_report(report: dict, limit: int = 5) -> str:
    """Readable text: counts, then each kind of problem with its first ``limit`` examples."""
    c = report["counts"]
    lines = [f"dataset {report['root']}",
             f"  train metadata: {report['train_metadata']}",
             f"  test metadata:  {report['test_metadata'] or 'none found'}",
             f"  {c['train_images']} training images, {c['categories']} categories, {c['genera']} genera, "
             f"{c['families']} families; {c['test_images']} test images; {c['files_checked']} files checked"]
    for kind, heading in PROBLEMS.items():
        found = report["problems"][kind]
        if not found:
            continue
        lines.append(f"{heading} [{kind}]: {len(found)}")
        lines.extend(f"    {item}" for item in found[:limit])
        if len(found) > limit:
            lines.append(f"    ... and {len(found) - limit} more")
    lines.append("OK: no problems found" if report["ok"] else
                 f"PROBLEMS: {sum(1 for v in report['problems'].values() if v)} kind(s) found")
    return "\n".join(lines)
