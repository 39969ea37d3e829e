"""Writing a per-split store: its description, block-filled ``.npy`` files, atomic publication.

Matrices reach 6.5 GB (210,407 x 15,501 x 2 bytes), so they are filled block by block with
positioned writes and never held in memory; the folder appears (``atomic_dir``) only once
every row of every matrix was written, ``meta.json`` last.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Type, TypeVar

import numpy as np

from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_dir, save_npy, write_json
from herbens.stores.description import FORMAT_VERSION, StoreDescription
from herbens.stores.kernel import duplicates, ids_digest, validated

D = TypeVar("D", bound=StoreDescription)
_FP16_MAX = float(np.finfo(np.float16).max)
_FP16_LIMIT = 65520.0  # the smallest magnitude that rounds to inf in float16


def new_description(kind: Type[D], meta: Mapping, split: str, ids: list[str], where: str, **fields) -> D:
    """The description of a store about to be written for ``ids``.

    Args:
        kind: the description class.
        meta: the caller's record: must hold ``taxonomy_hash``; ``model``, ``views``,
            ``tta_space`` and any other key (a teacher's description, ...) are recorded.
        fields: the kind's own fields (shapes, ``labels``, ...).

    Raises:
        HerbensError: no taxonomy hash, duplicate ids, or a field the description refuses.
    """
    if not isinstance(meta, Mapping) or not isinstance(meta.get("taxonomy_hash"), str):
        raise HerbensError(f"{where}: meta must be a dict with a 'taxonomy_hash' string")
    if len(set(ids)) != len(ids):
        raise HerbensError(f"{where}: duplicate image ids: {duplicates(ids)}")
    record = {k: v for k, v in meta.items() if k != "unreadable"}  # recorded by the writer only
    record.update({"kind": kind.KIND, "format_version": FORMAT_VERSION, "split": split,
                   "model": str(meta.get("model", "")), "views": list(meta.get("views") or []),
                   "num_rows": len(ids), "ids": {"count": len(ids), "sha256": ids_digest(ids)}, **fields})
    if kind.DTYPE is not None:
        record["dtype"] = kind.DTYPE.name
    return validated(kind, record, where)


def check_labels(labels, rows: int, num_species: int, where: str) -> np.ndarray | None:
    """``labels`` as int64 species indices (-1 unknown), or None when none are given."""
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.shape != (rows,) or not np.issubdtype(arr.dtype, np.integer):
        raise HerbensError(f"{where}: labels must be {rows} integers, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.int64)
    if ((arr < -1) | (arr >= num_species)).any():
        raise HerbensError(f"{where}: labels must be species indices 0..{num_species - 1} or -1 (unknown)")
    return arr


class NpyFile:
    """A ``.npy`` file of fixed shape and dtype, filled by plain positioned writes.

    Plain writes rather than a writable memory map: written pages then belong to the page
    cache, not to the writer's resident memory, which stays at one block however big the file.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype):
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
    """The matrices of one store, filled block by block, with a record of the rows written.

    A store is published only when every matrix's rows were all written, so a forgotten batch
    cannot publish zeros.
    """

    def __init__(self, tmp: Path, where: str, num_rows: int, files: Mapping[str, tuple[tuple[int, ...], np.dtype]]):
        self._where, self.num_rows = where, num_rows
        self._files: dict[str, NpyFile] = {}
        try:
            for key, (shape, dtype) in files.items():
                self._files[key] = NpyFile(tmp / f"{key}.npy", shape, dtype)
        except OSError as exc:
            self.close(sync=False)
            raise HerbensError(f"{where}: cannot create the store's files in {tmp}: {exc.strerror or exc}") from exc
        self._written = {key: np.zeros(num_rows, bool) for key in self._files}

    def put(self, key: str, start: int, block: np.ndarray) -> None:
        """Store rows ``start:start+len(block)`` of matrix ``key``."""
        if key not in self._files:
            raise HerbensError(f"{self._where}: no '{key}' matrix was declared for this writer")
        target = self._files[key]
        block = np.asarray(block)
        if block.shape[1:] != target.shape[1:] or start < 0 or start + len(block) > self.num_rows:
            raise HerbensError(f"{self._where}: {key} block of shape {block.shape} at row {start} "
                               f"does not fit the {target.shape} matrix")
        if target.dtype == np.float16:
            _check_fits_float16(block, key, start, self._where)
        try:
            target.write_rows(start, block)
        except OSError as exc:
            raise HerbensError(f"{self._where}: cannot write {target.path}: {exc.strerror or exc}") from exc
        self._written[key][start:start + len(block)] = True

    def described(self, description: D) -> D:
        """The description to publish once every row is written (subclasses add records)."""
        return description

    def finish(self) -> None:
        """Refuse unless every row of every matrix was written; then sync the files."""
        for key, done in self._written.items():
            if not done.all():
                raise HerbensError(f"{self._where}: {key} rows were never written "
                                   f"(first missing row {int(np.argmin(done))})")
        self.close(sync=True)

    def close(self, sync: bool) -> None:
        for file in self._files.values():
            file.close(sync)


def _check_fits_float16(block: np.ndarray, key: str, start: int, where: str) -> None:
    # float16 overflows from 65520 up: refuse rather than store inf that poisons the ensemble.
    # Checked on the input (one max per row) because float16 arithmetic is slow in numpy.
    with np.errstate(invalid="ignore"):
        row_max = np.abs(block.reshape(len(block), -1)).max(axis=1, initial=0)
        fits = row_max.astype(np.float64) < _FP16_LIMIT  # float64: the limit itself is inf in float16
    if not fits.all():
        raise HerbensError(f"{where}: {key} row {start + int(np.argmin(fits))} is not finite in "
                           f"float16 (NaN, inf or |value| > {_FP16_MAX:g})")


@contextlib.contextmanager
def publish_store(path: Path, where: str, ids: Sequence[str], description: StoreDescription,
                  labels: np.ndarray | None = None, writer_class: type = BlockWriter,
                  **writer_args) -> Iterator[BlockWriter]:
    """Context manager yielding the store's :class:`BlockWriter`; the folder appears only on success.

    Args:
        path: the store folder (replaced atomically; an older complete store is kept on failure).
        where: how messages name the store.
        ids: row order (str, unique: checked by :func:`new_description`).
        description: from :func:`new_description`; it names the matrices to create.
        labels: checked species index per row (:func:`check_labels`) -> ``labels.npy``.
        writer_class, writer_args: a :class:`BlockWriter` subclass and its extra arguments.
    """
    with atomic_dir(path) as tmp:
        writer = writer_class(tmp, where, len(ids), description.arrays(len(ids)), **writer_args)
        try:
            yield writer
            writer.finish()
        finally:
            writer.close(sync=False)
        final = writer.described(description)
        write_json(tmp / "image_ids.json", list(ids))
        if labels is not None:
            save_npy(tmp / "labels.npy", labels)
        # meta.json last: its presence marks a complete directory even to a careless reader.
        write_json(tmp / "meta.json", final.as_meta())
