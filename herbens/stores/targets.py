"""Sparse teacher targets: per image and level, the top-K classes and the mass left over.

Dense fp16 teacher logits for the training split of NAFlora-1M are 26 GB per level and run
(839,772 x 15,501 x 2 bytes); the few classes that carry almost all of a teacher's probability
are enough to distil from (Shen & Xing 2021; ReLabel, Yun et al. 2021). A run (or a teacher
pseudo-run) holds ``targets/<split>/``:

- ``<level>.classes.npy``: int32 ``[N, K]`` class indices, most probable first;
- ``<level>.logp.npy``: float32 ``[N, K]`` their log-probabilities under the teacher;
- ``<level>.rest.npy``: float32 ``[N]`` the probability mass of every other class together;
- ``image_ids.json`` and ``meta.json`` (taxonomy hash, split, per-level shapes, the teacher).

It is a thin layer on the stores kernel (:mod:`herbens.stores.kernel`, :mod:`herbens.stores.writer`):
written block by block into a temporary directory that is renamed into place, read
memory-mapped, every file checked against its description (``kind: sparse_targets``, shapes,
ids and their digest, taxonomy) on reading.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from herbens.data.taxonomy import LEVELS
from herbens.core.errors import HerbensError
from herbens.stores.description import TARGET_ARRAYS, TargetsDescription
from herbens.stores.kernel import open_store
from herbens.stores.writer import BlockWriter, new_description, publish_store

# Zero-probability classes (log 0 = -inf) are stored at float32's smallest normal log instead.
LOG_TINY = np.float32(np.log(np.finfo(np.float32).tiny))


def targets_dir(run_dir: str | os.PathLike, split: str) -> Path:
    """Directory holding one split's sparse targets inside a run directory."""
    return Path(run_dir) / "targets" / split


