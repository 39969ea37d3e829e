"""Options several verbs share, spelled and explained once.

Parser modules import only this, argparse and the standard library: building every verb's parser
must not import torch, timm or the library (``herbens --help`` stays fast). Defaults that the
library also defines are repeated here as literals; tests/test_cli.py checks they agree.
"""

from __future__ import annotations

import argparse

# herbens.data.dataset.DEFAULT_MAX_IMAGE_PIXELS (PIL's own decompression-bomb limit)
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
# herbens.data.dataset.DEFAULT_MIN_IMAGE_SIDE (data.min_image_size's default)
DEFAULT_MIN_IMAGE_SIDE = 16


def add_progress(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: the one spelling of the switch; handlers read ``args.progress``."""
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (on a terminal) or progress lines (in a log)")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")


def add_batch_size(parser: argparse.ArgumentParser, default: int | None = 32) -> None:
    parser.add_argument("--batch-size", type=int, default=default, help="images per batch (default: %(default)s)")


def add_workers(parser: argparse.ArgumentParser, default: int | None = 0,
                help: str = "image decoding worker processes (default: %(default)s)") -> None:
    parser.add_argument("--workers", type=int, default=default, metavar="N", help=help)


def add_seed(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--seed", type=int, default=0, help=f"{help} (default: %(default)s)")


def add_recipe(parser: argparse.ArgumentParser, help: str = "recipe YAML file or shipped recipe name "
                                                              "(see `herbens recipes`)",
               example: str = "data.root=/data/h22 train.epochs=2") -> None:
    """The positional recipe and its ``key=value`` overrides."""
    parser.add_argument("recipe", help=help)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"recipe overrides, e.g. {example}")


def add_max_image_pixels(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                        help=f"{help} (default: %(default)s)")


def add_min_image_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-image-size", type=int, default=DEFAULT_MIN_IMAGE_SIDE, metavar="PX",
                        help="refuse images with a side under PX pixels as too small to be a specimen image, "
                             "listed with the unreadable ones; 0: no minimum (default: %(default)s)")


def add_json_out(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--json", metavar="PATH", help=help)
