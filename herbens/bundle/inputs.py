"""What ``herbens predict`` and ``herbens enrol`` read: an image, a folder of images, or a list of paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pandas as pd

from herbens.core.errors import HerbensError


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}


LIST_SUFFIXES = {".csv", ".txt", ".lst"}


PATH_COLUMNS = ("path", "file", "file_name", "filename", "image")


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def collect_inputs(source: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image paths to predict, and ``(path, reason)`` for entries that are skipped.

    Raises:
        HerbensError: when ``source`` does not exist or yields no image at all.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
        paths = [str(p) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped = [(str(p), "not an image file (by its extension)") for p in files
                   if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not paths:
            raise HerbensError(f"{source}: no image files found (searched recursively for "
                               f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        return paths, skipped
    if source.is_file() and source.suffix.lower() in LIST_SUFFIXES:
        paths = _listed_paths(source)
        if not paths:
            raise HerbensError(f"{source}: the list names no image")
        return paths, []
    if source.is_file():
        return [str(source)], []
    raise HerbensError(f"input {source} does not exist")


def _listed_paths(listing: Path) -> list[str]:
    """Every path of a list file (:func:`iter_listed_paths`)."""
    return list(iter_listed_paths(listing))


def iter_listed_paths(listing: Path) -> Iterator[str]:
    """Paths from a CSV (its header names the path column) or a text file (one a line, ``#``
    comments), streamed: a list of millions of paths is never held whole. Relative paths are
    relative to the list's folder."""
    entries = _csv_entries(listing) if listing.suffix.lower() == ".csv" else _text_entries(listing)
    for entry in entries:
        entry = entry.strip()
        if entry and not entry.startswith("#"):
            yield entry if os.path.isabs(entry) else str(listing.parent / entry)


def _text_entries(listing: Path) -> Iterator[str]:
    with open(listing, encoding="utf-8") as handle:
        try:
            yield from handle
        except UnicodeDecodeError as exc:
            raise HerbensError(f"{listing}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                               "save the list as UTF-8") from None


def _csv_entries(listing: Path, chunk_rows: int = 65536) -> Iterator[str]:
    """The path column of a CSV list, in chunks. Its header must name it: without one the first
    path would be read as the header and silently dropped, so that is an error, not a guess."""
    try:
        for chunk in pd.read_csv(listing, dtype=str, keep_default_na=False, chunksize=chunk_rows):
            column = next((c for c in chunk.columns if c.strip().lower() in PATH_COLUMNS), None)
            if column is None:
                raise HerbensError(f"{listing}: a .csv list needs a header row naming its path column "
                                   f"({', '.join(PATH_COLUMNS)}); its first row is "
                                   f"{', '.join(map(str, chunk.columns))!r}. Add a header line such as 'path', "
                                   "or list the paths one a line in a .txt")
            yield from chunk[column].tolist()
    except pd.errors.EmptyDataError:
        return
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise HerbensError(f"{listing}: not a readable CSV ({exc})") from None
