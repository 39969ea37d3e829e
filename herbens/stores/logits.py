"""The logits store: the contract between a trained run and the ensembler.

A run's inference writes, per split, ``runs/<name>/logits/<split>/``:

- ``<level>.npy``: float16 scores, rows = images, columns = the taxonomy's class order;
- ``<level>.views.npy`` (optional): float16 per-view scores ``[N, V, C]`` (test-time
  augmentation views), kept for analysis and vote-mode ensembling;
- ``image_ids.json``: the row order (list of str);
- ``labels.npy`` (optional): int64 species index per row, -1 where unknown (test);
- ``meta.json``: the :class:`~herbens.stores.description.LogitsDescription` (``kind: logits``,
  taxonomy hash, ``levels``, ``views`` and ``tta_space``, ``ids`` count and digest,
  ``unreadable`` rows, ...).

``views`` and ``tta_space`` are the one record of which test-time views produced the split:
the ensembler refuses a run whose val and test splits differ in them, and ``herbens export``
gives each bundle member the views of the validation split the ensemble was fitted on.
``unreadable`` lists the images that could not be decoded; their rows hold the documented
fallback (``prior``: the training log-prior of each level), never another image's scores.

The checks and the block writer are the stores kernel's (:mod:`herbens.stores.kernel`,
:mod:`herbens.stores.writer`); every consumer passes each block of values it reads through
:func:`check_finite`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from herbens.data.taxonomy import LEVELS
from herbens.core.errors import HerbensError
from herbens.stores.description import FLOAT16, UNREADABLE_FALLBACKS, LogitsDescription, UnreadableRecord
# check_finite, format_ids and release_pages are part of this module's interface for its consumers.
from herbens.stores.kernel import check_finite, format_ids, open_store, release_pages  # noqa: F401
from herbens.stores.writer import BlockWriter, check_labels, new_description, publish_store

DTYPE = FLOAT16


class LogitsRecordWarning(UserWarning):
    """A logits store's record says something every consumer must pass on to the user."""


class UnreadableRowsWarning(LogitsRecordWarning):
    """A logits split holds fallback rows for images that could not be decoded."""


def logits_dir(run_dir: str | os.PathLike, split: str) -> Path:
    """Directory holding one split's logits inside a run directory."""
    return Path(run_dir) / "logits" / split