def sparsify(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` classes of each row of log-probabilities, and the mass of the others.

    Args:
        log_probs: ``[n, C]`` log-probabilities (each row's exp sums to 1).
        k: classes kept per row (clamped to C).

    Returns:
        ``(classes int32 [n, k], logp float32 [n, k], rest float32 [n])``, classes ordered by
        decreasing probability (ties: lower index first); ``rest = 1 - sum(exp(logp))`` >= 0.
    """
    log_probs = np.asarray(log_probs, dtype=np.float32)
    n, c = log_probs.shape
    k = min(int(k), c)
    top = np.argpartition(-log_probs, k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
    values = np.take_along_axis(log_probs, top, axis=1)
    order = np.lexsort((top, -values), axis=1)
    classes = np.take_along_axis(top, order, axis=1).astype(np.int32)
    logp = np.maximum(np.take_along_axis(values, order, axis=1), LOG_TINY)  # NaN stays NaN
    kept = np.exp(logp.astype(np.float64)).sum(axis=1)
    rest = np.clip(1.0 - kept, 0.0, 1.0).astype(np.float32)
    return classes, logp, rest


class SparseTargets:
    """One level of one split: memory-mapped ``classes``, ``logp`` and ``rest``."""

    def __init__(self, classes: np.ndarray, logp: np.ndarray, rest: np.ndarray, num_classes: int):
        self.classes, self.logp, self.rest = classes, logp, rest
        self.num_classes = int(num_classes)

    def rows(self, rows: np.ndarray | Sequence[int] | int) -> dict[str, np.ndarray]:
        """Copies of the given rows: ``{"classes", "logp", "rest"}``."""
        return {"classes": np.asarray(self.classes[rows], dtype=np.int64),
                "logp": np.array(self.logp[rows], dtype=np.float32),
                "rest": np.array(self.rest[rows], dtype=np.float32)}


class TargetsSplit:
    """One split's sparse targets, checked and memory-mapped.

    Attributes:
        run_dir: the (pseudo-)run directory.
        split: split name.
        image_ids: row order, list of unique str.
        description: the typed ``meta.json``; meta: the object as stored.
    """

    def __init__(self, run_dir: Path, split: str, image_ids: list[str], description: TargetsDescription,
                 meta: dict, levels: dict[str, SparseTargets]):
        self.run_dir, self.split, self.image_ids = run_dir, split, image_ids
        self.description, self.meta = description, meta
        self._levels = levels

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(level for level in LEVELS if level in self._levels)

    @property
    def where(self) -> str:
        return f"targets of '{self.run_dir}', split '{self.split}'"

    def level(self, name: str) -> SparseTargets:
        if name not in self._levels:
            raise HerbensError(f"{self.where}: no '{name}' targets (stored: {', '.join(self.levels)})")
        return self._levels[name]

    def rows_of(self, image_ids: Sequence[str]) -> np.ndarray:
        """Row of each image id; HerbensError naming the ids the teacher never predicted."""
        position = {image_id: row for row, image_id in enumerate(self.image_ids)}
        rows = np.fromiter((position.get(str(i), -1) for i in image_ids), dtype=np.int64, count=len(image_ids))
        missing = [str(i) for i, r in zip(image_ids, rows) if r < 0]
        if missing:
            raise HerbensError(f"{self.where}: {len(missing)} of {len(rows)} training images have no teacher "
                               f"targets (e.g. {', '.join(missing[:3])}): the student must train on the images "
                               "the teacher predicted (same data.root, split and limit_train)")
        return rows


def read_targets(run_dir: str | os.PathLike, split: str, *, taxonomy=None, check_values: bool = True) -> TargetsSplit:
    """Open and check one split's sparse targets (:func:`herbens.stores.kernel.open_store`).

    Args:
        run_dir: directory holding ``targets/<split>/``.
        split: split name (``train`` for distillation).
        taxonomy: when given, the stored taxonomy hash and class counts must match it.
        check_values: also read every value once (indices in range, finite); a loader worker
            reopening a store its trainer already checked skips this.

    Raises:
        HerbensError: naming the directory and the problem (missing or half-written store,
            shapes that disagree with meta.json, truncated files, indices out of range,
            non-finite values, another taxonomy).
    """
    run_dir = Path(run_dir)
    where = f"targets of '{run_dir}', split '{split}'"
    files = open_store(targets_dir(run_dir, split), where, split, TargetsDescription, taxonomy=taxonomy,
                       absent=": write them with `herbens teach`")
    levels = {}
    for level, spec in files.description.levels.items():
        arrays = {name: files.arrays[f"{level}.{name}"] for name in TARGET_ARRAYS}
        if check_values:
            _check_values(arrays, spec.classes, f"{where}, level {level}")
        levels[level] = SparseTargets(arrays["classes"], arrays["logp"], arrays["rest"], spec.classes)
    return TargetsSplit(run_dir, split, files.image_ids, files.description, files.meta, levels)


def _check_values(arrays: dict[str, np.ndarray], num_classes: int, where: str) -> None:
    """Indices in range and finite log-probabilities: a few bytes per image, read in full once."""
    classes = arrays["classes"]
    if classes.size and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise HerbensError(f"{where}: class indices outside 0..{num_classes - 1}")
    for name in ("logp", "rest"):
        finite = np.isfinite(arrays[name])
        if not finite.all():
            row = int(np.argmin(finite.reshape(len(finite), -1).all(axis=1)))
            raise HerbensError(f"{where}: {name} is not finite at row {row}")


class TargetsWriter(BlockWriter):
    """Fills one split's sparse targets block by block; obtained from :func:`open_targets_writer`."""

    def __init__(self, tmp: Path, where: str, num_rows: int, files: Mapping, shapes: Mapping[str, tuple[int, int]]):
        super().__init__(tmp, where, num_rows, files)
        self._shapes = dict(shapes)

    def write(self, level: str, start: int, log_probs: np.ndarray) -> None:
        """Sparsify rows ``start:start+n`` of ``level``'s log-probabilities ``[n, C]`` and store them."""
        if level not in self._shapes:
            raise HerbensError(f"{self._where}: no '{level}' targets were declared for this writer")
        k, num_classes = self._shapes[level]
        log_probs = np.asarray(log_probs, dtype=np.float32)
        if log_probs.ndim != 2 or log_probs.shape[1] != num_classes or start < 0 or start + len(log_probs) > self.num_rows:
            raise HerbensError(f"{self._where}: {level} block of shape {log_probs.shape} at row {start} does not "
                               f"fit {self.num_rows} rows x {num_classes} classes")
        classes, logp, rest = sparsify(log_probs, k)
        if not np.isfinite(logp).all():
            bad = start + int(np.argmin(np.isfinite(logp).all(axis=1)))
            raise HerbensError(f"{self._where}: {level} teacher log-probabilities are not finite at row {bad}")
        for name, block in (("classes", classes), ("logp", logp), ("rest", rest)):
            self.put(f"{level}.{name}", start, block)


@contextlib.contextmanager
def open_targets_writer(run_dir: str | os.PathLike, split: str, image_ids: Sequence,
                        levels: Mapping[str, tuple[int, int]], meta: Mapping) -> Iterator[TargetsWriter]:
    """Context manager yielding a :class:`TargetsWriter`; the split appears only on success.

    Args:
        run_dir: directory that receives ``targets/<split>/``.
        split: split name.
        image_ids: row order (converted to str; unique).
        levels: level -> ``(k, num_classes)``.
        meta: must hold ``taxonomy_hash``; anything else (the teacher's description) is kept.
    """
    where = f"targets of '{run_dir}', split '{split}'"
    ids = [str(i) for i in image_ids]
    shapes = {level: (min(int(k), int(c)), int(c)) for level, (k, c) in levels.items()}
    if any(level not in LEVELS for level in shapes) or not shapes or any(k < 1 for k, _ in shapes.values()):
        raise HerbensError(f"{where}: levels must be some of {', '.join(LEVELS)} with k >= 1, got {dict(levels)}")
    description = new_description(TargetsDescription, meta, split, ids, where,
                                  levels={lv: {"k": k, "classes": c} for lv, (k, c) in shapes.items()})
    with publish_store(targets_dir(run_dir, split), where, ids, description, None, TargetsWriter,
                       shapes=shapes) as writer:
        yield writer


class TeacherRows:
    """The teacher targets of a training dataset's rows, for its ``__getitem__``.

    Picklable into DataLoader workers: only the path and the row map travel; each process
    memory-maps the (already checked) store itself on first use.

    Args:
        run_dir: directory holding ``targets/train/``.
        rows: store row of each dataset row (:meth:`TargetsSplit.rows_of`).
        levels: the levels to distil.
    """

    def __init__(self, run_dir: str | os.PathLike, rows: np.ndarray, levels: Sequence[str]):
        self.run_dir = Path(run_dir)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.levels = tuple(levels)
        self._store: TargetsSplit | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """``{"teacher.<level>.classes" | ".logp" | ".rest": array}`` of dataset row ``index``."""
        if self._store is None:
            self._store = read_targets(self.run_dir, "train", check_values=False)
        out = {}
        for level in self.levels:
            for name, value in self._store.level(level).rows(int(self.rows[index])).items():
                out[f"teacher.{level}.{name}"] = value
        return out


def teacher_for_training(distill_cfg: dict, train_frame, taxonomy, levels: Sequence[str]):
    """The teacher of a student run (or None): its rows for ``train_frame`` and the loss options.

    Checked before any training: the store exists, has the run's taxonomy, and holds every
    training image of the student (by image id, so row order does not matter).

    Returns:
        ``(TeacherRows, {"levels", "alpha", "temperature", "class_balanced_beta"})``; ``(None, options)``
        with ``distill.online`` (every recipe level: the online teacher predicts them all); ``(None,
        None)`` when ``distill.teacher`` is null.
    """
    if not distill_cfg.get("teacher"):
        return None, None
    options = {"alpha": float(distill_cfg["alpha"]), "temperature": float(distill_cfg["temperature"]),
               "class_balanced_beta": distill_cfg.get("class_balanced_beta")}
    if distill_cfg.get("online"):  # the targets come from the teacher in each step (herbens.training.teacher)
        return None, {"levels": list(levels), **options}
    store = read_targets(distill_cfg["teacher"], "train", taxonomy=taxonomy)
    shared = [level for level in levels if level in store.levels]
    if not shared:
        raise HerbensError(f"distill.teacher {distill_cfg['teacher']}: its targets cover {', '.join(store.levels)}, "
                           f"none of this recipe's levels ({', '.join(levels)})")
    rows = store.rows_of(train_frame["image_id"].astype(str).tolist())
    return TeacherRows(distill_cfg["teacher"], rows, shared), {"levels": shared, **options}
