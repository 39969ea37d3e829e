"""The logits store: the contract between a trained run and the ensembler.

A run's inference writes, per split, ``runs/<name>/logits/<split>/``:

- ``<level>.npy``: float16 scores, rows = images, columns = the taxonomy's class order;
- ``<level>.views.npy`` (optional): float16 per-view scores ``[N, V, C]`` (test-time
  augmentation views), kept for analysis and vote-mode ensembling;
- ``image_ids.json``: the row order (list of str);
- ``labels.npy`` (optional): int64 species index per row, -1 where unknown (test);
- ``meta.json``: ``{"taxonomy_hash", "levels": {level: [rows, cols]}, "dtype": "float16",
  "views": [...], "model", "split", "format_version": 1, "ids": {"count", "sha256"},
  "unreadable": {"ids": [...], "fallback": "prior"}, ...}``.

``ids`` records, at write time, how many images the split was written for and a hash of their
ids (the test metadata's, for ``test``): a store that later lost or gained rows is refused.
``unreadable`` lists the images that could not be decoded; their rows hold the documented
fallback (``prior``: the training log-prior of each level), never another image's scores.

Matrices reach 6.5 GB (210,407 x 15,501 x 2 bytes), so they are written block by block and read
memory-mapped; the reader checks everything that is cheap (meta, shapes, sizes, ids and their
recorded hash, dtype, levels, labels, the unreadable-rows record) and every consumer passes each
block of values it reads through :func:`check_finite`.
The directory is assembled under a temporary name and renamed into place (``atomic_dir``),
so a crash never leaves a half directory that a reader accepts.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import numpy as np

from herbens.data.taxonomy import LEVELS
from herbens.errors import HerbensError
from herbens.fileio import atomic_dir, read_json, write_json

if TYPE_CHECKING:
    from herbens.data.taxonomy import Taxonomy

FORMAT_VERSION = 1
DTYPE = np.dtype(np.float16)
_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_LIMIT = 65520.0  # the smallest magnitude that rounds to inf in float16


#: Fallbacks for the rows of unreadable images (``infer.bad_images``): ``prior`` writes each
#: level's training log-prior (softmax = the class frequencies, argmax = the most frequent class).
UNREADABLE_FALLBACKS = ("prior",)


class LogitsRecordWarning(UserWarning):
    """A logits store's record says something every consumer must pass on to the user."""


class UnreadableRowsWarning(LogitsRecordWarning):
    """A logits split holds fallback rows for images that could not be decoded."""


def logits_dir(run_dir: str | os.PathLike, split: str) -> Path:
    """Directory holding one split's logits inside a run directory."""
    return Path(run_dir) / "logits" / split


