"""The embeddings store: L2-normalised image embeddings of a run, beside its logits.

A run's inference (``herbens infer RUN --embeddings``, or ``infer.embeddings: true``) writes,
per split, ``runs/<name>/embeddings/<split>/``:

- ``embeddings.npy``: float16 ``[N, D]``, every row of unit L2 norm (test-time views averaged
  and re-normalised);
- ``image_ids.json``: the row order (list of str);
- ``labels.npy`` (optional): int64 species index per row, -1 where unknown (test);
- ``meta.json``: ``{"kind": "embeddings", "taxonomy_hash", "shape": [N, D], "dtype": "float16",
  "normalised": true, "views", "model", "split", "format_version": 1, "labels"}``.

It is a thin layer on the stores kernel (:mod:`herbens.stores.kernel`, :mod:`herbens.stores.writer`):
the block writer (rows tracked, float16 overflow refused), the reader check (description, ids and
their digest, ``.npy`` headers and sizes, labels, taxonomy) and atomic publication.
:func:`iter_chunks` checks each chunk's finiteness and norms as it streams, and hands its pages
back to the kernel.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from herbens.core.errors import HerbensError
from herbens.stores.description import EmbeddingsDescription
from herbens.stores.kernel import open_store, release_pages
from herbens.stores.writer import BlockWriter, check_labels, new_description, publish_store

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
        description: the typed ``meta.json``; meta: the object as stored.
        labels: int64 species index per row (-1 unknown), or None.
        matrix: float16 ``[N, D]`` (memory-mapped unless read with ``mmap=False``).
    """

    def __init__(self, run_dir: Path, split: str, path: Path, image_ids: list[str],
                 description: EmbeddingsDescription, meta: dict, matrix: np.ndarray, labels: np.ndarray | None):
        self.run_dir, self.split, self.path = run_dir, split, path
        self.image_ids, self.description, self.meta = image_ids, description, meta
        self.matrix, self.labels = matrix, labels

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def where(self) -> str:
        return _where(self.run_dir, self.split)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"EmbeddingsSplit({self.where}, {tuple(self.matrix.shape)})"


def _where(run_dir, split: str) -> str:
    return f"run '{run_dir}', embeddings split '{split}'"


def read_embeddings(run_dir: str | os.PathLike, split: str, mmap: bool = True, *, taxonomy=None) -> EmbeddingsSplit:
    """Open and check one split's embeddings (:func:`herbens.stores.kernel.open_store`).

    Args:
        run_dir: run directory.
        split: ``train``, ``val`` or ``test``.
        mmap: memory-map the matrix (default).
        taxonomy: when given, the stored taxonomy hash must be its hash and the labels must
            index its species.

    Raises:
        HerbensError: naming the run, the split and the problem.
    """
    run_dir = Path(run_dir)
    files = open_store(embeddings_dir(run_dir, split), _where(run_dir, split), split, EmbeddingsDescription,
                       mmap=mmap, taxonomy=taxonomy, absent=" (write it with herbens infer RUN --embeddings)")
    return EmbeddingsSplit(run_dir, split, files.path, files.image_ids, files.description, files.meta,
                           files.arrays[MATRIX], files.labels)


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

    def __init__(self, writer: BlockWriter, where: str):
        self._writer, self._where = writer, where

    def write(self, start: int, block: np.ndarray) -> None:
        """Store rows ``start:start+len(block)``, L2-normalised here (float32) before float16."""
        self._writer.put(MATRIX, start, l2_normalise(block, self._where))


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
    where = _where(run_dir, split)
    ids = [str(i) for i in image_ids]
    if int(dim) < 1:
        raise HerbensError(f"{where}: embedding size must be >= 1, got {dim}")
    label_array = check_labels(labels, len(ids), np.iinfo(np.int64).max if num_species is None else num_species,
                               where)
    description = new_description(EmbeddingsDescription, meta, split, ids, where, normalised=True,
                                  shape=[len(ids), int(dim)], labels=label_array is not None)
    with publish_store(embeddings_dir(run_dir, split), where, ids, description, label_array) as writer:
        yield EmbeddingsWriter(writer, where)


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
    where = _where(run_dir, split)
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
