"""Class prototypes from embeddings, and the prototype (nearest class mean) scorer.

A species' prototype is the normalised mean of its unit training embeddings; with
``sub_centers > 1`` it is up to that many k-means centres of them (like sub-centre ArcFace: a
species photographed in flower and in fruit gets one centre for each), and the species' score is
its best centre's cosine similarity. The same :func:`species_prototype` builds a species from a
few embeddings, which is what enrolment of a new species calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.cluster.vq import kmeans2

from herbens.core.errors import HerbensError
from herbens.core.numerics import log_softmax, logsumexp
from herbens.retrieval.search import _index_chunks
from herbens.stores.embeddings import l2_normalise

NO_PROTOTYPE = -1.0  # cosine score of a species that has no prototype: the lowest possible


@dataclass
class Prototypes:
    """Prototype vectors and the species each belongs to.

    Attributes:
        vectors: float32 ``[P, D]`` unit rows, grouped by owner.
        owners: int64 ``[P]`` species index of each row, ascending.
        num_classes: species in the class space (columns of the scores).
    """

    vectors: np.ndarray
    owners: np.ndarray
    num_classes: int

    def __post_init__(self):
        if len(self.vectors) != len(self.owners) or (np.diff(self.owners) < 0).any():
            raise HerbensError("prototypes: one owner per vector, in ascending order")
        if len(self.owners) and (self.owners[0] < 0 or self.owners[-1] >= self.num_classes):
            raise HerbensError(f"prototypes: owners must be species indices 0..{self.num_classes - 1}")

    def with_species(self, vectors: np.ndarray, species: int) -> "Prototypes":
        """A copy with ``vectors`` (from :func:`species_prototype`) added for ``species``.

        A species index equal to ``num_classes`` appends a new class (enrolment).
        """
        if not 0 <= species <= self.num_classes:
            raise HerbensError(f"prototypes: species index {species} outside 0..{self.num_classes}")
        at = int(np.searchsorted(self.owners, species, side="right"))
        return Prototypes(np.insert(self.vectors, at, vectors, axis=0),
                          np.insert(self.owners, at, np.full(len(vectors), species)),
                          max(self.num_classes, species + 1))

    def without_species(self, species: int) -> "Prototypes":
        """A copy without ``species``: its vectors dropped, later classes renumbered down by one
        (the inverse of :meth:`with_species` appending a class; unenrolment)."""
        if not 0 <= species < self.num_classes:
            raise HerbensError(f"prototypes: species index {species} outside 0..{self.num_classes - 1}")
        keep = self.owners != species
        owners = self.owners[keep]
        return Prototypes(self.vectors[keep], owners - (owners > species), self.num_classes - 1)


def species_prototype(embeddings: np.ndarray, sub_centers: int = 1, seed: int = 0) -> np.ndarray:
    """Prototype vector(s) ``[m, D]`` of one species from its unit embeddings ``[n, D]``.

    ``sub_centers == 1`` (or a single image): the normalised mean. Otherwise ``min(sub_centers, n)``
    k-means centres (scipy ``kmeans2``, k-means++ initialisation, seeded), normalised; centres
    left without members are dropped.
    """
    x = l2_normalise(embeddings, "species prototype")
    if len(x) == 0:
        raise HerbensError("species prototype: no embeddings given")
    m = min(int(sub_centers), len(x))
    if m <= 1:
        return l2_normalise(x.mean(axis=0, keepdims=True))

    centres, assigned = kmeans2(x.astype(np.float64), m, minit="++", seed=np.random.default_rng(seed))
    used = np.unique(assigned)
    return l2_normalise(centres[used])


def class_prototypes(index, labels: np.ndarray, num_classes: int, sub_centers: int = 1, seed: int = 0,
                     chunk_rows: int = 16384) -> Prototypes:
    """Prototypes of every species with training embeddings.

    Args:
        index: ``[N, D]`` unit embeddings: an array or an EmbeddingsSplit (streamed in chunks).
        labels: species index per row (-1 rows are ignored).
        num_classes: number of species.
        sub_centers: centres per species (1: the mean).
        seed: k-means seed (species ``c`` uses ``seed + c``).
        chunk_rows: rows per streamed chunk (mean path).
    """

    labels = np.asarray(labels, dtype=np.int64)
    if sub_centers < 1:
        raise HerbensError(f"sub_centers must be >= 1, got {sub_centers}")
    if sub_centers == 1:
        return _mean_prototypes(_index_chunks(index, chunk_rows), labels, num_classes)
    matrix = index.matrix if hasattr(index, "matrix") else np.asarray(index)
    vectors, owners = [], []
    for c in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == c)
        v = species_prototype(np.asarray(matrix[rows], dtype=np.float32), sub_centers, seed + int(c))
        vectors.append(v)
        owners.append(np.full(len(v), c, dtype=np.int64))
    return Prototypes(np.concatenate(vectors), np.concatenate(owners), num_classes)


def _mean_prototypes(chunks, labels: np.ndarray, num_classes: int) -> Prototypes:

    sums = None
    for start, block in chunks:
        lab = labels[start:start + len(block)]
        keep = np.flatnonzero(lab >= 0)
        # One-hot [C, n] times the block: per-class sums without a Python loop over rows.
        onehot = sparse.csr_matrix((np.ones(len(keep), np.float64), (lab[keep], keep)),
                                   shape=(num_classes, len(block)))
        part = onehot @ block.astype(np.float64)
        sums = part if sums is None else sums + part
    if sums is None:
        raise HerbensError("class prototypes: no training embeddings")
    owners = np.flatnonzero(np.bincount(labels[labels >= 0], minlength=num_classes) > 0)
    return Prototypes(l2_normalise(sums[owners]), owners.astype(np.int64), num_classes)


def cosine_scores(queries: np.ndarray, prototypes: Prototypes) -> np.ndarray:
    """Best prototype cosine per species ``[q, C]`` (``NO_PROTOTYPE`` where a species has none)."""
    sims = np.asarray(queries, dtype=np.float32) @ prototypes.vectors.T
    out = np.full((len(sims), prototypes.num_classes), NO_PROTOTYPE, dtype=np.float32)
    if len(prototypes.owners):
        species, starts = np.unique(prototypes.owners, return_index=True)
        out[:, species] = np.maximum.reduceat(sims, starts, axis=1)
    return out


@dataclass
class PrototypeClassifier:
    """Scores = best prototype cosine / temperature, per species."""

    prototypes: Prototypes
    temperature: float = 0.05

    @property
    def num_classes(self) -> int:
        return self.prototypes.num_classes

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """Species logits ``[q, C]`` of unit query embeddings."""
        return cosine_scores(queries, self.prototypes) / np.float32(self.temperature)


def temperature_row_losses(cosines: np.ndarray, labels: np.ndarray, temperatures) -> np.ndarray:
    """Log-loss ``[n, G]`` of ``softmax(cosines / T)`` on each labelled row, for each candidate ``T``.

    Called chunk by chunk, so fitting never holds a whole split's scores (only ``[N, G]`` losses).
    """
    rows = np.arange(len(labels))
    out = np.zeros((len(labels), len(temperatures)))
    for i, t in enumerate(temperatures):
        z = cosines / np.float32(t)
        out[:, i] = logsumexp(z) - z[rows, labels]
    return out


def fuse_with_head(head_logits: np.ndarray, proto_logits: np.ndarray, num_known: int) -> np.ndarray:
    """Scores over known + enrolled species: the head splits the known mass, prototypes the rest.

    ``proto_logits`` has the ``num_known`` trained species first, then the enrolled ones. The
    prototype softmax gives each enrolled species its probability and the known species their
    total; the head's softmax shares that total among the known species:
    ``log p(known c) = log P_proto(known) + log p_head(c)``, ``log p(enrolled e) = log p_proto(e)``.
    With nothing enrolled this is exactly the head's log-softmax (same argmax as the head).

    Returns:
        float32 log-probabilities ``[q, num_known + E]``.
    """
    head = log_softmax(np.asarray(head_logits, dtype=np.float32))
    proto = log_softmax(np.asarray(proto_logits, dtype=np.float32))
    if head.shape[1] != num_known or proto.shape[1] < num_known:
        raise HerbensError(f"fuse: head has {head.shape[1]} classes, prototypes {proto.shape[1]}, "
                           f"known {num_known}")
    log_known_mass = logsumexp(proto[:, :num_known], keepdims=True)
    return np.concatenate([head + log_known_mass, proto[:, num_known:]], axis=1)
