"""The kernel every per-split store is built on: one reader check, one block writer.

A store is a folder ``<run>/<kind folder>/<split>/`` holding ``.npy`` matrices (rows = images),
``image_ids.json`` (the row order), an optional ``labels.npy`` (int64 species index per row, -1
unknown) and ``meta.json``, its :class:`~herbens.stores.description.StoreDescription`.

Reading (:func:`open_store`) checks everything that is cheap: the description (kind, format
version, split, dtype, shapes), the ids (unique, the count and digest recorded at write time),
the unreadable-rows record, each matrix's header and file size against the description, the
labels, and with ``taxonomy=`` the taxonomy hash and class counts. Values are not read: each
consumer passes the blocks it reads through :func:`check_finite` (or its own value check).

Writing (:func:`publish_store`) fills fixed-size ``.npy`` files block by block inside a
temporary folder that is renamed into place (``atomic_dir``) only once every row of every
matrix was written; ``meta.json`` is written last, so a crash never leaves a folder a reader
accepts.
"""

from __future__ import annotations

import hashlib
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Type, TypeVar

import numpy as np
from pydantic import ValidationError

from herbens.core.errors import HerbensError
from herbens.core.fileio import read_json
from herbens.stores.description import FORMAT_VERSION, StoreDescription

D = TypeVar("D", bound=StoreDescription)