def ids_digest(image_ids: Sequence[str]) -> str:
    """Order-independent hash (sha256, first 16 hex) of a set of image ids."""
    text = "\n".join(sorted(str(i) for i in image_ids))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_finite(block: np.ndarray, where: str, what: str, row_ids: Sequence[str]) -> np.ndarray:
    """Refuse a block of scores holding NaN or inf; returns ``block`` unchanged.

    Args:
        block: ``[n, C]`` scores read from a store (float32).
        where: how the store is named in the message (``LogitsSplit.where``).
        what: which matrix (``species``, ``species view 2``, ...).
        row_ids: the image id of each row of ``block``.

    Raises:
        HerbensError: naming the store, the matrix, the number of bad rows in the block and the
            first image id.
    """
    # A row sum is finite iff every value is (float16 values cannot overflow a float32 sum),
    # and costs one pass instead of a boolean matrix.
    finite = np.isfinite(block.reshape(len(block), -1).sum(axis=1))
    if not finite.all():
        first = row_ids[int(np.argmin(finite))]
        raise HerbensError(f"{where}: {what} logits are not finite in {int((~finite).sum())} row(s) "
                           f"(NaN or inf; first at image id {first!r})")
    return block


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------
class LogitsSplit:
    """One split's logits, checked and (by default) memory-mapped.

    Attributes:
        run_dir: the run directory it was read from.
        split: split name (``val``, ``test``, ...).
        path: the ``logits/<split>`` directory.
        image_ids: row order, list of str (unique).
        meta: the parsed ``meta.json``.
        labels: int64 species index per row (-1 unknown), or None when not stored.
        unreadable: ids of the rows whose image could not be decoded (they hold the fallback
            named by ``meta["unreadable"]["fallback"]``), in row order; empty when none.
    """

    def __init__(self, run_dir: Path, split: str, path: Path, image_ids: list[str], meta: dict,
                 arrays: dict[str, np.ndarray], views: dict[str, np.ndarray],
                 labels: np.ndarray | None):
        self.run_dir = run_dir
        self.split = split
        self.path = path
        self.image_ids = image_ids
        self.meta = meta
        self.labels = labels
        self.unreadable: list[str] = list(meta.get("unreadable", {}).get("ids", []))
        self._arrays = arrays
        self._views = views

    @property
    def levels(self) -> tuple[str, ...]:
        """Levels stored, in LEVELS order."""
        return tuple(level for level in LEVELS if level in self._arrays)

    @property
    def num_rows(self) -> int:
        return len(self.image_ids)

    @property
    def where(self) -> str:
        """How error messages name this split: the run and the split."""
        return f"run '{self.run_dir}', split '{self.split}'"

    def level(self, name: str) -> np.ndarray:
        """float16 matrix ``[N, C_level]`` (memory-mapped unless read with mmap=False)."""
        if name not in self._arrays:
            raise HerbensError(f"{self.where}: no '{name}' logits (stored: {', '.join(self.levels)})")
        return self._arrays[name]

    def unreadable_mask(self) -> np.ndarray:
        """Boolean per row: True where the image was unreadable (a fallback row)."""
        bad = set(self.unreadable)
        return np.fromiter((i in bad for i in self.image_ids), dtype=bool, count=self.num_rows)

    def warn_unreadable(self) -> None:
        """Warn (:class:`UnreadableRowsWarning`) with the count and ids of fallback rows, if any."""
        if self.unreadable:
            fallback = self.meta["unreadable"].get("fallback", "?")
            warnings.warn(f"{self.where}: {len(self.unreadable)} image(s) were unreadable at inference; "
                          f"their rows hold the '{fallback}' fallback, not a prediction: "
                          f"{format_ids(self.unreadable)}", UnreadableRowsWarning, stacklevel=2)

    def has_views(self, name: str) -> bool:
        """Whether per-view logits were kept for ``name``."""
        return name in self._views

    def views(self, name: str) -> np.ndarray:
        """float16 per-view array ``[N, V, C_level]``; HerbensError when not kept."""
        if name not in self._views:
            raise HerbensError(f"{self.where}: no per-view '{name}' logits "
                               "(write them with keep_views=True)")
        return self._views[name]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{lv}={tuple(self._arrays[lv].shape)}" for lv in self.levels)
        return f"LogitsSplit({self.where}, {shapes})"


def read_logits(run_dir: str | os.PathLike, split: str, mmap: bool = True, *,
                taxonomy: "Taxonomy | None" = None) -> LogitsSplit:
    """Open and check one split's logits.

    Args:
        run_dir: run directory (``runs/<name>``).
        split: split name, e.g. ``"val"`` or ``"test"``.
        mmap: memory-map the matrices (default); False reads them into memory.
        taxonomy: when given, the stored taxonomy hash and column counts must match it.

    Returns:
        The checked LogitsSplit. Values are not checked for finiteness here (that would
        read gigabytes): pass each block read through :func:`check_finite`.

    Raises:
        HerbensError: naming the run, the split and the problem (missing or half-written
            directory, bad meta, wrong shapes, truncated file, duplicate ids, rows lost or
            added since writing, a bad unreadable-rows record, another taxonomy, ...).
    """
    run_dir = Path(run_dir)
    path = logits_dir(run_dir, split)
    where = f"run '{run_dir}', split '{split}'"
    if not path.is_dir():
        raise HerbensError(f"{where}: no logits directory {path}")
    meta = _read_meta(path, where, split)
    image_ids = _read_ids(path, where)
    arrays, views = {}, {}
    for level, shape in meta["levels"].items():
        arrays[level] = _open_npy(path / f"{level}.npy", tuple(shape), len(image_ids), where, mmap)
    for level, shape in meta.get("view_levels", {}).items():
        views[level] = _open_npy(path / f"{level}.views.npy", tuple(shape), len(image_ids), where, mmap)
        if views[level].shape[2] != arrays[level].shape[1]:
            raise HerbensError(f"{where}: {level}.views.npy has {views[level].shape[2]} columns "
                               f"but {level}.npy has {arrays[level].shape[1]}")
    labels = _read_labels(path, meta, len(image_ids), arrays["species"].shape[1], where)
    _check_ids_record(meta, image_ids, where)
    _check_unreadable_record(meta, image_ids, where)
    if taxonomy is not None:
        _check_taxonomy(meta, arrays, taxonomy, where)
    return LogitsSplit(run_dir, split, path, image_ids, meta, arrays, views, labels)


