"""The preflight's look at the image files a run will read: every listed file is stat-ed (seconds
on a million images) and a bounded sample is decoded (the first, a seeded random few hundred and
every suspiciously small file), so a missing or truncated image stops the run before its first
epoch instead of inside it or after it. ``herbens check`` remains the full decode.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from herbens.data.dataset import BadImageWarning, load_rgb
from herbens.core.errors import HerbensError

SAMPLE = 300  # random files decoded per split, beyond the first and the small ones
SMALL_BYTES = 4096  # files under this are decoded whatever the sample: truncated downloads are small
_DECODE = (32, 32)  # reduced-scale decoding still reads (and checks) the whole file
_SHOWN = 3


def file_problems(paths: list[str], max_pixels: int | None, min_side: int | None, seed: int = 0,
                  sample: int = SAMPLE) -> list[str]:
    """``"PATH: reason"`` for every listed file that is missing or empty, and for every sampled
    file that does not decode (or is over/under the size limits)."""
    problems, sizes = [], np.zeros(len(paths), dtype=np.int64)
    for i, path in enumerate(paths):
        try:
            sizes[i] = os.stat(path).st_size
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
            sizes[i] = -1
            continue
        if sizes[i] == 0:
            problems.append(f"{path}: empty file")
    for i in _sampled(sizes, seed, sample):
        try:
            load_rgb(paths[i], _DECODE, max_pixels=max_pixels, min_side=min_side).close()
        except HerbensError as exc:
            problems.append(str(exc))
    return problems


def _sampled(sizes: np.ndarray, seed: int, sample: int) -> list[int]:
    """Rows to decode: the first, ``sample`` seeded random ones and the small ones (readable size)."""
    n = len(sizes)
    if n == 0:
        return []
    chosen = {0, *np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False).tolist()}
    chosen |= set(np.flatnonzero((sizes > 0) & (sizes < SMALL_BYTES)).tolist())
    return sorted(i for i in chosen if sizes[i] > 0)


def check_split_files(frame, images_dir: Path, split: str, stop: bool, max_pixels: int | None,
                      min_side: int | None, seed: int = 0) -> list[str]:
    """Look at a split's files (:func:`file_problems`): a HerbensError listing the first ones when
    ``stop`` (the split's bad-image policy stops on them), else one BadImageWarning; returns them."""
    paths = [os.path.join(images_dir, name) for name in frame["file_name"].astype(str)]
    problems = file_problems(paths, max_pixels, min_side, seed)
    if problems:
        more = problems[1:_SHOWN]
        message = (f"{split} image {problems[0]}" + (f" (and {len(problems) - 1} more: {'; '.join(more)}"
                                                       + ("; ..." if len(problems) > _SHOWN else "") + ")" if more else "")
                   + ", found before training")
        if stop:
            raise HerbensError(message + " (fix them, or set data.bad_images=skip; herbens check decodes every file)")
        warnings.warn(message + " (data.bad_images=skip: handled as unreadable)", BadImageWarning, stacklevel=2)
    return problems
