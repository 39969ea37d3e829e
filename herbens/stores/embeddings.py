"""The embeddings store: L2-normalised image embeddings of a run, beside its logits.

A run's inference (``herbens infer RUN --embeddings``, or ``infer.embeddings: true``) writes,
per split, ``runs/<name>/embeddings/<split>/``:

- ``embeddings.npy``: float16 ``[N, D]``, every row of unit L2 norm (test-time views averaged
  and re-normalised);
- ``image_ids.json``: the row order (list of str);
- ``labels.npy`` (optional): int64 species index per row, -1 where unknown (test);
- ``meta.json``: ``{"kind": "embeddings", "taxonomy_hash", "shape": [N, D], "dtype": "float16",
  "normalised": true, "views", "model", "split", "format_version": 1, "labels"}``.

It follows the logits store (:mod:`herbens.logits`) and reuses its pieces: the block writer
(rows tracked, float16 overflow refused), the ``.npy`` header/size checks, the id and label
checks, and ``atomic_dir``. The reader checks what is cheap; :func:`iter_chunks` checks each
chunk's finiteness and norms as it streams, and hands its pages back to the kernel.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from herbens.errors import HerbensError
from herbens.fileio import atomic_dir, write_json
from herbens.stores.logits import DTYPE, FORMAT_VERSION, LogitsWriter, _check_labels, _duplicates, _fsync, _open_npy, _read_ids, _read_labels, read_store_meta, release_pages

KIND = "embeddings"
MATRIX = "embeddings"  # the writer's key, and the file's stem
SPLITS = ("train", "val", "test")
NORM_TOLERANCE = 2e-2  # float16 keeps ~3 decimal digits; a unit row's norm is within 1e-3 of 1


def embeddings_dir(run_dir: str | os.PathLike, split: str) -> Path:
    """Directory holding one split's embeddings inside a run directory."""
    return Path(run_dir) / "embeddings" / split


def l2_normalise(x: np.ndarray, where: str = "embeddings") -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm, as float32; a zero or non-finite row is an error."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    bad = ~np.isfinite(norms) | (norms <= 0)
    if bad.any():
        row = int(np.argmax(bad.reshape(len(x), -1).any(axis=1)))
        raise HerbensError(f"{where}: row {row} has a zero or non-finite norm; cannot normalise it")
    return x / norms


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------
class EmbeddingsSplit:
    """One split's embeddings, checked and (by default) memory-mapped.

    Attributes:
        run_dir, split, path: where it was read from.
        image_ids: row order (list of unique str).
        meta: the parsed ``meta.json``.
        labels: int64 species index per row (-1 unknown), or None.
        matrix: float16 ``[N, D]`` (memory-mapped unless read with ``mmap=False``).
    """

    def __init__(self, run_dir: Path, split: str, path: Path, image_ids: list[str], meta: dict,
                 matrix: np.ndarray, labels: np.ndarray | None):
        self.run_dir, self.split, self.path = run_dir, split, path
        self.image_ids, self.meta, self.matrix, self.labels = image_ids, meta, matrix, labels

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def where(self) -> str:
        return f"run '{self.run_dir}', embeddings split '{self.split}'"

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"EmbeddingsSplit({self.where}, {tuple(self.matrix.shape)})"


def read_embeddings(run_dir: str | os.PathLike, split: str, mmap: bool = True, *,
                    taxonomy_hash: str | None = None, num_species: int | None = None) -> EmbeddingsSplit:
    """Open and check one split's embeddings.

    Args:
        run_dir: run directory.
        split: ``train``, ``val`` or ``test``.
        mmap: memory-map the matrix (default).
        taxonomy_hash: when given, the stored hash must equal it.
        num_species: bound for the stored labels (default: no bound beyond >= -1).

    Raises:
        HerbensError: naming the run, the split and the problem.
    """
    run_dir = Path(run_dir)
    path = embeddings_dir(run_dir, split)
    where = f"run '{run_dir}', embeddings split '{split}'"
    if not path.is_dir():
        raise HerbensError(f"{where}: no embeddings directory {path} (write it with herbens infer RUN --embeddings)")
    meta = _read_meta(path, where, split)
    ids = _read_ids(path, where)
    matrix = _open_npy(path / f"{MATRIX}.npy", tuple(meta["shape"]), len(ids), where, mmap)
    labels = _read_labels(path, meta, len(ids), np.iinfo(np.int64).max if num_species is None else num_species,
                          where)
    if taxonomy_hash is not None and meta["taxonomy_hash"] != taxonomy_hash:
        raise HerbensError(f"{where}: embeddings were written for taxonomy {meta['taxonomy_hash']} "
                           f"but the run's taxonomy.json is {taxonomy_hash}")
    return EmbeddingsSplit(run_dir, split, path, ids, meta, matrix, labels)


def _read_meta(path: Path, where: str, split: str) -> dict:
    meta = read_store_meta(path, where, split, ("taxonomy_hash", "shape", "dtype"), FORMAT_VERSION, kind=KIND)
    shape = meta["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)
            and shape[1] > 0):
        raise HerbensError(f"{where}: meta.json shape {shape!r} is not [rows, dim > 0]")
    return meta


