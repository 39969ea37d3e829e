"""The embedding-distance OOD score: how far an image's embedding is from the training images'.

Softmax confidence stays high far from the training data (a blank page can get 99 %); the
distance to the k-th nearest training embedding does not (deep k-nearest neighbours, Sun et al.
2022). Each member keeps a bank of its own unit training embeddings, capped per species by a
seeded stratified sample so the bundle's size is bounded (``members/<m>/ood_bank.npy``,
float16, with each row's category id in ``ood_bank_labels.npy``). The distance is
class-conditional: for each species c with n_c bank rows, ``1 - cos`` to the k_c-th nearest of
its own rows (k_c = min(k, n_c)), and an image's distance for a member is the minimum over
species: the distance to its closest species' neighbourhood. A species enrolled from two
sheets is therefore judged by its two rows, not by the training rows of other species. The
bundle's score is the mean over members. :class:`herbens.bundle.thresholds.RowSummary` keeps
"higher = more familiar", so it stores the negated distance (``knn`` OOD score).

Enrolling a species appends its embeddings (as a new species) to every member's bank; a known
image's distance to the trained species does not change, and the new species can only lower it,
so the threshold fitted at export keeps at least the share of known images it was fitted to keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from herbens.bundle.enrolled import ENROLLED
from herbens.core.errors import HerbensError
from herbens.core.fileio import load_npy, save_npy
from herbens.stores.embeddings import embeddings_dir, read_embeddings

BANK = "ood_bank.npy"
BANK_LABELS = "ood_bank_labels.npy"  # the category id of every training bank row
BANK_OWNERS = "ood_bank_owners.npy"  # enrolled rows' category ids (unenrol removes them)
K = 5                 # the k-th nearest training embedding (Sun et al. use k in the tens for 1k classes)
PER_SPECIES = 64      # bank rows kept per species (all of a species with fewer)
BLOCK_CELLS = 1 << 22  # query rows x bank rows per similarity block (a float64 block: 32 MiB)


@dataclass(frozen=True)
class Bank:
    """A member's OOD bank: unit embedding rows and the category id (species) of each."""

    vectors: np.ndarray
    species: np.ndarray

    def __len__(self) -> int:
        return len(self.vectors)


def stratified_sample(labels: np.ndarray, per_species: int, seed: int) -> np.ndarray:
    """Sorted row indices: every species' rows, at most ``per_species`` of each (seeded)."""
    rng = np.random.default_rng(seed)
    keep = []
    for species in np.unique(labels):
        rows = np.flatnonzero(labels == species)
        keep.append(rows if len(rows) <= per_species else rng.choice(rows, per_species, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def species_distance(queries: np.ndarray, bank: Bank, k: int = K, block_cells: int = BLOCK_CELLS) -> np.ndarray:
    """Each unit query row's ``1 - cos`` to its closest species: the minimum over species c of
    the distance to c's k_c-th nearest bank row, k_c = min(k, rows of c)."""
    if not len(bank):
        raise HerbensError("OOD bank is empty: no training embedding to measure a distance to")
    order = np.argsort(bank.species, kind="stable")
    vectors = np.asarray(bank.vectors, dtype=np.float32)[order]
    _, starts, counts = np.unique(bank.species[order], return_index=True, return_counts=True)
    ranks = starts + np.minimum(k, counts) - 1  # each species' k_c-th column once sorted
    # One sort per row orders every species' columns by similarity within their own span:
    # cosines lie in [-1, 1], so an offset of 3 per species keeps the spans apart.
    offset = 3.0 * np.repeat(np.arange(len(counts), dtype=np.float64), counts)
    rows = max(1, block_cells // len(vectors))
    out = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), rows):
        keys = np.sort(offset - np.asarray(queries[start:start + rows], dtype=np.float32) @ vectors.T, axis=1)
        out[start:start + len(keys)] = 1.0 + (keys[:, ranks] - offset[ranks]).min(axis=1)
    return out


def combined_distance(member_queries: list[np.ndarray], banks: list[Bank], k: int = K) -> np.ndarray:
    """Mean over members of each row's distance to its closest species."""
    return np.mean([species_distance(q, b, k) for q, b in zip(member_queries, banks)], axis=0)


def bank_record(banks: list[Bank] | None) -> dict | None:
    """``bundle.json``'s description of the banks (None without)."""
    return None if banks is None else {"k": K, "per_species": PER_SPECIES, "class_conditional": True,
                                       "rows": [len(b) for b in banks]}


def save_bank(folder: Path, bank: Bank) -> None:
    save_npy(folder / BANK, np.asarray(bank.vectors, dtype=np.float16))
    save_npy(folder / BANK_LABELS, bank.species)


def load_banks(root: Path, member_names: list[str]) -> list[Bank] | None:
    """Every member's bank (its training rows, then enrolled species' rows), or None when the
    bundle has none (exported without embeddings)."""
    paths = [root / "members" / name / BANK for name in member_names]
    if not any(p.is_file() for p in paths):
        return None
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise HerbensError(f"bundle {root}: {missing[0].relative_to(root)} is missing (every member needs its bank)")
    return [_member_bank(root, name) for name in member_names]


def _member_bank(root: Path, member: str) -> Bank:
    folder = root / "members" / member
    if not (folder / BANK_LABELS).is_file():
        raise HerbensError(f"bundle {root}: members/{member}/{BANK_LABELS} is missing (a bundle exported before "
                           "per-species OOD banks: export it again)")
    rows, owners = _enrolled_rows(root, member)
    return Bank(np.concatenate([load_npy(folder / BANK), rows]),
                np.concatenate([load_npy(folder / BANK_LABELS).astype(np.int64), owners]))


def _enrolled_rows(root: Path, member: str) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [m, D] float16, category_id per row)`` enrolment added to a member's bank."""
    rows, owners = root / ENROLLED / f"{member}.{BANK}", root / ENROLLED / f"{member}.{BANK_OWNERS}"
    if not rows.is_file():
        dim = np.load(root / "members" / member / BANK, mmap_mode="r").shape[1]
        return np.zeros((0, dim), np.float16), np.zeros(0, np.int64)
    return load_npy(rows), load_npy(owners)


