"""Scores of one chunk of rows: the pure combination of runs' logits with fitted values.

Everything here works on in-memory arrays, with no file, split or fitting behind it, so the
same functions combine a chunk streamed from stored logits (``herbens ensemble``) and the
logits of new images (``herbens predict``): build a :class:`Chunk` from per-run, per-level
float32 arrays, :meth:`Params.from_json` from the ensemble's JSON sidecar (its ``params``),
a :class:`ClassSpace` from the taxonomy, and call :func:`predict_chunk`.

Every score is a row-wise function of its own row, so results do not depend on the chunk size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from herbens.data.taxonomy import LEVELS, Taxonomy
from herbens.core.errors import HerbensError
from herbens.core import numerics
from herbens.core.numerics import log_softmax, softmax

_TINY = np.float32(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------------------
# Inputs: the classes and a chunk of rows
# ----------------------------------------------------------------------------------------
@dataclass
class ClassSpace:
    """The ensemble's classes: a subset of the first run's taxonomy, in its order.

    Attributes:
        taxonomy: the first run's taxonomy (the output's class order and category_ids).
        species: its species index for each ensemble column (all of them unless aligning by
            category drops species some run lacks).
        genus_of, family_of: ensemble genus/family column of each ensemble species column.
        log_prior: log training frequency of each ensemble species (the taxonomy's counts,
            i.e. the first run's training split, clamped to 1).
        label_column: ensemble column of each reference species index (-1: not in the ensemble).
        dropped: description of species dropped by category alignment.
    """

    taxonomy: Taxonomy
    species: np.ndarray
    genus_of: np.ndarray
    family_of: np.ndarray
    log_prior: np.ndarray
    label_column: np.ndarray
    dropped: dict = field(default_factory=dict)

    @classmethod
    def build(cls, ref: Taxonomy, species: np.ndarray, genus_of: np.ndarray, family_of: np.ndarray,
              dropped: dict) -> "ClassSpace":
        """The space of ``species`` (indices of ``ref``) with their genus/family columns."""
        log_prior = numerics.log_prior(ref.counts[species])
        label_column = np.full(ref.num_classes("species"), -1, dtype=np.int64)
        label_column[species] = np.arange(len(species))
        return cls(ref, species, np.asarray(genus_of), np.asarray(family_of), log_prior, label_column, dropped)

    @classmethod
    def of_taxonomy(cls, taxonomy: Taxonomy) -> "ClassSpace":
        """Every class of ``taxonomy``, in its order (runs sharing one taxonomy)."""
        return cls.build(taxonomy, np.arange(taxonomy.num_classes("species")), taxonomy.species_to_genus,
                         taxonomy.species_to_family, {})

    @property
    def num_classes(self) -> int:
        return len(self.species)

    def category_ids(self, columns: np.ndarray) -> np.ndarray:
        """Kaggle category_ids of ensemble species columns."""
        return self.taxonomy.category_of(self.species[columns])


@dataclass
class Chunk:
    """Rows ``start:stop`` of an aligned split (or of in-memory logits), float32 per (run, level).

    Attributes:
        logits: ``(run, level) -> [n, C_level]`` in the ensemble's column order.
        views: per run, its per-view species blocks (vote mode only).
        labels, label_columns: reference species index / ensemble column per row (-1
            unknown), or None.
    """

    start: int
    stop: int
    logits: dict[tuple[int, str], np.ndarray]
    views: dict[int, list[np.ndarray]] = field(default_factory=dict)
    labels: np.ndarray | None = None
    label_columns: np.ndarray | None = None

    @classmethod
    def of_arrays(cls, per_run: Sequence[dict[str, np.ndarray]]) -> "Chunk":
        """A chunk of in-memory logits: ``per_run[r][level]`` is run r's ``[n, C_level]``."""
        logits = {(r, lv): np.asarray(a, dtype=np.float32) for r, levels in enumerate(per_run)
                  for lv, a in levels.items()}
        n = {len(a) for a in logits.values()}
        if len(n) != 1:
            raise HerbensError(f"chunk: runs and levels give different row counts {sorted(n)}")
        return cls(0, n.pop(), logits)

    def __len__(self) -> int:
        return self.stop - self.start

    def get(self, run: int, level: str) -> np.ndarray:
        return self.logits[(run, level)]

    def take(self, rows: np.ndarray) -> "Chunk":
        """The chunk's rows ``rows`` (positions within the chunk) as a chunk of its own."""
        def pick(a):
            return None if a is None else a[rows]

        return Chunk(0, len(rows), {k: a[rows] for k, a in self.logits.items()},
                     {r: [v[rows] for v in vs] for r, vs in self.views.items()},
                     pick(self.labels), pick(self.label_columns))


# ----------------------------------------------------------------------------------------
# The fitted values
# ----------------------------------------------------------------------------------------
@dataclass
class Params:
    """Everything that turns the runs' logits into one species score per class.

    ``weights`` sum to 1; at each level run r enters as
    ``weights[r] * scale / temperatures[level][r] * logits`` (logit space) or as the mixture
    ``sum_r weights[r] * softmax(logits / temperatures[level][r])`` (prob space, scores = its
    log). Then ``- tau * log(prior)`` and ``+ alpha * log p(genus of species) + beta * log
    p(family of species)``, from the combined genus/family heads, each with its own level's
    temperatures. Vote mode ranks classes by top-``vote_k`` votes, ties broken by that score.
    """

    weights: np.ndarray
    temperatures: dict[str, np.ndarray]
    scale: float = 1.0
    space: str = "logit"
    tau: float = 0.0
    alpha: float = 0.0
    beta: float = 0.0
    mode: str = "mean"
    vote_k: int = 5

    @classmethod
    def initial(cls, num_runs: int, space: str = "logit", vote_k: int = 5) -> "Params":
        """Equal weights, no calibration, no adjustment."""
        return cls(weights=np.full(num_runs, 1.0 / num_runs),
                   temperatures={lv: np.ones(num_runs) for lv in LEVELS}, space=space, vote_k=vote_k)

    def replace(self, **changes) -> "Params":
        return dataclasses.replace(self, **changes)

    def with_temperatures(self, **levels: np.ndarray) -> "Params":
        """A copy with the temperatures of the given levels replaced."""
        return self.replace(temperatures={**self.temperatures, **{k: np.asarray(v, dtype=np.float64)
                                                                   for k, v in levels.items()}})

    def temperature(self, level: str, r: int) -> float:
        return float(self.temperatures[level][r])

    @property
    def active_runs(self) -> list[int]:
        """Runs with a non-zero weight (the only ones read)."""
        return [r for r, w in enumerate(self.weights) if w > 0]

    @property
    def levels(self) -> tuple[str, ...]:
        """Levels whose logits the scores need."""
        return ("species",) + (("genus",) if self.alpha else ()) + (("family",) if self.beta else ())

    def to_json(self) -> dict:
        return {"weights": [float(w) for w in self.weights],
                "temperatures": {lv: [float(t) for t in ts] for lv, ts in self.temperatures.items()},
                "scale": float(self.scale), "space": self.space, "tau": float(self.tau),
                "alpha": float(self.alpha), "beta": float(self.beta), "mode": self.mode,
                "vote_k": int(self.vote_k)}

    @classmethod
    def from_json(cls, data: dict) -> "Params":
        """Inverse of :meth:`to_json` (the ``params`` of an ensemble's JSON sidecar).

        Sidecars written before per-level calibration hold one temperature list, which those
        versions applied at every level: it is read so, and scores are reproduced.

        Raises:
            HerbensError: naming the key that is missing or malformed.
        """
        try:
            weights = np.asarray(data["weights"], dtype=np.float64)
            temps = data["temperatures"]
            if not isinstance(temps, dict):
                temps = {lv: temps for lv in LEVELS}
            temps = {lv: np.asarray(t, dtype=np.float64) for lv, t in temps.items()}
            params = cls(weights, temps, float(data.get("scale", 1.0)), str(data.get("space", "logit")),
                         float(data["tau"]), float(data["alpha"]), float(data["beta"]),
                         str(data.get("mode", "mean")), int(data.get("vote_k") or 5))
        except KeyError as exc:
            raise HerbensError(f"ensemble params: missing key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise HerbensError(f"ensemble params: malformed value ({exc})") from None
        for lv, t in params.temperatures.items():
            if t.shape != weights.shape or not (t > 0).all():
                raise HerbensError(f"ensemble params: temperatures.{lv} must be {len(weights)} positive numbers")
        if params.space not in ("logit", "prob") or params.mode not in ("mean", "vote"):
            raise HerbensError(f"ensemble params: unknown space {params.space!r} or mode {params.mode!r}")
        return params


def run_factor(params: Params, r: int, level: str = "species") -> np.float32:
    """Multiplier of run ``r``'s ``level`` logits in logit space."""
    return np.float32(params.weights[r] * params.scale / params.temperatures[level][r])


def combine_level(chunk: Chunk, level: str, params: Params) -> np.ndarray:
    """Weighted, calibrated combination of the active runs' ``level`` logits (a new array)."""
    total, term = None, None
    for r in params.active_runs:
        if params.space == "logit":
            if total is None:
                total = chunk.get(r, level) * run_factor(params, r, level)
                continue
            term = np.multiply(chunk.get(r, level), run_factor(params, r, level), out=term)
        else:
            term = softmax(chunk.get(r, level) / np.float32(params.temperatures[level][r]))
            term *= np.float32(params.weights[r])
            if total is None:
                total = term
                term = None
                continue
        total += term
    if params.space == "prob":
        np.maximum(total, _TINY, out=total)
        np.log(total, out=total)
    return total


def hierarchy_terms(chunk: Chunk, params: Params, space: ClassSpace, genus: bool, family: bool):
    """``log p(genus of species)`` and ``log p(family of species)`` per species column (or None)."""
    g = log_softmax(combine_level(chunk, "genus", params))[:, space.genus_of] if genus else None
    f = log_softmax(combine_level(chunk, "family", params))[:, space.family_of] if family else None
    return g, f


def species_scores(chunk: Chunk, params: Params, space: ClassSpace) -> np.ndarray:
    """Final mean-mode species scores ``[n, C]`` of a chunk.

    In-place arithmetic on the fresh combination gives the same values as the out-of-place
    expressions the fitting code uses for its candidates (``scores - tau * log_prior``, ...).
    """
    scores = combine_level(chunk, "species", params)
    if params.tau:
        scores -= np.float32(params.tau) * space.log_prior
    if params.alpha or params.beta:
        g, f = hierarchy_terms(chunk, params, space, bool(params.alpha), bool(params.beta))
        if params.alpha:
            g *= np.float32(params.alpha)
            scores += g
        if params.beta:
            f *= np.float32(params.beta)
            scores += f
    return scores


def vote_counts(chunk: Chunk, params: Params, space: ClassSpace) -> tuple[np.ndarray, np.ndarray]:
    """Weighted top-k votes per class and the voted class indices (team 4 style).

    Each run splits its weight evenly over its views (stored TTA views, else its mean logits);
    a view votes for its ``vote_k`` best classes after calibration and the ``tau`` adjustment.
    """
    n, c = len(chunk), space.num_classes
    k = min(params.vote_k, c)
    votes = np.zeros((n, c), dtype=np.float32)
    voted, rows = [], np.arange(n)[:, None]
    for r in params.active_runs:
        views = chunk.views[r]
        share = np.float32(params.weights[r] / len(views))
        for view in views:
            scores = view * run_factor(params, r)
            if params.tau:
                scores = scores - np.float32(params.tau) * space.log_prior
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
            votes[rows, top] += share
            voted.append(top)
    return votes, np.concatenate(voted, axis=1)


def top_k_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best columns per row, best first (ties: lower column first)."""
    n, c = scores.shape
    k = min(k, c)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
    values = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -values), axis=1)
    return np.take_along_axis(top, order, axis=1)


def _vote_ranking(votes: np.ndarray, voted: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best columns by (votes, score), exact: candidates are the voted classes plus the
    ``k`` best by score (any other class has no vote and a lower score than k candidates)."""
    candidates = np.sort(np.concatenate([voted, top_k_columns(scores, k)], axis=1), axis=1)
    repeated = np.zeros(candidates.shape, dtype=bool)
    repeated[:, 1:] = candidates[:, 1:] == candidates[:, :-1]
    v = np.take_along_axis(votes, candidates, axis=1)
    v[repeated] = -np.inf
    s = np.take_along_axis(scores, candidates, axis=1)
    order = np.lexsort((candidates, -s, -v), axis=1)[:, :k]
    return np.take_along_axis(candidates, order, axis=1)


def predict_chunk(chunk: Chunk, params: Params, space: ClassSpace, top_k: int = 0):
    """Predicted ensemble column per row, plus (with ``top_k``) the best columns and their scores.

    Scores in the top-k output: softmax of the final species scores (mean mode), or the share of
    the vote weight (vote mode).
    """
    scores = species_scores(chunk, params, space)
    if params.mode == "vote":
        votes, voted = vote_counts(chunk, params, space)
        ranked = _vote_ranking(votes, voted, scores, max(1, top_k))
        pred = ranked[:, 0]
        if not top_k:
            return pred, None, None
        return pred, ranked, np.take_along_axis(votes, ranked, axis=1)
    pred = scores.argmax(axis=1)
    if not top_k:
        return pred, None, None
    top = top_k_columns(scores, top_k)
    probs = np.exp(np.take_along_axis(log_softmax(scores), top, axis=1))
    return pred, top, probs


def needs_of(params_list: Sequence[Params]) -> dict:
    """Keyword arguments of :meth:`AlignedSplit.chunks` covering every params' inputs."""
    runs = sorted({r for p in params_list for r in p.active_runs})
    levels = [lv for lv in LEVELS if any(lv in p.levels for p in params_list)]
    return {"runs": runs, "levels": levels, "views": any(p.mode == "vote" for p in params_list)}


