"""k-nearest-neighbour scorer over a run's training embeddings (cosine, temperature-weighted).

The ``k`` most similar training images vote for their species with weights
``exp((cos - cos_best) / T)``; the score of species ``c`` is ``log(W_c + alpha)`` where ``W_c`` is
its summed weight, and ``alpha`` (a small smoothing mass) keeps species without a vote finite, as
the logits store requires. ``k`` and ``T`` are fitted on the validation embeddings by log-loss
(:mod:`herbens.retrieval.fit`), from one search for the largest candidate ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from herbens.core.errors import HerbensError
from herbens.retrieval.search import topk

ALPHA = 1e-3
K_CANDIDATES = (1, 3, 5, 10, 20, 50)
T_CANDIDATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def neighbour_weights(sims: np.ndarray, temperature: float) -> np.ndarray:
    """``exp((sim - best sim) / T)`` per neighbour (1 for the nearest)."""
    return np.exp((sims - sims[:, :1]) / np.float32(temperature)).astype(np.float32)


def knn_logits(sims: np.ndarray, neighbour_labels: np.ndarray, num_classes: int, k: int,
               temperature: float, alpha: float = ALPHA) -> np.ndarray:
    """Species scores ``[q, C]`` from the neighbours' similarities and labels (best first)."""
    k = min(k, sims.shape[1])
    w = neighbour_weights(sims[:, :k], temperature)
    votes = np.zeros((len(sims), num_classes), dtype=np.float32)
    rows = np.repeat(np.arange(len(sims)), k)
    np.add.at(votes, (rows, neighbour_labels[:, :k].ravel()), w.ravel())
    return np.log(votes + np.float32(alpha))


def knn_row_losses(sims: np.ndarray, neighbour_labels: np.ndarray, labels: np.ndarray, num_classes: int,
                   k: int, temperature: float, alpha: float = ALPHA) -> np.ndarray:
    """Log-loss of the kNN softmax on each labelled row ``[n]``, without building dense scores."""
    k = min(k, sims.shape[1])
    w = neighbour_weights(sims[:, :k], temperature).astype(np.float64)
    hit = (w * (neighbour_labels[:, :k] == labels[:, None])).sum(axis=1)
    # softmax(log(W + alpha)) = (W_c + alpha) / (sum W + alpha C)
    p = (hit + alpha) / (w.sum(axis=1) + alpha * num_classes)
    return -np.log(p)


@dataclass
class KnnClassifier:
    """Scores of query embeddings from their neighbours in a training index."""

    index: object                 # [N, D] unit embeddings (array or EmbeddingsSplit)
    index_labels: np.ndarray      # species index per index row
    num_classes: int
    k: int = 10
    temperature: float = 0.05
    backend: str = "exact"

    def __post_init__(self):
        self.index_labels = np.asarray(self.index_labels, dtype=np.int64)
        if (self.index_labels < 0).any():
            raise HerbensError("kNN index rows must all be labelled (species index >= 0)")

    def neighbours(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and species of the ``k`` nearest index rows, best first."""
        sims, rows = topk(queries, self.index, k, self.backend)
        return sims, self.index_labels[rows]

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Species logits ``[q, C]``."""
        sims, labels = self.neighbours(queries, self.k)
        return knn_logits(sims, labels, self.num_classes, self.k, self.temperature)