def _where(run_dir, split: str) -> str:
    return f"run '{run_dir}', split '{split}'"


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
        description: the typed ``meta.json`` (views, tta_space, shapes, records).
        meta: the ``meta.json`` object as stored.
        labels: int64 species index per row (-1 unknown), or None when not stored.
        unreadable: ids of the rows whose image could not be decoded (they hold the fallback
            named by ``description.unreadable.fallback``), in row order; empty when none.
    """

    def __init__(self, run_dir: Path, split: str, path: Path, image_ids: list[str],
                 description: LogitsDescription, meta: dict, arrays: dict[str, np.ndarray],
                 labels: np.ndarray | None):
        self.run_dir, self.split, self.path = run_dir, split, path
        self.image_ids, self.description, self.meta, self.labels = image_ids, description, meta, labels
        self.unreadable: list[str] = list(description.unreadable.ids) if description.unreadable else []
        self._arrays = {lv: arrays[lv] for lv in LEVELS if lv in arrays}
        self._views = {lv: arrays[f"{lv}.views"] for lv in LEVELS if f"{lv}.views" in arrays}

    @property
    def levels(self) -> tuple[str, ...]:
        """Levels stored, in LEVELS order."""
        return tuple(self._arrays)

    @property
    def num_rows(self) -> int:
        return len(self.image_ids)

    @property
    def where(self) -> str:
        """How error messages name this split: the run and the split."""
        return _where(self.run_dir, self.split)

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
            warnings.warn(f"{self.where}: {len(self.unreadable)} image(s) were unreadable at inference; "
                          f"their rows hold the '{self.description.unreadable.fallback}' fallback, not a "
                          f"prediction: {format_ids(self.unreadable)}", UnreadableRowsWarning, stacklevel=2)

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
                taxonomy=None) -> LogitsSplit:
    """Open and check one split's logits (:func:`herbens.stores.kernel.open_store`).

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
    files = open_store(logits_dir(run_dir, split), _where(run_dir, split), split, LogitsDescription,
                       mmap=mmap, taxonomy=taxonomy)
    return LogitsSplit(run_dir, split, files.path, files.image_ids, files.description, files.meta,
                       files.arrays, files.labels)


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
class LogitsWriter(BlockWriter):
    """Fills one split's matrices block by block inside a temporary directory.

    Obtained from :func:`open_logits_writer`; inference writes each batch as it comes so that
    the full matrix never has to sit in memory.
    """

    def __init__(self, tmp: Path, where: str, num_rows: int, files: Mapping, image_ids: list[str]):
        super().__init__(tmp, where, num_rows, files)
        self.image_ids = image_ids
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
        self.put(level, start, block)

    def write_views(self, level: str, start: int, block: np.ndarray) -> None:
        """Store per-view rows (``block`` is ``[n, V, C]``) of ``level``."""
        self.put(f"{level}.views", start, block)

    def described(self, description: LogitsDescription) -> LogitsDescription:
        if not self.unreadable_rows:
            return description
        ids = self.image_ids
        record = UnreadableRecord(ids=[ids[r] for r in sorted(self.unreadable_rows)], fallback=self.fallback)
        return description.model_copy(update={"unreadable": record})


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
        meta: caller's metadata; must hold ``taxonomy_hash``; may hold ``model``, ``views`` (the
            test-time view names), ``tta_space``, and ``view_rows`` (one name per per-view row;
            default: ``views`` when they match ``num_views``).
        labels: optional species index per row (-1 unknown), stored as ``labels.npy``.
        num_views: V for per-view matrices (with ``view_levels``).
        view_levels: levels whose per-view ``[N, V, C]`` matrices will be written.

    Raises:
        HerbensError: on bad arguments, a block that does not fit, non-finite values, rows
            never written. Nothing is published then, and an older complete split is kept.
    """
    where = _where(run_dir, split)
    ids = [str(i) for i in image_ids]
    description = _describe(meta, split, ids, columns, num_views, view_levels, labels is not None, where)
    label_array = check_labels(labels, len(ids), columns["species"], where)
    with publish_store(logits_dir(run_dir, split), where, ids, description, label_array, LogitsWriter,
                       image_ids=ids) as writer:
        yield writer


def _describe(meta: Mapping, split: str, ids: list[str], columns: Mapping[str, int], num_views: int,
              view_levels: Sequence[str], has_labels: bool, where: str) -> LogitsDescription:
    if "species" not in columns:
        raise HerbensError(f"{where}: species logits are required")
    unknown = [lv for lv in (*columns, *view_levels) if lv not in LEVELS]
    if unknown:
        raise HerbensError(f"{where}: unknown level(s) {unknown}; expected {', '.join(LEVELS)}")
    if view_levels and num_views < 1:
        raise HerbensError(f"{where}: view_levels given without num_views")
    if not set(view_levels) <= set(columns):
        raise HerbensError(f"{where}: per-view levels {list(view_levels)} must also have logits")
    views = list(meta.get("views") or []) if isinstance(meta, Mapping) else []
    fields = {"views": views or [f"view{v}" for v in range(num_views)],
              "levels": {lv: [len(ids), int(columns[lv])] for lv in LEVELS if lv in columns},
              "labels": has_labels, "view_levels": None, "view_rows": None}
    if view_levels:
        rows = list(meta.get("view_rows") or views or fields["views"])
        if len(rows) != num_views:
            raise HerbensError(f"{where}: meta lists {len(rows)} views but the logits have {num_views}")
        fields["view_rows"] = rows
        fields["view_levels"] = {lv: [len(ids), num_views, int(columns[lv])] for lv in LEVELS if lv in view_levels}
    return new_description(LogitsDescription, meta, split, ids, where, **fields)


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
        meta: must hold ``taxonomy_hash``; ``model``, ``views`` and ``tta_space`` are recorded.
        labels: optional int species index per row (-1 unknown) -> ``labels.npy``; the
            ensembler fits its weights, temperatures and post-processing on labelled val rows.
        keep_views: with ``[N, V, C]`` inputs, also store ``<level>.views.npy``.
        chunk_rows: rows converted per block (bounds the writer's memory).

    Returns:
        The ``logits/<split>`` directory.
    """
    # np.asarray leaves memmaps and arrays untouched (no copy); lists become arrays.
    arrays = {lv: np.asarray(a) for lv, a in logits.items()}
    where = _where(run_dir, split)
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