# ----------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------
def ids_digest(image_ids: Sequence[str]) -> str:
    """Order-independent hash (sha256, first 16 hex) of a set of image ids."""
    text = "\n".join(sorted(str(i) for i in image_ids))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def duplicates(ids: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` ids that occur more than once, for a message."""
    seen, dups = set(), []
    for i in ids:
        if i in seen and i not in dups:
            dups.append(i)
            if len(dups) == limit:
                break
        seen.add(i)
    return ", ".join(repr(d) for d in dups)


def format_ids(ids: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` ids for a message, with the total when there are more."""
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def check_finite(block: np.ndarray, where: str, what: str, row_ids: Sequence[str]) -> np.ndarray:
    """Refuse a block of scores holding NaN or inf; returns ``block`` unchanged.

    Raises:
        HerbensError: naming the store (``where``), the matrix (``what``), the number of bad
            rows in the block and the first image id (``row_ids``: the id of each row).
    """
    # A row sum is finite iff every value is (float16 values cannot overflow a float32 sum),
    # and costs one pass instead of a boolean matrix.
    finite = np.isfinite(block.reshape(len(block), -1).sum(axis=1))
    if not finite.all():
        first = row_ids[int(np.argmin(finite))]
        raise HerbensError(f"{where}: {what} logits are not finite in {int((~finite).sum())} row(s) "
                           f"(NaN or inf; first at image id {first!r})")
    return block


def release_pages(arr: np.ndarray) -> None:
    """Hand a memory-mapped array's resident pages back to the kernel.

    A memory-mapped file's pages count as this process's resident memory until unmapped;
    dropping them (clean, file-backed: the page cache keeps them) keeps RSS at one chunk.
    """
    handle = getattr(arr, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            handle.madvise(mmap.MADV_DONTNEED)
        except (ValueError, OSError):
            pass


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------
@dataclass
class StoreFiles:
    """An opened, checked store: its description, raw ``meta.json``, ids, matrices, labels."""

    path: Path
    description: StoreDescription
    meta: dict
    image_ids: list[str]
    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None


def open_store(path: Path, where: str, split: str, kind: Type[D], *, mmap: bool = True,
               taxonomy=None, absent: str = "") -> StoreFiles:
    """Open and check one store folder (see the module docstring for what is checked).

    Args:
        path: the store folder.
        where: how messages name the store (the run and the split).
        split: the split the folder must say it holds.
        kind: the description class of the store's kind.
        mmap: memory-map the matrices (default); False reads them into memory.
        taxonomy: when given, the stored taxonomy hash and class counts must match it, and
            labels must index its species.
        absent: appended to the message for a missing folder (how to write the store).
    """
    if not path.is_dir():
        raise HerbensError(f"{where}: no {kind.KIND} directory {path}{absent}")
    description, meta = read_description(path, where, split, kind)
    image_ids = read_ids(path, where)
    arrays = {stem: open_npy(path / f"{stem}.npy", shape, len(image_ids), where, mmap, dtype)
              for stem, (shape, dtype) in description.arrays(len(image_ids)).items()}
    check_ids_record(description, image_ids, where)
    check_unreadable_record(description, image_ids, where)
    if taxonomy is not None:
        check_taxonomy(description, taxonomy, where)
    bound = description.label_bound()
    if bound is None:
        bound = taxonomy.num_classes("species") if taxonomy is not None else np.iinfo(np.int64).max
    labels = read_labels(path, description, len(image_ids), bound, where)
    return StoreFiles(path, description, meta, image_ids, arrays, labels)


def read_description(path: Path, where: str, split: str, kind: Type[D]) -> tuple[D, dict]:
    """The checked description of a store folder, and its raw ``meta.json`` object.

    A ``meta.json`` without ``kind`` (written by an older herbens) is read as ``kind``'s.
    """
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise HerbensError(f"{where}: {meta_path} is missing (half-written or not a {kind.KIND} directory)")
    try:
        meta = read_json(meta_path)
    except HerbensError as exc:
        raise HerbensError(f"{where}: {exc}") from None
    if not isinstance(meta, dict):
        raise HerbensError(f"{where}: {meta_path} is not a JSON object")
    missing = [k for k in ("format_version", "taxonomy_hash", "split") if k not in meta]
    if missing:
        raise HerbensError(f"{where}: {meta_path} lacks {', '.join(missing)}")
    if meta.get("kind", kind.KIND) != kind.KIND:
        raise HerbensError(f"{where}: {meta_path} kind is {meta['kind']!r}, not {kind.KIND!r}")
    if meta["format_version"] != FORMAT_VERSION:
        raise HerbensError(f"{where}: {meta_path} format_version {meta['format_version']!r} is not supported "
                           f"(this herbens reads {FORMAT_VERSION}): rewrite the store with this herbens")
    if meta["split"] != split:
        raise HerbensError(f"{where}: meta.json says split {meta['split']!r} (directory renamed?)")
    description = validated(kind, {**meta, "kind": kind.KIND}, f"{where}: {meta_path}")
    if kind.DTYPE is not None and description.dtype != kind.DTYPE.name:
        raise HerbensError(f"{where}: {meta_path} dtype {description.dtype!r}; expected {kind.DTYPE.name}")
    return description, meta


def validated(kind: Type[D], fields: Mapping, where: str) -> D:
    """``kind`` built from ``fields``; HerbensError naming ``where`` and the first bad field."""
    try:
        return kind.model_validate(dict(fields))
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "description"
        message = first["msg"].removeprefix("Value error, ")
        raise HerbensError(f"{where}: {field}: {message}") from None


def read_ids(path: Path, where: str) -> list[str]:
    """``image_ids.json``: a list of unique strings."""
    try:
        ids = read_json(path / "image_ids.json")
    except HerbensError as exc:
        raise HerbensError(f"{where}: {exc}") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise HerbensError(f"{where}: image_ids.json must be a list of strings")
    if len(set(ids)) != len(ids):
        raise HerbensError(f"{where}: duplicate image ids in image_ids.json: {duplicates(ids)}")
    return ids


def check_ids_record(description: StoreDescription, image_ids: list[str], where: str) -> None:
    """The ids must still be those the store was written for (count and digest)."""
    record = description.ids
    if record is None:
        return  # written before the record existed: nothing to compare with
    if len(image_ids) != record.count:
        raise HerbensError(f"{where}: holds {len(image_ids)} of the {record.count} images it was "
                           f"written for (rows lost or added since): rerun `herbens infer`")
    if ids_digest(image_ids) != record.sha256:
        raise HerbensError(f"{where}: its image ids are not those it was written for (hash "
                           f"{ids_digest(image_ids)}, recorded {record.sha256}): rerun `herbens infer`")


def check_unreadable_record(description: StoreDescription, image_ids: list[str], where: str) -> None:
    """Every id the unreadable-rows record lists is (once) among the rows."""
    if description.unreadable is None:
        return
    ids = description.unreadable.ids
    unknown = sorted(set(ids) - set(image_ids))
    if unknown or len(set(ids)) != len(ids):
        raise HerbensError(f"{where}: meta.json lists unreadable ids that are not (once) among its rows: "
                           f"{format_ids(unknown or ids)}")


def check_taxonomy(description: StoreDescription, taxonomy, where: str) -> None:
    """The store's columns must follow ``taxonomy`` (hash and class count per level)."""
    if description.taxonomy_hash != taxonomy.hash:
        what = description.KIND.removeprefix("sparse_")
        raise HerbensError(f"{where}: {what} were written for taxonomy {description.taxonomy_hash} but the "
                           f"run's taxonomy.json is {taxonomy.hash} (another class order or data set)")
    for level, count in description.columns().items():
        if count != taxonomy.num_classes(level):
            raise HerbensError(f"{where}: {level} has {count} classes; the taxonomy has "
                               f"{taxonomy.num_classes(level)} {level} classes")


def _npy_header(file: Path, where: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Shape, dtype, Fortran order and data offset of a .npy file, without reading the data."""
    try:
        with open(file, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            return tuple(shape), np.dtype(dtype), fortran, handle.tell()
    except FileNotFoundError:
        raise HerbensError(f"{where}: {file} is missing") from None
    except (ValueError, OSError, SyntaxError) as exc:
        raise HerbensError(f"{where}: {file} is not a valid .npy file ({exc})") from None


def open_npy(file: Path, shape: tuple[int, ...], rows: int, where: str, mmap: bool,
             dtype: np.dtype) -> np.ndarray:
    """A matrix whose header and size match ``shape`` and ``dtype`` (memory-mapped with ``mmap``)."""
    got_shape, got_dtype, fortran, offset = _npy_header(file, where)
    if got_shape != shape:
        raise HerbensError(f"{where}: {file.name} has shape {got_shape} but meta.json says {shape}")
    if shape[0] != rows:
        raise HerbensError(f"{where}: {file.name} has {shape[0]} rows for {rows} image ids")
    if got_dtype != dtype:
        raise HerbensError(f"{where}: {file.name} is {got_dtype}; expected {np.dtype(dtype).name}")
    if fortran:
        raise HerbensError(f"{where}: {file.name} is Fortran-ordered; rows must be contiguous")
    expected = offset + int(np.prod(shape)) * got_dtype.itemsize
    size = file.stat().st_size
    if size != expected:
        raise HerbensError(f"{where}: {file.name} is {size} bytes, expected {expected} "
                           f"({'truncated' if size < expected else 'trailing data'})")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, got_dtype)  # numpy cannot memory-map an empty array
    return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)


def read_labels(path: Path, description: StoreDescription, rows: int, num_species: int,
                where: str) -> np.ndarray | None:
    """``labels.npy`` when the description announces it: int64 species indices or -1."""
    if not description.labels:
        return None
    file = path / "labels.npy"
    try:
        labels = np.load(file, allow_pickle=False)
    except FileNotFoundError:
        raise HerbensError(f"{where}: meta.json announces labels but {file} is missing") from None
    except (ValueError, OSError, EOFError) as exc:
        raise HerbensError(f"{where}: {file} is not a valid .npy file ({exc})") from None
    if labels.shape != (rows,) or labels.dtype != np.int64:
        raise HerbensError(f"{where}: labels.npy must be int64 of shape ({rows},), "
                           f"got {labels.dtype} {labels.shape}")
    bad = (labels < -1) | (labels >= num_species)
    if bad.any():
        raise HerbensError(f"{where}: labels.npy has species indices outside -1..{num_species - 1} "
                           f"(first at row {int(np.argmax(bad))}: {int(labels[bad][0])})")
    return labels
