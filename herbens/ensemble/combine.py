"""Streaming ensemble of runs' stored logits: load, check, align, combine, predict.

``herbens ensemble runs/* -o submissions/NAME.csv`` lands in :func:`ensemble_runs`:

1. every run's ``taxonomy.json`` and ``logits/{val,test}`` are opened and checked
   (taxonomy hashes, image-id sets, shapes; values are checked chunk by chunk as they are read);
2. rows are aligned by image id onto the first run's order, columns onto the first run's class
   order (optionally by ``category_id`` across different taxonomies);
3. weights, temperatures, the inverse-frequency ``tau`` and the hierarchy ``alpha``/``beta`` are
   fitted on the labelled validation rows (``herbens.ensemble.fit``), each kept only if it
   raises validation macro-F1;
4. the test split is streamed once in row chunks and the argmax written as a Kaggle CSV.

Memory holds one row chunk per run (per stored view in vote mode) plus per-class vectors and
per-image ids and predictions, never a whole matrix:
the matrices are memory-mapped, and the pages of each chunk are handed back to the kernel once
read, so that even the resident page cache of the mappings stays at one chunk. Every score is a
row-wise function of its own row, so results do not depend on the chunk size.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from herbens.data.taxonomy import LEVELS, Taxonomy
from herbens.ensemble.integrity import forget_unreadable_labels, unreadable_record, warn_unverifiable_test
from herbens.ensemble.submission import prepare_outputs, read_submission, write_submission
from herbens.errors import HerbensError
from herbens.fileio import atomic_write, write_json
from herbens.logits import LogitsSplit, check_finite, logits_dir, read_logits

# Default chunk: about 16 MB of float32 per run and level (270 rows at 15,501 classes). Small
# enough for the allocator to reuse freed blocks instead of faulting in fresh pages each
# chunk, large enough that per-chunk Python overhead is negligible.
CHUNK_ELEMENTS = 1 << 22
_TINY = np.float32(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------
@dataclass
class EnsembleOptions:
    """What to fit and how to combine; see :func:`ensemble_runs` for the meaning of each."""

    weights: str | tuple[float, ...] = "fit"
    weight_objective: str = "f1"
    calibrate: bool = True
    tau: str | float = "fit"
    hierarchy: str | tuple[float, float] = "fit"
    mode: str = "mean"
    vote_k: int = 5
    space: str = "logit"
    top_k: int = 0
    chunk_rows: int | None = None
    align_by_category: bool = False

    def check(self, num_runs: int) -> "EnsembleOptions":
        """Normalise and validate; returns self. Bad values raise HerbensError."""
        _one_of("mode", self.mode, ("mean", "vote"))
        _one_of("space", self.space, ("logit", "prob"))
        _one_of("weight objective", self.weight_objective, ("f1", "nll"))
        if isinstance(self.weights, str):
            _one_of("weights", self.weights, ("equal", "fit"))
        else:
            self.weights = _given_weights(self.weights, num_runs)
        self.tau = "none" if self.tau is None else self.tau
        if isinstance(self.tau, str):
            _one_of("tau", self.tau, ("fit", "none"))
        else:
            self.tau = _numbers("tau", [self.tau], 1)[0]
        self.hierarchy = "none" if self.hierarchy is None else self.hierarchy
        if isinstance(self.hierarchy, str):
            _one_of("hierarchy", self.hierarchy, ("fit", "none"))
        else:
            self.hierarchy = tuple(_numbers("hierarchy (alpha, beta)", self.hierarchy, 2))
        if self.vote_k < 1 or (self.chunk_rows is not None and self.chunk_rows < 1):
            raise HerbensError("vote-k and chunk-rows must be at least 1")
        if self.top_k < 0:
            raise HerbensError("top-k must be >= 0")
        return self

    @property
    def needs_val(self) -> bool:
        """Whether anything is fitted on validation (then every run needs labelled val logits)."""
        return (self.calibrate or self.weights == "fit" or self.tau == "fit" or self.hierarchy == "fit")


def auto_chunk_rows(num_classes: int) -> int:
    """Rows per chunk holding about CHUNK_ELEMENTS values per run and level."""
    return int(np.clip(CHUNK_ELEMENTS // max(num_classes, 1), 16, 65536))


def _one_of(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise HerbensError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def _numbers(name: str, values, count: int) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise HerbensError(f"{name} must be {count} number(s), not {values!r}") from None
    if len(out) != count or not np.isfinite(out).all():
        raise HerbensError(f"{name} must be {count} finite number(s), not {values!r}")
    return out


def _given_weights(weights, num_runs: int) -> tuple[float, ...]:
    try:
        values = np.asarray([float(w) for w in weights], dtype=np.float64)
    except (TypeError, ValueError):
        raise HerbensError(f"weights must be equal, fit or numbers, not {weights!r}") from None
    if len(values) != num_runs:
        raise HerbensError(f"{len(values)} weights given for {num_runs} runs")
    if (values < 0).any() or not np.isfinite(values).all() or values.sum() <= 0:
        raise HerbensError(f"weights must be finite, >= 0 and not all 0, got {values.tolist()}")
    return tuple((values / values.sum()).tolist())


# ----------------------------------------------------------------------------------------
# Runs and their class columns
# ----------------------------------------------------------------------------------------
@dataclass
class Run:
    """One run directory: its taxonomy, its logits splits, and its columns in the ensemble.

    ``columns[level]`` lists, for each ensemble class of that level, the column of this run's
    matrix holding it (None: identical order, no re-indexing needed).
    """

    name: str
    path: Path
    taxonomy: Taxonomy
    splits: dict[str, LogitsSplit]
    columns: dict[str, np.ndarray | None] = field(default_factory=dict)


def load_runs(run_dirs: Sequence, splits: Sequence[str] = ("test", "val")) -> list[Run]:
    """Open every run's taxonomy and logits; ``test`` is required, other splits optional.

    Raises:
        HerbensError: naming the run for a missing taxonomy, a missing test split, or any
            problem :func:`herbens.logits.read_logits` finds (half-written directory, ...).
    """
    paths = [Path(d) for d in run_dirs]
    if not paths:
        raise HerbensError("no runs given to ensemble")
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise HerbensError(f"run '{paths[i]}' is given twice")
    names = [p.name for p in paths]
    runs = []
    for path in paths:
        if not (path / "taxonomy.json").exists():
            raise HerbensError(f"run '{path}': not a run directory (no taxonomy.json)")
        taxonomy = Taxonomy.load(path / "taxonomy.json")
        opened = {}
        for split in splits:
            if split == "test" or logits_dir(path, split).exists():
                opened[split] = read_logits(path, split, taxonomy=taxonomy)
        name = path.name if names.count(path.name) == 1 else str(path)
        runs.append(Run(name, path, taxonomy, opened))
    return runs


@dataclass
class ClassSpace:
    """The ensemble's classes: a subset of the first run's taxonomy, in its order.

    Attributes:
        taxonomy: the first run's taxonomy (the output's class order and category_ids).
        species: its species index for each ensemble column (all of them unless aligning by
            category drops species some run lacks).
        genus_of, family_of: ensemble genus/family column of each ensemble species column.
        log_prior: log training frequency of each ensemble species (counts clamped to 1).
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

    @property
    def num_classes(self) -> int:
        return len(self.species)

    def category_ids(self, columns: np.ndarray) -> np.ndarray:
        """Kaggle category_ids of ensemble species columns."""
        return self.taxonomy.category_of(self.species[columns])