def read_store_meta(path: Path, where: str, split: str, required: Sequence[str], format_version: int,
                    kind: str | None = None, dtype: np.dtype | None = DTYPE) -> dict:
    """The checked ``meta.json`` of a store directory (logits, embeddings, sparse targets).

    Args:
        required: keys that must be present (besides ``format_version`` and ``split``).
        kind: the store's ``kind`` value, when it records one.
        dtype: the matrices' dtype the meta must name (None: not checked).
    """
    meta_path = path / "meta.json"
    what = f"a {kind or 'logits'} directory"
    if not meta_path.exists():
        raise HerbensError(f"{where}: {meta_path} is missing (half-written or not {what})")
    try:
        meta = read_json(meta_path)
    except HerbensError as exc:
        raise HerbensError(f"{where}: {exc}") from None
    if not isinstance(meta, dict):
        raise HerbensError(f"{where}: {meta_path} is not a JSON object")
    missing = [k for k in ("format_version", *(("kind",) if kind else ()), *required, "split") if k not in meta]
    if missing:
        raise HerbensError(f"{where}: {meta_path} lacks {', '.join(missing)}")
    if kind and meta["kind"] != kind:
        raise HerbensError(f"{where}: meta.json kind is {meta['kind']!r}, not {kind!r}")
    if meta["format_version"] != format_version:
        raise HerbensError(f"{where}: format_version {meta['format_version']!r} is not supported "
                           f"(this herbens reads {format_version})")
    if dtype is not None and meta.get("dtype") != np.dtype(dtype).name:
        raise HerbensError(f"{where}: dtype {meta.get('dtype')!r}; expected {np.dtype(dtype).name}")
    if meta["split"] != split:
        raise HerbensError(f"{where}: meta.json says split {meta['split']!r} (directory renamed?)")
    return meta


def _read_meta(path: Path, where: str, split: str) -> dict:
    meta = read_store_meta(path, where, split, ("taxonomy_hash", "levels", "dtype"), FORMAT_VERSION)
    _check_level_shapes(meta, "levels", 2, where)
    _check_level_shapes(meta, "view_levels", 3, where)
    if "species" not in meta["levels"]:
        raise HerbensError(f"{where}: no species logits (levels: {', '.join(meta['levels'])})")
    return meta


def _check_level_shapes(meta: dict, key: str, ndim: int, where: str) -> None:
    shapes = meta.get(key, {})
    if not isinstance(shapes, dict):
        raise HerbensError(f"{where}: meta.json '{key}' must map level -> shape")
    for level, shape in shapes.items():
        if level not in LEVELS:
            raise HerbensError(f"{where}: unknown level {level!r} in meta.json; expected {', '.join(LEVELS)}")
        if (not isinstance(shape, list) or len(shape) != ndim
                or not all(isinstance(s, int) and s >= 0 for s in shape)):
            raise HerbensError(f"{where}: meta.json {key}.{level} = {shape!r} is not a {ndim}-d shape")
    if key == "view_levels" and not set(shapes) <= set(meta["levels"]):
        raise HerbensError(f"{where}: per-view logits for levels without logits: "
                           f"{sorted(set(shapes) - set(meta['levels']))}")