def _save_enrolled(tmp: Path, member: str, rows: np.ndarray, owners: np.ndarray) -> None:
    (tmp / ENROLLED).mkdir(exist_ok=True)
    save_npy(tmp / ENROLLED / f"{member}.{BANK}", rows.astype(np.float16))
    save_npy(tmp / ENROLLED / f"{member}.{BANK_OWNERS}", owners)


def extend_banks(root: Path, tmp: Path, embeddings: dict[str, np.ndarray], category_id: int) -> None:
    """Add an enrolled species' image embeddings (per member) to the staged bundle's banks."""
    for member, vectors in embeddings.items():
        rows, owners = _enrolled_rows(root, member)
        _save_enrolled(tmp, member, np.concatenate([rows, np.asarray(vectors, np.float16)]),
                       np.concatenate([owners, np.full(len(vectors), category_id, np.int64)]))


def drop_from_banks(root: Path, tmp: Path, members: list[str], category_id: int) -> None:
    """Remove an unenrolled species' rows from the staged bundle's banks."""
    for member in members:
        rows, owners = _enrolled_rows(root, member)
        keep = owners != category_id
        _save_enrolled(tmp, member, rows[keep], owners[keep])


def training_banks(run_dirs: list[Path], taxonomy, seed: int, per_species: int = PER_SPECIES) -> list[Bank]:
    """Per member run: a stratified sample of its unit training embeddings (float16) and their
    category ids."""
    banks = []
    for run in run_dirs:
        train = read_embeddings(run, "train", taxonomy=taxonomy)
        if train.labels is None or (train.labels < 0).any():
            raise HerbensError(f"{train.where}: the OOD bank needs the species label of every training row")
        rows = stratified_sample(train.labels, per_species, seed)
        banks.append(Bank(np.asarray(train.matrix[rows], dtype=np.float16),
                          np.asarray(taxonomy.category_ids, dtype=np.int64)[train.labels[rows]]))
    return banks


def split_distance(run_dirs: list[Path], banks: list[Bank], split: str, image_ids: list[str],
                   taxonomy) -> np.ndarray:
    """The bundle's distance of a split's ``image_ids`` (every member's embeddings of them)."""
    queries = []
    for run in run_dirs:
        stored = read_embeddings(run, split, taxonomy=taxonomy)
        row = {image_id: i for i, image_id in enumerate(stored.image_ids)}
        missing = [i for i in image_ids if i not in row]
        if missing:
            raise HerbensError(f"{stored.where}: no embedding of image {missing[0]} (rerun herbens infer RUN "
                               "--embeddings)")
        queries.append(np.asarray(stored.matrix[[row[i] for i in image_ids]], dtype=np.float32))
    return combined_distance(queries, banks)


def has_embeddings(run_dirs: list[Path]) -> bool:
    """Whether every run has train and val embeddings (what the ``knn`` score needs)."""
    return all(embeddings_dir(run, s).is_dir() for run in run_dirs for s in ("train", "val"))
