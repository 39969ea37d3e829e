"""Exact cosine top-k search of query embeddings against an index, with bounded memory.

Both sides are unit vectors, so cosine similarity is the inner product. The exact search
streams the index in row chunks (memory-mapped, pages released after each chunk) for each block
of queries and merges a running top-k: memory is one query block x one index chunk of
similarities, whatever the index size. The optional faiss backend (``pip install faiss-cpu``,
extra ``herbens[faiss]``) runs the same exact search with ``IndexFlatIP``; it holds the whole
index in float32 memory but is much faster on large indexes.

Results are ordered best first, equal similarities by index row (lower first). The two backends
agree row for row except where similarities tie exactly at the k-th place (faiss picks among
tied rows its own way).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from herbens.core.errors import HerbensError
from herbens.stores.embeddings import EmbeddingsSplit, iter_chunks

BACKENDS = ("exact", "faiss")


def _index_chunks(index, chunk_rows: int) -> Iterable[tuple[int, np.ndarray]]:
    """``(start, float32 block)`` over an index given as an array or an EmbeddingsSplit."""

    if isinstance(index, EmbeddingsSplit):
        for start, _, block in iter_chunks(index, chunk_rows):
            yield start, block
        return
    for start in range(0, len(index), chunk_rows):
        yield start, np.asarray(index[start:start + chunk_rows], dtype=np.float32)


def _index_shape(index) -> tuple[int, int]:
    shape = index.matrix.shape if hasattr(index, "matrix") else np.shape(index)
    return int(shape[0]), int(shape[1])


def merge_topk(best_sims: np.ndarray, best_rows: np.ndarray, sims: np.ndarray, rows: np.ndarray, k: int):
    """Keep the ``k`` best of two candidate sets per query (ties: lower row first).

    Args:
        best_sims, best_rows: ``[q, a]`` current candidates.
        sims, rows: ``[q, b]`` new candidates.
    Returns:
        ``(sims, rows)`` of shape ``[q, min(k, a + b)]``, best first.
    """
    all_sims = np.concatenate([best_sims, sims], axis=1)
    all_rows = np.concatenate([best_rows, rows], axis=1)
    k = min(k, all_sims.shape[1])
    if k < all_sims.shape[1]:
        # Keep every candidate tied with the k-th best, so the row tie-break below stays exact.
        kth = -np.partition(-all_sims, k - 1, axis=1)[:, k - 1:k]
        keep = all_sims >= kth
        width = int(keep.sum(axis=1).max())
        pick = np.argsort(~keep, axis=1, kind="stable")[:, :width]
        all_sims = np.take_along_axis(all_sims, pick, axis=1)
        all_rows = np.take_along_axis(all_rows, pick, axis=1)
        all_sims = np.where(np.take_along_axis(keep, pick, axis=1), all_sims, -np.inf)
    order = np.lexsort((all_rows, -all_sims), axis=1)[:, :k]
    return np.take_along_axis(all_sims, order, axis=1), np.take_along_axis(all_rows, order, axis=1)


def exact_topk(queries: np.ndarray, index, k: int, *, query_rows: int = 256,
               index_rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar index rows of every query, by streaming exact search.

    Args:
        queries: ``[Q, D]`` unit vectors (array or memory map).
        index: ``[N, D]`` unit vectors: an array or an :class:`~herbens.stores.embeddings.EmbeddingsSplit`.
        k: neighbours per query (capped at N).
        query_rows, index_rows: block sizes; memory ~ ``query_rows x index_rows x 4`` bytes.

    Returns:
        ``(similarities float32 [Q, k], rows int64 [Q, k])``, best first.
    """
    n, _ = _index_shape(index)
    if n == 0 or k < 1:
        raise HerbensError(f"search needs a non-empty index and k >= 1 (index rows {n}, k {k})")
    k = min(k, n)
    queries = np.asarray(queries)
    out_sims = np.empty((len(queries), k), np.float32)
    out_rows = np.empty((len(queries), k), np.int64)
    for qs in range(0, len(queries), query_rows):
        q = np.asarray(queries[qs:qs + query_rows], dtype=np.float32)
        best_sims = np.empty((len(q), 0), np.float32)
        best_rows = np.empty((len(q), 0), np.int64)
        for start, block in _index_chunks(index, index_rows):
            sims = q @ block.T
            rows = np.broadcast_to(np.arange(start, start + len(block), dtype=np.int64), sims.shape)
            best_sims, best_rows = merge_topk(best_sims, best_rows, sims, rows, k)
        out_sims[qs:qs + len(q)] = best_sims
        out_rows[qs:qs + len(q)] = best_rows
    return out_sims, out_rows


def faiss_topk(queries: np.ndarray, index, k: int, *, query_rows: int = 8192,
               index_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Same result as :func:`exact_topk`, through faiss ``IndexFlatIP`` (exact inner product)."""
    try:
        import faiss  # the faiss extra: lazy, the exact numpy search needs nothing
    except ImportError:
        raise HerbensError("the faiss backend needs faiss-cpu: pip install 'herbens[faiss]' "
                           "(or use the exact backend)") from None
    n, dim = _index_shape(index)
    if n == 0 or k < 1:
        raise HerbensError(f"search needs a non-empty index and k >= 1 (index rows {n}, k {k})")
    k = min(k, n)
    flat = faiss.IndexFlatIP(dim)
    for _, block in _index_chunks(index, index_rows):
        flat.add(np.ascontiguousarray(block))
    queries = np.asarray(queries)
    out_sims = np.empty((len(queries), k), np.float32)
    out_rows = np.empty((len(queries), k), np.int64)
    for qs in range(0, len(queries), query_rows):
        q = np.ascontiguousarray(queries[qs:qs + query_rows], dtype=np.float32)
        sims, rows = flat.search(q, k)
        sims, rows = merge_topk(np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64),
                                sims, rows.astype(np.int64), k)  # same order of ties as exact
        out_sims[qs:qs + len(q)] = sims
        out_rows[qs:qs + len(q)] = rows
    return out_sims, out_rows


def topk(queries: np.ndarray, index, k: int, backend: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Dispatch to :func:`exact_topk` or :func:`faiss_topk` by name."""
    if backend == "exact":
        return exact_topk(queries, index, k)
    if backend == "faiss":
        return faiss_topk(queries, index, k)
    raise HerbensError(f"unknown search backend {backend!r}; expected one of {', '.join(BACKENDS)}")