def _read_ids(path: Path, where: str) -> list[str]:
    try:
        ids = read_json(path / "image_ids.json")
    except HerbensError as exc:
        raise HerbensError(f"{where}: {exc}") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise HerbensError(f"{where}: image_ids.json must be a list of strings")
    if len(set(ids)) != len(ids):
        raise HerbensError(f"{where}: duplicate image ids in image_ids.json: {_duplicates(ids)}")
    return ids


def _check_ids_record(meta: dict, image_ids: list[str], where: str) -> None:
    """The ids must still be those the split was written for (count and hash)."""
    record = meta.get("ids")
    if record is None:
        return  # written before the record existed: nothing to compare with
    if not isinstance(record, dict) or not isinstance(record.get("count"), int) \
            or not isinstance(record.get("sha256"), str):
        raise HerbensError(f"{where}: meta.json 'ids' must be {{\"count\": int, \"sha256\": str}}")
    if len(image_ids) != record["count"]:
        raise HerbensError(f"{where}: holds {len(image_ids)} of the {record['count']} images it was "
                           f"written for (rows lost or added since): rerun `herbens infer`")
    if ids_digest(image_ids) != record["sha256"]:
        raise HerbensError(f"{where}: its image ids are not those it was written for (hash "
                           f"{ids_digest(image_ids)}, recorded {record['sha256']}): rerun `herbens infer`")


def _check_unreadable_record(meta: dict, image_ids: list[str], where: str) -> None:
    record = meta.get("unreadable")
    if record is None:
        return
    ids = record.get("ids") if isinstance(record, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) \
            or record.get("fallback") not in UNREADABLE_FALLBACKS:
        raise HerbensError(f"{where}: meta.json 'unreadable' must be {{\"ids\": [str], \"fallback\": "
                           f"{' | '.join(UNREADABLE_FALLBACKS)}}}")
    unknown = sorted(set(ids) - set(image_ids))
    if unknown or len(set(ids)) != len(ids):
        raise HerbensError(f"{where}: meta.json lists unreadable ids that are not (once) among its rows: "
                           f"{format_ids(unknown or ids)}")


