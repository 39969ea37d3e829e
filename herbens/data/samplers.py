"""Seedable training samplers: random, class-balanced, power (square-root) and P x K batches.

Every sampler draws its epoch from ``numpy.random.default_rng([seed, epoch])``, so the order
depends only on ``(seed, epoch)``: identical on every rank, reproducible, and resumable mid-epoch
(skip the batches already seen). Call ``set_epoch(epoch)`` before each epoch.

Distributed training: with ``num_replicas=W, rank=r`` each rank yields a disjoint shard of the
same epoch list, like ``torch.utils.data.DistributedSampler`` (padded by wrapping so every rank
has the same length). Accelerate's ``prepare`` also shards a DataLoader's batches across
processes; use ``num_replicas=1`` when the DataLoader goes through ``prepare``, or
``num_replicas=W`` when it does not, never both.
"""

from __future__ import annotations

import math

import numpy as np
from torch.utils.data import Sampler

from herbens.core.errors import HerbensError
from herbens.core.registry import components, register


class EpochSampler(Sampler[int]):
    """Base: an epoch's global index list, drawn from ``(seed, epoch)``, sharded by rank.

    Args:
        labels: class index of every dataset position (``[N]`` ints >= 0).
        seed: non-negative int.
        num_replicas: number of ranks sharing the epoch.
        rank: this rank, ``0 <= rank < num_replicas``.
    """

    is_batch_sampler = False
    # Several images of each class in every batch: what a loss with needs_class_batches asks for.
    class_batches = False

    def __init__(self, labels, seed: int, num_replicas: int = 1, rank: int = 0):
        self.labels = _check_labels(labels)
        self.seed = _check_seed(seed)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise HerbensError(f"sampler: need 0 <= rank < num_replicas, got rank={rank}, "
                               f"num_replicas={num_replicas}")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order ``__iter__`` yields next."""
        self.epoch = int(epoch)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    @property
    def num_samples(self) -> int:
        """Length of the global epoch list before sharding."""
        return len(self.labels)

    def epoch_indices(self) -> np.ndarray:
        """The global index list of the current epoch (same on every rank)."""
        raise NotImplementedError

    def __iter__(self):
        return iter(shard(self.epoch_indices(), self.num_replicas, self.rank).tolist())

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.num_replicas)


@register("sampler", "random")
class RandomSampler(EpochSampler):
    """A seeded random permutation of all positions (each exactly once per epoch)."""

    def epoch_indices(self) -> np.ndarray:
        return self.rng().permutation(len(self.labels))


@register("sampler", "power")
@register("sampler", "sqrt")
class PowerSampler(EpochSampler):
    """Draws with replacement so that ``p(class) ∝ n_c ** alpha``, uniform within a class.

    ``alpha = 0`` is class-balanced (every class equally likely), ``0.5`` square-root sampling,
    ``1`` the natural (instance) distribution.

    Args:
        labels, seed, num_replicas, rank: see :class:`EpochSampler`.
        alpha: the exponent.
        num_samples: draws per epoch (default: the dataset size).
    """

    def __init__(self, labels, seed: int, alpha: float = 0.5, num_samples: int | None = None,
                 num_replicas: int = 1, rank: int = 0):
        super().__init__(labels, seed, num_replicas, rank)
        if alpha < 0:
            raise HerbensError(f"sampler: alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self._num_samples = int(num_samples or len(self.labels))
        self.sample_probs = power_sample_probs(self.labels, self.alpha)

    @property
    def num_samples(self) -> int:
        return self._num_samples

    def epoch_indices(self) -> np.ndarray:
        return self.rng().choice(len(self.labels), size=self.num_samples, replace=True, p=self.sample_probs)


@register("sampler", "class_balanced")
class ClassBalancedSampler(PowerSampler):
    """Every class equally likely (:class:`PowerSampler` with ``alpha = 0``)."""

    def __init__(self, labels, seed: int, num_samples: int | None = None, num_replicas: int = 1,
                 rank: int = 0):
        super().__init__(labels, seed, alpha=0.0, num_samples=num_samples, num_replicas=num_replicas,
                         rank=rank)


@register("sampler", "pk")
class PKBatchSampler(EpochSampler):
    """Batches of P distinct classes x K images each (for metric losses such as AMS).

    Classes are chosen uniformly (among classes with images), P distinct per batch. A class's
    images are taken K at a time from its own shuffled list, cycling, so a class with fewer than
    K images repeats images (sampling with replacement) and large classes are walked through
    without repeats. Yields lists of dataset positions; pass it as a DataLoader's
    ``batch_sampler``. ``len()`` is the number of batches on this rank.

    Args:
        labels, seed, num_replicas, rank: see :class:`EpochSampler`.
        classes_per_batch: P.
        images_per_class: K.
        num_batches: global batches per epoch (default: ``N // (P * K)``, at least 1).
    """

    is_batch_sampler = True
    class_batches = True

    def __init__(self, labels, seed: int, classes_per_batch: int = 16, images_per_class: int = 4,
                 num_batches: int | None = None, num_replicas: int = 1, rank: int = 0):
        super().__init__(labels, seed, num_replicas, rank)
        self.p, self.k = int(classes_per_batch), int(images_per_class)
        self.counts = np.bincount(self.labels)
        self.classes = np.flatnonzero(self.counts)
        if self.p < 1 or self.k < 1:
            raise HerbensError("pk sampler: classes_per_batch and images_per_class must be >= 1")
        if self.p > len(self.classes):
            raise HerbensError(f"pk sampler: classes_per_batch={self.p} but only "
                               f"{len(self.classes)} classes have images")
        self.num_batches = int(num_batches or max(1, len(self.labels) // (self.p * self.k)))
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def __len__(self) -> int:
        return math.ceil(self.num_batches / self.num_replicas)

    def epoch_batches(self) -> np.ndarray:
        """``[batches, P * K]`` positions of the whole epoch (same on every rank)."""
        rng = self.rng()
        total = self.num_batches
        chosen = np.stack([rng.choice(self.classes, size=self.p, replace=False) for _ in range(total)])
        shuffled = self._shuffle_within_classes(rng)
        flat = chosen.reshape(-1)
        # The m-th time class c is chosen it takes items m*K .. m*K+K-1 of its list (cycling).
        offsets = (_occurrence(flat)[:, None] * self.k + np.arange(self.k)) % self.counts[flat][:, None]
        return shuffled[self.starts[flat][:, None] + offsets].reshape(total, self.p * self.k)

    def __iter__(self):
        for batch in shard(self.epoch_batches(), self.num_replicas, self.rank):
            yield batch.tolist()

    def _shuffle_within_classes(self, rng: np.random.Generator) -> np.ndarray:
        keys = rng.random(len(self.labels))
        return np.lexsort((keys, self.labels))


# Recipe name -> sampler (``@register("sampler", NAME)``); a sampler's recipe parameters are its
# constructor's keywords.
SAMPLERS = components("sampler")


def build_sampler(name: str, labels, seed: int, **params) -> EpochSampler:
    """Build a training sampler by name.

    Args:
        name: ``random`` | ``class_balanced`` (alpha 0) | ``sqrt`` / ``power`` (``p ∝ n^alpha``,
            alpha 0.5 by default) | ``pk`` (a batch sampler: ``is_batch_sampler`` is True).
        labels: species index of every training position.
        seed: the run's seed.
        **params: the rest of the recipe's ``sampler`` node (``alpha``, ``classes_per_batch``,
            ``images_per_class``), plus ``num_replicas``/``rank``, optional ``num_samples``
            (weighted samplers) or ``num_batches`` (pk).

    Raises:
        HerbensError: unknown sampler or parameter.
    """
    if name not in SAMPLERS:
        raise HerbensError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    try:
        return SAMPLERS[name](labels, seed, **params)
    except TypeError as exc:
        raise HerbensError(f"sampler {name}: {exc}") from None


def power_sample_probs(labels: np.ndarray, alpha: float) -> np.ndarray:
    """Per-position probability so that ``p(class) ∝ n_c ** alpha`` (uniform within a class)."""
    counts = np.bincount(labels).astype(np.float64)
    present = counts > 0
    class_p = np.zeros_like(counts)
    class_p[present] = counts[present] ** alpha
    class_p /= class_p.sum()
    probs = class_p[labels] / counts[labels]
    return probs / probs.sum()


def shard(items: np.ndarray, num_replicas: int, rank: int) -> np.ndarray:
    """Rank's share of ``items`` (along axis 0): padded by wrapping to a multiple of
    ``num_replicas``, then every ``num_replicas``-th item from ``rank`` (DistributedSampler's rule)."""
    total = math.ceil(len(items) / num_replicas) * num_replicas
    if total > len(items):
        items = np.concatenate([items, np.resize(items, (total - len(items),) + items.shape[1:])])
    return items[rank:total:num_replicas]


def _occurrence(values: np.ndarray) -> np.ndarray:
    # How many times each value already occurred before this position.
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    first = np.searchsorted(sorted_values, sorted_values, side="left")
    occ = np.empty(len(values), dtype=np.int64)
    occ[order] = np.arange(len(values)) - first
    return occ


def _check_labels(labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) == 0:
        raise HerbensError(f"sampler: labels must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0:
        raise HerbensError("sampler: labels must be class indices >= 0 (no unlabelled -1 rows)")
    return arr.astype(np.int64)


def _check_seed(seed) -> int:
    if int(seed) < 0:
        raise HerbensError(f"sampler: seed must be >= 0, got {seed}")
    return int(seed)