def iter_chunks(split: EmbeddingsSplit, chunk_rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, float32 block)`` over the split's rows in order.

    Each block is checked (finite, unit norm within float16 precision) and the mapping's pages
    are released afterwards, so resident memory stays at one chunk however big the split.
    """
    for start in range(0, len(split), max(1, chunk_rows)):
        stop = min(len(split), start + chunk_rows)
        block = np.asarray(split.matrix[start:stop], dtype=np.float32)
        release_pages(split.matrix)
        _check_block(block, start, split.where)
        yield start, stop, block


def _check_block(block: np.ndarray, start: int, where: str) -> None:
    norms = np.linalg.norm(block, axis=1)
    bad = ~np.isfinite(norms) | (np.abs(norms - 1.0) > NORM_TOLERANCE)
    if bad.any():
        i = int(np.argmax(bad))
        raise HerbensError(f"{where}: row {start + i} has norm {norms[i]:.4g}; stored embeddings must be "
                           "finite and L2-normalised")


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
class EmbeddingsWriter:
    """Normalises and stores row blocks; obtained from :func:`open_embeddings_writer`."""

    def __init__(self, writer: LogitsWriter, where: str):
        self._writer, self._where = writer, where

    def write(self, start: int, block: np.ndarray) -> None:
        """Store rows ``start:start+len(block)``, L2-normalised here (float32) before float16."""
        self._writer.write(MATRIX, start, l2_normalise(block, self._where))


@contextlib.contextmanager
def open_embeddings_writer(run_dir: str | os.PathLike, split: str, image_ids: Sequence, dim: int,
                           meta: Mapping, *, labels: np.ndarray | None = None,
                           num_species: int | None = None) -> Iterator[EmbeddingsWriter]:
    """Context manager yielding an :class:`EmbeddingsWriter`; the split appears only on success.

    Args:
        run_dir: run directory.
        split: ``train``, ``val`` or ``test``.
        image_ids: row order (converted to str; unique).
        dim: embedding size D.
        meta: must hold ``taxonomy_hash``; ``model`` and ``views`` are recorded.
        labels: optional species index per row (-1 unknown) -> ``labels.npy``.
        num_species: bound checked on ``labels``.

    Raises:
        HerbensError: bad arguments, a block that does not fit, a zero/non-finite row, rows never
            written. Nothing is published then, and an older complete split is kept.
    """
    where = f"run '{run_dir}', embeddings split '{split}'"
    ids = [str(i) for i in image_ids]
    if not isinstance(meta, Mapping) or not isinstance(meta.get("taxonomy_hash"), str):
        raise HerbensError(f"{where}: meta must be a dict with a 'taxonomy_hash' string")
    if len(set(ids)) != len(ids):
        raise HerbensError(f"{where}: duplicate image ids: {_duplicates(ids)}")
    if int(dim) < 1:
        raise HerbensError(f"{where}: embedding size must be >= 1, got {dim}")
    label_array = _check_labels(labels, len(ids), np.iinfo(np.int64).max if num_species is None else num_species,
                                where)
    full_meta = {**dict(meta), "format_version": FORMAT_VERSION, "kind": KIND, "split": split,
                 "dtype": DTYPE.name, "normalised": True, "model": str(meta.get("model", "")),
                 "views": list(meta.get("views") or []), "num_rows": len(ids), "shape": [len(ids), int(dim)],
                 "labels": label_array is not None}
    with atomic_dir(embeddings_dir(run_dir, split)) as tmp:
        inner = LogitsWriter(tmp, where, len(ids), {MATRIX: int(dim)}, 0, ())
        try:
            yield EmbeddingsWriter(inner, where)
            inner._finish()
        finally:
            inner._close(sync=False)
        write_json(tmp / "image_ids.json", ids)
        if label_array is not None:
            np.save(tmp / "labels.npy", label_array)
            _fsync(tmp / "labels.npy")
        write_json(tmp / "meta.json", full_meta)  # last: its presence marks a complete directory


def write_embeddings(run_dir: str | os.PathLike, split: str, image_ids: Sequence, embeddings: np.ndarray,
                     meta: Mapping, *, labels: np.ndarray | None = None, num_species: int | None = None,
                     chunk_rows: int = 8192) -> Path:
    """Write one split's embeddings atomically (normalised, float16, block by block).

    Args:
        embeddings: ``[N, D]``, or ``[N, V, D]`` per-view embeddings: each view is normalised,
            the views averaged, and the mean normalised again.
        Other arguments: as :func:`open_embeddings_writer`.

    Returns:
        The ``embeddings/<split>`` directory.
    """
    arr = np.asarray(embeddings)
    where = f"run '{run_dir}', embeddings split '{split}'"
    if arr.ndim not in (2, 3) or arr.shape[0] != len(image_ids):
        raise HerbensError(f"{where}: embeddings have shape {arr.shape}; expected [{len(image_ids)}, D] "
                           f"or [{len(image_ids)}, V, D]")
    with open_embeddings_writer(run_dir, split, image_ids, arr.shape[-1], meta, labels=labels,
                                num_species=num_species) as writer:
        for start in range(0, len(arr), max(1, chunk_rows)):
            block = arr[start:start + chunk_rows]
            if block.ndim == 3:
                block = l2_normalise(block, where).mean(axis=1)
            writer.write(start, block)
    return embeddings_dir(run_dir, split)
