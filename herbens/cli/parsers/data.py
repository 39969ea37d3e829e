"""Parsers of the dataset verbs: ``synth``, ``check``, ``prepare``."""

from __future__ import annotations

import os

from herbens.cli.options import add_json_out, add_max_image_pixels, add_progress, add_workers

# herbens.data.prepare.JPEG_QUALITY
JPEG_QUALITY = 90


def add_synth(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="write a synthetic herbarium dataset (Kaggle 2022 layout)",
        description="Write a synthetic, long-tailed herbarium dataset in the exact Kaggle "
                    "Herbarium 2022 layout, plus test_solution.csv with the true labels.")
    p.add_argument("out", help="dataset directory to write")
    p.add_argument("--species", type=int, default=40, help="number of species (default 40)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--long-edge", type=int, default=1000, help="image height in pixels (default 1000)")
    p.add_argument("--min-images", type=int, default=3, help="training images of the rarest species (default 3)")
    p.add_argument("--max-images", type=int, default=80,
                   help="training images of the commonest species (default 80)")
    p.add_argument("--test-per-species", type=int, default=2, help="test images per species (default 2)")
    p.add_argument("--institutions", type=int, default=5, help="number of contributing herbaria (default 5)")
    p.add_argument("--difficulty", type=float, default=1.0,
                   help="scale of intra-class variation and noise (default 1.0)")
    add_workers(p, None, "drawing processes (default: all CPUs)")
    add_progress(p)


def add_check(subparsers) -> None:
    p = subparsers.add_parser(
        "check", help="check a dataset's metadata and image files",
        description="Check a dataset directory (Kaggle 2022, Kaggle 2021 or CSV metadata): duplicate or "
                    "unknown ids, empty classes, missing, corrupt and duplicate image files. "
                    "Exit status 0 when clean, 1 when problems were found.")
    p.add_argument("data_dir", metavar="DATA_DIR", help="dataset directory or training metadata file")
    add_workers(p, min(8, os.cpu_count() or 1), "processes that read and decode images (default: %(default)s)")
    p.add_argument("--show", type=int, default=5, metavar="K", help="examples listed per problem (default: 5)")
    add_json_out(p, "also write the full report as JSON")
    add_max_image_pixels(p, "report images with more pixels (width x height) as oversized, the limit that "
                            "training applies as data.max_image_pixels")
    add_progress(p)


def add_prepare(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="write a resized copy of a dataset once, for faster training",
        description="Write every train and test image with its long edge at most --size pixels "
                    "(JPEG quality 90, same relative paths) and copy the metadata, into OUT "
                    "(default: DATA_DIR/../<name>_<size>). Train on it with data.root=OUT. "
                    "Rerunning skips images already done. A size about 2x the training input "
                    "suits random crops down to half the image area (augment.scale 0.5); "
                    "smaller crops want more (2.4x at scale 0.35).")
    p.add_argument("data_dir", help="dataset directory (Kaggle 2022/2021 layout or CSV metadata)")
    p.add_argument("--size", type=int, required=True, help="long edge of the written images, in pixels")
    p.add_argument("--out", default=None, help="output directory (default: DATA_DIR/../<name>_<size>)")
    add_workers(p, None, "processes (default: all CPUs)")
    p.add_argument("--quality", type=int, default=JPEG_QUALITY, help="JPEG quality (default 90)")
    add_progress(p)


PARSERS = {"synth": add_synth, "check": add_check, "prepare": add_prepare}
