"""Reading and aligning the runs' stores: taxonomies, class columns, row order, chunked reads.

Every run's ``taxonomy.json`` and ``logits/{val,test}`` are opened and checked (taxonomy
hashes, image-id sets, shapes; values are checked chunk by chunk as they are read). Rows are
aligned by image id onto the first run's order, columns onto the first run's class order
(optionally by ``category_id`` across different taxonomies).

Memory holds one row chunk per run (per stored view in vote mode), never a whole matrix: the
matrices are memory-mapped, and the pages of each chunk are handed back to the kernel once
read, so that even the resident page cache of the mappings stays at one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from herbens.data.taxonomy import LEVELS, Taxonomy
from herbens.ensemble.combine import Chunk, ClassSpace
from herbens.core.errors import HerbensError
from herbens.stores.logits import LogitsSplit, check_finite, logits_dir, read_logits, release_pages

# Default chunk: about 16 MB of float32 per run and level (270 rows at 15,501 classes). Small
# enough for the allocator to reuse freed blocks instead of faulting in fresh pages each
# chunk, large enough that per-chunk Python overhead is negligible.
CHUNK_ELEMENTS = 1 << 22


def auto_chunk_rows(num_classes: int) -> int:
    """Rows per chunk holding about CHUNK_ELEMENTS values per run and level."""
    return int(np.clip(CHUNK_ELEMENTS // max(num_classes, 1), 16, 65536))


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
        HerbensError: naming the run for a missing taxonomy, a missing test split, val and test
            splits made with other test-time views (:func:`check_same_views`), or any problem
            :func:`herbens.stores.logits.read_logits` finds (half-written directory, ...).
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
        taxonomy = Taxonomy.of_run(path)
        opened = {}
        for split in splits:
            if split == "test" or logits_dir(path, split).exists():
                opened[split] = read_logits(path, split, taxonomy=taxonomy)
        if "val" in opened and "test" in opened:
            check_same_views(opened["val"], opened["test"])
        name = path.name if names.count(path.name) == 1 else str(path)
        runs.append(Run(name, path, taxonomy, opened))
    return runs


def check_same_views(val: LogitsSplit, test: LogitsSplit) -> None:
    """Refuse a run whose val and test logits were made with other test-time views.

    The temperatures, weights and thresholds fitted on val rows are only valid for test rows
    scored the same way (the views and how they were averaged, ``tta_space``).
    """
    made = [(split.description.views, split.description.tta_space) for split in (val, test)]
    if made[0] != made[1]:
        (val_views, val_space), (test_views, test_space) = made
        raise HerbensError(
            f"run '{val.run_dir}': its val logits were made with views {' '.join(val_views) or '-'} "
            f"(tta_space {val_space or 'not recorded'}) but its test logits with {' '.join(test_views) or '-'} "
            f"(tta_space {test_space or 'not recorded'}): what is fitted on val would not hold on test; "
            f"rerun `herbens infer {val.run_dir} --tta ...` for both splits with the same views")


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
        return ClassSpace.of_taxonomy(ref)
    return _aligned_space(runs, log)


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
    return ClassSpace.build(ref, species, np.searchsorted(genera, ref.species_to_genus[species]),
                            np.searchsorted(families, ref.species_to_family[species]), dropped)


def _maybe_identity(columns: np.ndarray, tax: Taxonomy, level: str) -> np.ndarray | None:
    columns = columns.astype(np.int64)
    if len(columns) == tax.num_classes(level) and (columns == np.arange(len(columns))).all():
        return None
    return columns


# ----------------------------------------------------------------------------------------
# Row alignment and chunked reading
# ----------------------------------------------------------------------------------------
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
    release_pages(arr)
    return block


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