def class_space(runs: list[Run], align_by_category: bool = False, log: Callable = print) -> ClassSpace:
    """Check that the runs' classes line up (or align them) and set each run's columns.

    Without ``align_by_category`` every taxonomy hash must equal the first run's. With it, the
    columns are matched by ``category_id``: the ensemble keeps the species all runs share (in the
    first run's order), provided each shared category has the same name, genus and family
    everywhere; genus and family heads are matched by name.
    """
    ref = runs[0].taxonomy
    if not align_by_category:
        for run in runs[1:]:
            if run.taxonomy.hash != ref.hash:
                raise HerbensError(
                    f"run '{run.path}': taxonomy {run.taxonomy.hash} differs from run '{runs[0].path}' "
                    f"({ref.hash}); its class columns do not line up (pass --align-by-category to "
                    "match them by category_id)")
        for run in runs:
            run.columns = {level: None for level in LEVELS}
        return _space(ref, np.arange(ref.num_classes("species")), ref.species_to_genus,
                      ref.species_to_family, {})
    return _aligned_space(runs, log)


def _space(ref: Taxonomy, species: np.ndarray, genus_of: np.ndarray, family_of: np.ndarray,
           dropped: dict) -> ClassSpace:
    counts = np.maximum(ref.counts[species], 1).astype(np.float64)
    log_prior = np.log(counts / counts.sum()).astype(np.float32)
    label_column = np.full(ref.num_classes("species"), -1, dtype=np.int64)
    label_column[species] = np.arange(len(species))
    return ClassSpace(ref, species, np.asarray(genus_of), np.asarray(family_of), log_prior,
                      label_column, dropped)