def format_ids(ids: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` ids for a message, with the total when there are more."""
    shown = ", ".join(repr(i) for i in list(ids)[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


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


def _open_npy(file: Path, shape: tuple[int, ...], rows: int, where: str, mmap: bool,
              expected_dtype: np.dtype = DTYPE) -> np.ndarray:
    got_shape, dtype, fortran, offset = _npy_header(file, where)
    if got_shape != shape:
        raise HerbensError(f"{where}: {file.name} has shape {got_shape} but meta.json says {shape}")
    if shape[0] != rows:
        raise HerbensError(f"{where}: {file.name} has {shape[0]} rows for {rows} image ids")
    if dtype != expected_dtype:
        raise HerbensError(f"{where}: {file.name} is {dtype}; expected {np.dtype(expected_dtype).name}")
    if fortran:
        raise HerbensError(f"{where}: {file.name} is Fortran-ordered; rows must be contiguous")
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    size = file.stat().st_size
    if size != expected:
        raise HerbensError(f"{where}: {file.name} is {size} bytes, expected {expected} "
                           f"({'truncated' if size < expected else 'trailing data'})")
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)  # numpy cannot memory-map an empty array
    return np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)


def _read_labels(path: Path, meta: dict, rows: int, num_species: int, where: str) -> np.ndarray | None:
    file = path / "labels.npy"
    if not meta.get("labels", False):
        return None
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


def _check_taxonomy(meta: dict, arrays: dict[str, np.ndarray], taxonomy: "Taxonomy", where: str) -> None:
    if meta["taxonomy_hash"] != taxonomy.hash:
        raise HerbensError(f"{where}: logits were written for taxonomy {meta['taxonomy_hash']} "
                           f"but the run's taxonomy.json is {taxonomy.hash}")
    for level, arr in arrays.items():
        if arr.shape[1] != taxonomy.num_classes(level):
            raise HerbensError(f"{where}: {level}.npy has {arr.shape[1]} columns; the taxonomy has "
                               f"{taxonomy.num_classes(level)} {level} classes")


def _duplicates(ids: Sequence[str], limit: int = 5) -> str:
    seen, dups = set(), []
    for i in ids:
        if i in seen and i not in dups:
            dups.append(i)
            if len(dups) == limit:
                break
        seen.add(i)
    return ", ".join(repr(d) for d in dups)


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
class _NpyFile:
    """A ``.npy`` file of fixed shape and dtype (float16 by default), filled by plain positioned writes.

    Plain writes rather than a writable memory map: written pages then belong to the page
    cache, not to the writer's resident memory, which stays at one block however big the file.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype = DTYPE):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
            self.offset = handle.tell()
            handle.truncate(self.offset + self.row_bytes * shape[0])  # full size (sparse until written)
        self.handle = open(path, "r+b")

    def write_rows(self, start: int, block: np.ndarray) -> None:
        self.handle.seek(self.offset + start * self.row_bytes)
        self.handle.write(np.ascontiguousarray(block, dtype=self.dtype).data)

    def close(self, sync: bool) -> None:
        if self.handle.closed:
            return
        if sync:
            self.handle.flush()
            os.fsync(self.handle.fileno())
        self.handle.close()


class BlockWriter:
    """Files filled block by block, with a record of the rows each has received.

    Subclasses create ``self._files`` (name -> :class:`_NpyFile`) and ``self._written`` (key ->
    bool per row) and mark rows as they write them; a store is published only when every key's
    rows were all written, so a forgotten batch cannot publish zeros.
    """

    _where: str
    _files: dict
    _written: dict

    def _finish(self) -> None:
        for key, done in self._written.items():
            if not done.all():
                raise HerbensError(f"{self._where}: {key} rows were never written "
                                   f"(first missing row {int(np.argmin(done))})")
        self._close(sync=True)

    def _close(self, sync: bool) -> None:
        for file in self._files.values():
            file.close(sync)


class LogitsWriter(BlockWriter):
    """Fills one split's matrices block by block inside a temporary directory.

    Obtained from :func:`open_logits_writer`; inference writes each batch as it comes so that
    the full matrix never has to sit in memory.
    """

    def __init__(self, tmp: Path, where: str, num_rows: int, columns: Mapping[str, int],
                 num_views: int, view_levels: Sequence[str]):
        self._where = where
        self.num_rows = num_rows
        self._files: dict[str, _NpyFile] = {}
        try:
            for lv, c in columns.items():
                self._files[lv] = _NpyFile(tmp / f"{lv}.npy", (num_rows, c))
            for lv in view_levels:
                self._files[f"{lv}.views"] = _NpyFile(tmp / f"{lv}.views.npy", (num_rows, num_views, columns[lv]))
        except OSError as exc:
            self._close(sync=False)
            raise HerbensError(f"{where}: cannot create logits files in {tmp}: {exc.strerror or exc}") from exc
        # Which rows were written, so that a forgotten batch cannot publish zeros.
        self._written = {key: np.zeros(num_rows, bool) for key in self._files}
        self.unreadable_rows: set[int] = set()
        self.fallback: str | None = None

    def mark_unreadable(self, rows: Sequence[int], fallback: str) -> None:
        """Record that ``rows`` hold ``fallback`` scores because their images were unreadable.

        The record goes into ``meta.json`` (``unreadable``), which every reader reports.
        """
        if fallback not in UNREADABLE_FALLBACKS:
            raise HerbensError(f"{self._where}: unknown fallback {fallback!r}; "
                               f"expected {', '.join(UNREADABLE_FALLBACKS)}")
        self.unreadable_rows.update(int(r) for r in rows)
        self.fallback = fallback

    def write(self, level: str, start: int, block: np.ndarray) -> None:
        """Store rows ``start:start+len(block)`` of ``level`` (``block`` is ``[n, C]``)."""
        self._put(level, start, block)

    def write_views(self, level: str, start: int, block: np.ndarray) -> None:
        """Store per-view rows (``block`` is ``[n, V, C]``) of ``level``."""
        self._put(f"{level}.views", start, block)

    def _put(self, key: str, start: int, block: np.ndarray) -> None:
        if key not in self._files:
            raise HerbensError(f"{self._where}: no '{key}' matrix was declared for this writer")
        target = self._files[key]
        block = np.asarray(block)
        if block.shape[1:] != target.shape[1:] or start < 0 or start + len(block) > self.num_rows:
            raise HerbensError(f"{self._where}: {key} block of shape {block.shape} at row {start} "
                               f"does not fit the {target.shape} matrix")
        # float16 overflows from 65520 up: refuse rather than store inf that poisons the ensemble.
        # Checked on the input (one max per row) because float16 arithmetic is slow in numpy.
        with np.errstate(invalid="ignore"):
            row_max = np.abs(block.reshape(len(block), -1)).max(axis=1, initial=0)
            fits = row_max.astype(np.float64) < _FP16_LIMIT  # float64: the limit itself is inf in float16
        if not fits.all():
            raise HerbensError(f"{self._where}: {key} row {start + int(np.argmin(fits))} is not finite in "
                               f"float16 (NaN, inf or |value| > {_FP16_MAX:g})")
        try:
            target.write_rows(start, block)
        except OSError as exc:
            raise HerbensError(f"{self._where}: cannot write {target.path}: {exc.strerror or exc}") from exc
        self._written[key][start:start + len(block)] = True


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


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_logits_writer(run_dir: str | os.PathLike, split: str, image_ids: Sequence, columns: Mapping[str, int],
                       meta: Mapping, *, labels: np.ndarray | None = None, num_views: int = 0,
                       view_levels: Sequence[str] = ()) -> Iterator[LogitsWriter]:
    """Context manager yielding a :class:`LogitsWriter`; the split appears only on success.

    Args:
        run_dir: run directory.
        split: split name.
        image_ids: row order (converted to str; must be unique).
        columns: level -> number of classes (``species`` required).
        meta: caller's metadata; must hold ``taxonomy_hash``; may hold ``model``, ``views``.
        labels: optional species index per row (-1 unknown), stored as ``labels.npy``.
        num_views: V for per-view matrices (with ``view_levels``).
        view_levels: levels whose per-view ``[N, V, C]`` matrices will be written.

    Raises:
        HerbensError: on bad arguments, a block that does not fit, non-finite values, rows
            never written. Nothing is published then, and an older complete split is kept.
    """
    where = f"run '{run_dir}', split '{split}'"
    ids = [str(i) for i in image_ids]
    full_meta = _build_meta(meta, split, ids, columns, num_views, view_levels, labels is not None, where)
    label_array = _check_labels(labels, len(ids), columns["species"], where)
    with atomic_dir(logits_dir(run_dir, split)) as tmp:
        writer = LogitsWriter(tmp, where, len(ids), columns, num_views, view_levels)
        try:
            yield writer
            writer._finish()
        finally:
            writer._close(sync=False)
        write_json(tmp / "image_ids.json", ids)
        if writer.unreadable_rows:
            full_meta["unreadable"] = {"ids": [ids[r] for r in sorted(writer.unreadable_rows)],
                                       "fallback": writer.fallback}
        if label_array is not None:
            np.save(tmp / "labels.npy", label_array)
            _fsync(tmp / "labels.npy")
        # meta.json last: its presence marks a complete directory even to a careless reader.
        write_json(tmp / "meta.json", full_meta)


def _build_meta(meta: Mapping, split: str, ids: list[str], columns: Mapping[str, int], num_views: int,
                view_levels: Sequence[str], has_labels: bool, where: str) -> dict:
    if not isinstance(meta, Mapping) or not isinstance(meta.get("taxonomy_hash"), str):
        raise HerbensError(f"{where}: meta must be a dict with a 'taxonomy_hash' string")
    if "species" not in columns:
        raise HerbensError(f"{where}: species logits are required")
    unknown = [lv for lv in (*columns, *view_levels) if lv not in LEVELS]
    if unknown:
        raise HerbensError(f"{where}: unknown level(s) {unknown}; expected {', '.join(LEVELS)}")
    if len(set(ids)) != len(ids):
        raise HerbensError(f"{where}: duplicate image ids: {_duplicates(ids)}")
    if view_levels and num_views < 1:
        raise HerbensError(f"{where}: view_levels given without num_views")
    if not set(view_levels) <= set(columns):
        raise HerbensError(f"{where}: per-view levels {list(view_levels)} must also have logits")
    views = list(meta.get("views") or [])
    if view_levels and views and len(views) != num_views:
        raise HerbensError(f"{where}: meta lists {len(views)} views but the logits have {num_views}")
    out = {k: v for k, v in meta.items() if k != "unreadable"}  # recorded by the writer only
    out.update({
        "format_version": FORMAT_VERSION,
        "split": split,
        "dtype": DTYPE.name,
        "model": str(meta.get("model", "")),
        "views": views or ([f"view{v}" for v in range(num_views)] if num_views else []),
        "num_rows": len(ids),
        "ids": {"count": len(ids), "sha256": ids_digest(ids)},
        "levels": {lv: [len(ids), int(columns[lv])] for lv in LEVELS if lv in columns},
        "labels": has_labels,
    })
    if view_levels:
        out["view_levels"] = {lv: [len(ids), num_views, int(columns[lv])] for lv in LEVELS if lv in view_levels}
    else:
        out.pop("view_levels", None)
    return out


def _check_labels(labels, rows: int, num_species: int, where: str) -> np.ndarray | None:
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.shape != (rows,) or not np.issubdtype(arr.dtype, np.integer):
        raise HerbensError(f"{where}: labels must be {rows} integers, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64)
    if ((arr < -1) | (arr >= num_species)).any():
        raise HerbensError(f"{where}: labels must be species indices 0..{num_species - 1} or -1 (unknown)")
    return arr


def write_logits(run_dir: str | os.PathLike, split: str, image_ids: Sequence, logits: Mapping[str, np.ndarray],
                 meta: Mapping, *, labels: np.ndarray | None = None, keep_views: bool = False,
                 chunk_rows: int = 4096) -> Path:
    """Write one split's logits atomically (float16, block by block).

    Args:
        run_dir: run directory (``runs/<name>``).
        split: split name (``val``, ``test``).
        image_ids: row order (converted to str; must be unique).
        logits: level -> ``[N, C]`` scores, or ``[N, V, C]`` per-view scores, which are averaged
            over views (in float32) for ``<level>.npy``. Arrays may be memory-mapped.
        meta: must hold ``taxonomy_hash``; ``model`` and ``views`` (names) are recorded.
        labels: optional int species index per row (-1 unknown) -> ``labels.npy``; the
            ensembler fits its weights, temperatures and post-processing on labelled val rows.
        keep_views: with ``[N, V, C]`` inputs, also store ``<level>.views.npy``.
        chunk_rows: rows converted per block (bounds the writer's memory).

    Returns:
        The ``logits/<split>`` directory.
    """
    # np.asarray leaves memmaps and arrays untouched (no copy); lists become arrays.
    arrays = {lv: np.asarray(a) for lv, a in logits.items()}
    where = f"run '{run_dir}', split '{split}'"
    columns = {}
    for level, arr in arrays.items():
        if arr.ndim not in (2, 3) or arr.shape[0] != len(image_ids):
            raise HerbensError(f"{where}: {level} logits have shape {arr.shape}; expected "
                               f"[{len(image_ids)}, C] or [{len(image_ids)}, V, C]")
        columns[level] = arr.shape[-1]
    view_levels = [lv for lv, a in arrays.items() if a.ndim == 3] if keep_views else []
    num_views = {arrays[lv].shape[1] for lv in view_levels}
    if len(num_views) > 1:
        raise HerbensError(f"{where}: levels have different numbers of views {sorted(num_views)}")
    with open_logits_writer(run_dir, split, image_ids, columns, meta, labels=labels,
                            num_views=num_views.pop() if num_views else 0, view_levels=view_levels) as writer:
        for start in range(0, len(image_ids), max(1, chunk_rows)):
            for level, arr in arrays.items():
                block = arr[start:start + chunk_rows]
                if block.ndim == 3:
                    if level in view_levels:
                        writer.write_views(level, start, block)
                    block = block.astype(np.float32).mean(axis=1)
                writer.write(level, start, block)
    return logits_dir(run_dir, split)