def _species_key(tax: Taxonomy, i: int) -> tuple[str, str, str]:
    return (tax.species_names[i], tax.genus_names[tax.species_to_genus[i]],
            tax.family_names[tax.species_to_family[i]])


def _aligned_space(runs: list[Run], log: Callable) -> ClassSpace:
    ref = runs[0].taxonomy
    index = [{int(c): i for i, c in enumerate(run.taxonomy.category_ids)} for run in runs]
    shared = [i for i, c in enumerate(ref.category_ids) if all(int(c) in ix for ix in index[1:])]
    if not shared:
        raise HerbensError(f"run '{runs[1].path}' shares no category_id with run '{runs[0].path}': "
                           "nothing to align")
    for run, ix in zip(runs[1:], index[1:]):
        for i in shared:
            cid = int(ref.category_ids[i])
            mine, theirs = _species_key(ref, i), _species_key(run.taxonomy, ix[cid])
            if mine != theirs:
                raise HerbensError(
                    f"run '{run.path}': category_id {cid} is {theirs[0]!r} ({theirs[1]}, {theirs[2]}) but "
                    f"{mine[0]!r} ({mine[1]}, {mine[2]}) in run '{runs[0].path}'; cannot align by category")
    species = np.asarray(shared, dtype=np.int64)
    genera = np.unique(ref.species_to_genus[species])
    families = np.unique(ref.species_to_family[species])
    for run, ix in zip(runs, index):
        tax = run.taxonomy
        genus_at = {name: i for i, name in enumerate(tax.genus_names)}
        family_at = {name: i for i, name in enumerate(tax.family_names)}
        run.columns = {
            "species": _maybe_identity(np.array([ix[int(c)] for c in ref.category_ids[species]]), tax, "species"),
            "genus": _maybe_identity(np.array([genus_at[ref.genus_names[g]] for g in genera]), tax, "genus"),
            "family": _maybe_identity(np.array([family_at[ref.family_names[f]] for f in families]), tax, "family"),
        }
    dropped = {run.name: int(run.taxonomy.num_classes("species") - len(species)) for run in runs}
    if any(dropped.values()):
        log(f"align by category: {len(species)} species shared by all runs; dropped per run: "
            + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    return _space(ref, species, np.searchsorted(genera, ref.species_to_genus[species]),
                  np.searchsorted(families, ref.species_to_family[species]), dropped)


def _maybe_identity(columns: np.ndarray, tax: Taxonomy, level: str) -> np.ndarray | None:
    columns = columns.astype(np.int64)
    if len(columns) == tax.num_classes(level) and (columns == np.arange(len(columns))).all():
        return None
    return columns


# ----------------------------------------------------------------------------------------
# Row alignment and chunked reading
# ----------------------------------------------------------------------------------------
@dataclass
class Chunk:
    """Rows ``start:stop`` of an aligned split, as float32 per (run, level)."""

    start: int
    stop: int
    logits: dict[tuple[int, str], np.ndarray]
    views: dict[int, list[np.ndarray]]
    labels: np.ndarray | None
    label_columns: np.ndarray | None

    def get(self, run: int, level: str) -> np.ndarray:
        return self.logits[(run, level)]


class AlignedSplit:
    """One split across runs, rows in a common order (the first run's), found in each by id.

    Attributes:
        name: split name.
        runs: the runs.
        space: the ensemble's classes.
        image_ids: the common row order.
        rows: per run, the row of its matrices for each common row (None: same order).
        labels: reference species index per row (-1 unknown), or None.
    """

    def __init__(self, name: str, runs: list[Run], space: ClassSpace, image_ids: list[str],
                 rows: list[np.ndarray | None], labels: np.ndarray | None):
        self.name = name
        self.runs = runs
        self.space = space
        self.image_ids = image_ids
        self.rows = rows
        self.labels = labels
        self.label_columns = None if labels is None else np.where(labels >= 0, space.label_column[labels], -1)

    def __len__(self) -> int:
        return len(self.image_ids)

    def num_chunks(self, chunk_rows: int) -> int:
        return -(-len(self) // chunk_rows)

    def chunks(self, chunk_rows: int, *, runs: Sequence[int] | None = None,
               levels: Sequence[str] = ("species",), views: bool = False) -> Iterator[Chunk]:
        """Yield row chunks holding float32 logits of ``levels`` for ``runs`` (default all).

        With ``views``, each run's species per-view logits too (its species logits as a single
        view when it stored none). Every block read is checked for finiteness.
        """
        runs = range(len(self.runs)) if runs is None else runs
        for start in range(0, len(self), chunk_rows):
            stop = min(start + chunk_rows, len(self))
            logits = {(r, lv): self.read(r, lv, start, stop) for r in runs for lv in levels}
            per_view = {r: self.read_views(r, start, stop, logits.get((r, "species"))) for r in runs} if views else {}
            labels = None if self.labels is None else self.labels[start:stop]
            label_columns = None if self.label_columns is None else self.label_columns[start:stop]
            yield Chunk(start, stop, logits, per_view, labels, label_columns)

    def _split(self, r: int) -> LogitsSplit:
        return self.runs[r].splits[self.name]

    def _row_index(self, r: int, start: int, stop: int) -> slice | np.ndarray:
        rows = self.rows[r]
        if rows is None:
            return slice(start, stop)
        rows = rows[start:stop]
        if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            return slice(int(rows[0]), int(rows[-1]) + 1)  # contiguous: one sequential read
        return rows

    def read(self, r: int, level: str, start: int, stop: int) -> np.ndarray:
        """float32 ``[stop-start, C_level]`` of run ``r`` in ensemble row and column order."""
        split = self._split(r)
        block = _read_float32(split.level(level), self._row_index(r, start, stop), None,
                              self.runs[r].columns.get(level))
        return self._check_finite(block, r, level, start)

    def read_views(self, r: int, start: int, stop: int, species: np.ndarray | None) -> list[np.ndarray]:
        """Per-view species blocks of run ``r`` (its mean species logits when no views are stored)."""
        split = self._split(r)
        if not split.has_views("species"):
            return [species if species is not None else self.read(r, "species", start, stop)]
        arr = split.views("species")
        rows = self._row_index(r, start, stop)
        columns = self.runs[r].columns.get("species")
        return [self._check_finite(_read_float32(arr, rows, v, columns), r, f"species view {v}", start)
                for v in range(arr.shape[1])]

    def _check_finite(self, block: np.ndarray, r: int, what: str, start: int) -> np.ndarray:
        return check_finite(block, self._split(r).where, what, self.image_ids[start:start + len(block)])


def _read_float32(arr: np.ndarray, rows: slice | np.ndarray, view: int | None,
                  columns: np.ndarray | None) -> np.ndarray:
    """Rows (of one view, in ensemble column order) of a possibly memory-mapped float16 array,
    converted to float32."""
    if isinstance(rows, slice):
        source = arr[rows] if view is None else arr[rows, view]  # still a view of the mapping
        if columns is not None:
            source = source[:, columns]
        block = np.empty(source.shape, np.float32)
        block[...] = source  # converts while reading the mapping: no float16 copy
    else:
        # Sorted reads touch each page once and in file order; then restore the wanted order.
        order = np.argsort(rows, kind="stable")
        picked = arr[rows[order]] if view is None else arr[rows[order], view]
        if columns is not None:
            picked = picked[:, columns]
        block = np.empty(picked.shape, np.float32)
        block[order] = picked
    _release_pages(arr)
    return block


def _release_pages(arr: np.ndarray) -> None:
    # A memory-mapped file's pages count as this process's resident memory until unmapped;
    # dropping them (clean, file-backed: the page cache keeps them) keeps RSS at one chunk.
    handle = getattr(arr, "_mmap", None)
    if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            handle.madvise(mmap.MADV_DONTNEED)
        except (ValueError, OSError):
            pass


def align_split(runs: list[Run], split: str, space: ClassSpace, *, exact: bool = True,
                log: Callable = print) -> AlignedSplit:
    """Align ``split`` of all runs by image id onto the first run's row order.

    Args:
        exact: every run must list the same image ids (test); otherwise (validation, where runs
            may hold out different images) the images common to all runs are used.

    Raises:
        HerbensError: naming the run whose ids differ (exact), or when no image is common.
    """
    for run in runs:
        if split not in run.splits:
            raise HerbensError(f"run '{run.path}': no logits for split '{split}' "
                               f"({logits_dir(run.path, split)} is missing)")
    first = runs[0].splits[split].image_ids
    ids = first if exact else _common_ids(runs, split, log)
    for run in runs[1:]:
        if exact:
            _check_same_ids(runs[0], run, split)
    rows = [_rows_of(run.splits[split].image_ids, ids) for run in runs]
    labels = _labels(runs, split, rows, space, ids)
    return AlignedSplit(split, runs, space, ids, rows, labels)


def _check_same_ids(first: Run, run: Run, split: str) -> None:
    mine, theirs = set(first.splits[split].image_ids), set(run.splits[split].image_ids)
    if mine == theirs:
        return
    missing, extra = sorted(mine - theirs), sorted(theirs - mine)
    detail = []
    if missing:
        detail.append(f"{len(missing)} missing (e.g. {', '.join(map(repr, missing[:3]))})")
    if extra:
        detail.append(f"{len(extra)} extra (e.g. {', '.join(map(repr, extra[:3]))})")
    raise HerbensError(f"run '{run.path}': its {split} image ids differ from run '{first.path}': "
                       + "; ".join(detail))


def _common_ids(runs: list[Run], split: str, log: Callable) -> list[str]:
    common = set(runs[0].splits[split].image_ids)
    for run in runs[1:]:
        common &= set(run.splits[split].image_ids)
    ids = [i for i in runs[0].splits[split].image_ids if i in common]
    if not ids:
        raise HerbensError(f"runs share no {split} image: their {split} splits are disjoint")
    largest = max(len(run.splits[split].image_ids) for run in runs)
    if len(ids) < largest:
        log(f"{split}: runs list different images; using the {len(ids)} common to all runs")
    return ids


def _rows_of(run_ids: list[str], ids: list[str]) -> np.ndarray | None:
    if run_ids == ids:
        return None
    position = {image_id: k for k, image_id in enumerate(run_ids)}
    return np.fromiter((position[i] for i in ids), dtype=np.int64, count=len(ids))


def _labels(runs: list[Run], split: str, rows: list, space: ClassSpace, ids: list[str]) -> np.ndarray | None:
    """Reference species index per row from every run that stored labels; they must agree."""
    ref = space.taxonomy
    out = None
    for run, run_rows in zip(runs, rows):
        stored = run.splits[split].labels
        if stored is None:
            continue
        labels = stored if run_rows is None else stored[run_rows]
        if run.taxonomy.hash != ref.hash:
            labels = _to_reference(labels, run.taxonomy, ref)
        if out is None:
            out = labels.copy()
            continue
        clash = (out >= 0) & (labels >= 0) & (out != labels)
        if clash.any():
            k = int(np.argmax(clash))
            raise HerbensError(f"run '{run.path}': {split} label of image {ids[k]!r} is "
                               f"{ref.species_names[labels[k]]!r} but {ref.species_names[out[k]]!r} "
                               f"in run '{runs[0].path}'")
        out = np.where(out >= 0, out, labels)
    return out


def _to_reference(labels: np.ndarray, tax: Taxonomy, ref: Taxonomy) -> np.ndarray:
    index = {int(c): i for i, c in enumerate(ref.category_ids)}
    out = np.full(len(labels), -1, dtype=np.int64)
    for k in np.flatnonzero(labels >= 0):
        out[k] = index.get(int(tax.category_ids[labels[k]]), -1)
    return out


def labelled(split: AlignedSplit) -> AlignedSplit:
    """The rows of ``split`` with a known label whose species is in the ensemble's label space."""
    keep = np.flatnonzero(split.labels >= 0)
    rows = [np.arange(len(split))[keep] if r is None else r[keep] for r in split.rows]
    return AlignedSplit(split.name, split.runs, split.space, [split.image_ids[k] for k in keep], rows,
                        split.labels[keep])


# ----------------------------------------------------------------------------------------
# Scores of one chunk
# ----------------------------------------------------------------------------------------
@dataclass
class Params:
    """Everything that turns the runs' logits into one species score per class.

    ``weights`` sum to 1; run r enters as ``weights[r] * scale / temperatures[r] * logits``
    (logit space) or as the mixture ``sum_r weights[r] * softmax(logits / temperatures[r])``
    (prob space, scores = its log). Then ``- tau * log(prior)`` and
    ``+ alpha * log p(genus of species) + beta * log p(family of species)``, from the
    combined genus/family heads. Vote mode ranks classes by top-``vote_k`` votes, ties broken
    by that score.
    """

    weights: np.ndarray
    temperatures: np.ndarray
    scale: float = 1.0
    space: str = "logit"
    tau: float = 0.0
    alpha: float = 0.0
    beta: float = 0.0
    mode: str = "mean"
    vote_k: int = 5

    def replace(self, **changes) -> "Params":
        return dataclasses.replace(self, **changes)

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
                "temperatures": [float(t) for t in self.temperatures], "scale": float(self.scale),
                "space": self.space, "tau": float(self.tau), "alpha": float(self.alpha),
                "beta": float(self.beta), "mode": self.mode, "vote_k": int(self.vote_k)}


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax (a new array)."""
    shifted = x - x.max(axis=1, keepdims=True)
    shifted -= np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return shifted


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax (a new array)."""
    e = x - x.max(axis=1, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=1, keepdims=True)
    return e


def run_factor(params: Params, r: int) -> np.float32:
    """Multiplier of run ``r``'s logits in logit space."""
    return np.float32(params.weights[r] * params.scale / params.temperatures[r])


def combine_level(chunk: Chunk, level: str, params: Params) -> np.ndarray:
    """Weighted, calibrated combination of the active runs' ``level`` logits (a new array)."""
    total, term = None, None
    for r in params.active_runs:
        if params.space == "logit":
            if total is None:
                total = chunk.get(r, level) * run_factor(params, r)
                continue
            term = np.multiply(chunk.get(r, level), run_factor(params, r), out=term)
        else:
            term = softmax(chunk.get(r, level) / np.float32(params.temperatures[r]))
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
    n, c = chunk.stop - chunk.start, space.num_classes
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


def predict_split(split: AlignedSplit, params: Params, chunk_rows: int, top_k: int = 0,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Stream a whole split: predicted ensemble column per row (and top-k columns/scores)."""
    from tqdm.auto import tqdm

    pred = np.empty(len(split), dtype=np.int64)
    top = np.empty((len(split), min(top_k, split.space.num_classes)), dtype=np.int64) if top_k else None
    top_scores = np.empty(top.shape, dtype=np.float32) if top_k else None
    chunks = split.chunks(chunk_rows, **needs_of([params]))
    for chunk in tqdm(chunks, total=split.num_chunks(chunk_rows), desc=f"ensemble {split.name}",
                      unit="chunk", disable=None if progress else True, leave=False):
        p, t, s = predict_chunk(chunk, params, split.space, top_k)
        pred[chunk.start:chunk.stop] = p
        if top_k:
            top[chunk.start:chunk.stop] = t
            top_scores[chunk.start:chunk.stop] = s
    return pred, top, top_scores


# ----------------------------------------------------------------------------------------
# The whole job
# ----------------------------------------------------------------------------------------
def ensemble_runs(run_dirs: Sequence, output: str | os.PathLike, *, weights="fit", weight_objective: str = "f1",
                  calibrate: bool = True, tau="fit", hierarchy="fit", mode: str = "mean", vote_k: int = 5,
                  space: str = "logit", top_k: int = 0, chunk_rows: int | None = None,
                  align_by_category: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Ensemble runs' stored logits into a Kaggle submission.

    Args:
        run_dirs: run directories (each with ``taxonomy.json`` and ``logits/test``; ``logits/val``
            with labels when anything is fitted).
        output: submission CSV; ``<stem>.json`` (the returned summary) and, with ``top_k``,
            ``<stem>.topk.csv`` are written beside it.
        weights: ``"fit"`` (on validation), ``"equal"``, or one number per run.
        weight_objective: ``"f1"`` (coordinate search on validation macro-F1) or ``"nll"``
            (scipy L-BFGS on validation log-loss, with an ensemble temperature).
        calibrate: fit a temperature per run by validation NLL.
        tau: inverse-frequency adjustment ``scores - tau * log(prior)``: ``"fit"``, ``"none"`` or a value.
        hierarchy: ``"fit"``, ``"none"`` or ``(alpha, beta)``.
        mode: ``"mean"`` or ``"vote"`` (top-``vote_k`` votes per run or per stored view).
        space: average ``"logit"`` s or ``"prob"`` abilities.
        top_k: also write the K best category_ids and scores per image.
        chunk_rows: rows per streamed chunk (memory: a few ``runs x chunk_rows x classes x 4``
            bytes); default: about 16 MB of float32 per run (270 rows at 15,501 classes).
        align_by_category: match class columns by category_id across different taxonomies.
        progress: show a progress bar over test chunks (on a terminal).
        log: where messages and the validation table go.

    Returns:
        The JSON summary: runs, fitted parameters, validation scores of every step, paths.
    """
    from herbens.ensemble import fit  # builds on this module's streaming primitives

    started = time.perf_counter()
    run_dirs = list(run_dirs)
    opts = EnsembleOptions(weights, weight_objective, calibrate, tau, hierarchy, mode, int(vote_k), space,
                           int(top_k), None if chunk_rows is None else int(chunk_rows), align_by_category)
    opts.check(len(run_dirs))
    prepare_outputs(_output_paths(Path(output)), log)
    runs = load_runs(run_dirs)
    warn_unverifiable_test(runs)
    unreadable = unreadable_record(runs)
    space_ = class_space(runs, align_by_category, log)
    if opts.chunk_rows is None:
        opts.chunk_rows = auto_chunk_rows(space_.num_classes)
    test = align_split(runs, "test", space_, exact=True, log=log)
    val = _validation(runs, space_, opts, log)
    levels = _shared_levels(runs, val is not None)
    params, steps = fit.fit_ensemble(val, space_, opts, levels, len(runs), log)
    if steps:
        log(format_table(steps, len(val)))
    pred, top, top_scores = predict_split(test, params, opts.chunk_rows, opts.top_k, progress)
    paths = _write_outputs(Path(output), test, space_, pred, top, top_scores)
    summary = _summary(paths, runs, space_, opts, params, steps, val, test, levels, started)
    summary["unreadable"] = unreadable  # fallback rows per run and split (see herbens.ensemble.integrity)
    write_json(paths["json"], summary)
    log(f"wrote {paths['submission']} ({len(test)} test images) and {paths['json']}")
    return summary


def _validation(runs: list[Run], space: ClassSpace, opts: EnsembleOptions, log: Callable) -> AlignedSplit | None:
    """The labelled validation rows common to all runs, or None when there are none to use."""
    missing = [run for run in runs if "val" not in run.splits]
    if missing:
        if opts.needs_val:
            raise HerbensError(f"run '{missing[0].path}': no logits for split 'val' "
                               f"({logits_dir(missing[0].path, 'val')} is missing), needed to fit the "
                               "ensemble (or pass --weights equal --no-calibrate --tau none --hierarchy none)")
        return None
    val = align_split(runs, "val", space, exact=False, log=log)
    forget_unreadable_labels(val)
    if val.labels is None or not (val.labels >= 0).any():
        if opts.needs_val:
            raise HerbensError(f"run '{runs[0].path}': logits/val carry no labels (labels.npy), needed to "
                               "fit the ensemble (or pass --weights equal --no-calibrate --tau none --hierarchy none)")
        return None
    return labelled(val)


def _shared_levels(runs: list[Run], with_val: bool) -> tuple[str, ...]:
    splits = ("test", "val") if with_val else ("test",)
    return tuple(lv for lv in LEVELS if all(lv in run.splits[s].levels for run in runs for s in splits))


def _output_paths(output: Path) -> dict[str, Path]:
    stem = output.with_suffix("") if output.suffix.lower() == ".csv" else output
    return {"submission": output, "json": stem.with_name(stem.name + ".json"),
            "topk": stem.with_name(stem.name + ".topk.csv")}


def _write_outputs(output: Path, test: AlignedSplit, space: ClassSpace, pred: np.ndarray,
                   top: np.ndarray | None, top_scores: np.ndarray | None) -> dict[str, Path]:
    paths = _output_paths(output)
    write_submission(output, test.image_ids, space.category_ids(pred))
    # Re-read what was written: the checks Kaggle applies, before anyone uploads it.
    read_submission(output, expected_ids=test.image_ids, valid_category_ids=space.taxonomy.category_ids)
    if top is not None:
        _write_topk(paths["topk"], test.image_ids, space.category_ids(top), top_scores)
    else:
        paths.pop("topk")
    return paths


def _write_topk(path: Path, ids: list[str], categories: np.ndarray, scores: np.ndarray) -> None:
    import pandas as pd

    k = categories.shape[1]
    frame = pd.DataFrame({"Id": ids})
    for j in range(k):
        frame[f"Predicted_{j + 1}"] = categories[:, j]
    for j in range(k):
        frame[f"Score_{j + 1}"] = scores[:, j]
    with atomic_write(path, newline="") as handle:
        frame.to_csv(handle, index=False, float_format="%.6g")


def format_table(steps: list[dict], images: int) -> str:
    """The validation table: each run, the plain average, then each step, kept or not."""
    head = f"{'validation (' + str(images) + ' images)':<44}{'species F1':>11}{'genus F1':>10}{'family F1':>11}" \
           f"{'sp. acc':>9}  kept"
    lines = [head, "-" * len(head)]
    for step in steps:
        kept = {True: "yes", False: "no", None: ""}[step["kept"]]
        lines.append(f"{step['step'][:43]:<44}{step['species_macro_f1']:>11.4f}{step['genus_macro_f1']:>10.4f}"
                     f"{step['family_macro_f1']:>11.4f}{step['species_accuracy']:>9.4f}  {kept}")
    return "\n".join(lines)


def _summary(paths: dict, runs: list[Run], space: ClassSpace, opts: EnsembleOptions, params: Params,
             steps: list[dict], val: AlignedSplit | None, test: AlignedSplit, levels, started: float) -> dict:
    final = next((s for s in reversed(steps) if s["step"] == "final"), None)
    return {
        "format_version": 1,
        "submission": str(paths["submission"]),
        "json": str(paths["json"]),
        "topk": str(paths["topk"]) if "topk" in paths else None,
        "runs": [{"name": run.name, "path": str(run.path), "taxonomy_hash": run.taxonomy.hash,
                  "model": run.splits["test"].meta.get("model", ""),
                  "views": run.splits["test"].meta.get("views", []),
                  "test_images": run.splits["test"].num_rows,
                  "val_images": run.splits["val"].num_rows if "val" in run.splits else 0} for run in runs],
        "taxonomy_hash": space.taxonomy.hash,
        "align_by_category": opts.align_by_category,
        "classes": space.num_classes,
        "dropped_species": space.dropped,
        "levels": list(levels),
        "mode": params.mode,
        "vote_k": params.vote_k if params.mode == "vote" else None,
        "space": params.space,
        "weights": [float(w) for w in params.weights],
        "temperatures": [float(t) for t in params.temperatures],
        "ensemble_scale": float(params.scale),
        "tau": float(params.tau),
        "alpha": float(params.alpha),
        "beta": float(params.beta),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(opts).items()},
        "val": None if val is None else {"images": len(val), "scores": final and {
            k: v for k, v in final.items() if k.endswith(("_macro_f1", "_accuracy"))}},
        "steps": steps,
        "test": {"images": len(test)},
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
