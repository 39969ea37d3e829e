"""The embedding-distance OOD score: how far an image's embedding is from the training images'.

Softmax confidence stays high far from the training data (a blank page can get 99 %); the
distance to the k-th nearest training embedding does not (deep k-nearest neighbours, Sun et al.
2022). Each member keeps a bank of its own unit training embeddings, capped per species by a
seeded stratified sample so the bundle's size is bounded (``members/<m>/ood_bank.npy``,
float16); an image's distance for a member is ``1 - cos`` to its k-th nearest bank row, and the
bundle's score is the mean over members. :class:`herbens.bundle.thresholds.RowSummary` keeps
"higher = more familiar", so it stores the negated distance (``knn`` OOD score).

Enrolling a species appends its embeddings to every member's bank; a known image's nearest
training rows do not change, so the threshold fitted at export keeps the share of known
images it was fitted to keep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write
from herbens.stores.embeddings import embeddings_dir, read_embeddings

BANK = "ood_bank.npy"
BANK_OWNERS = "ood_bank_owners.npy"  # enrolled rows' category ids (unenrol removes them)
ENROLLED_DIR = "enrolled"            # herbens.bundle.enrolment's folder
K = 5                 # the k-th nearest training embedding (Sun et al. use k in the tens for 1k classes)
PER_SPECIES = 64      # bank rows kept per species (all of a species with fewer)
QUERY_BLOCK = 1024    # query rows per similarity block: memory [block, bank rows]


def stratified_sample(labels: np.ndarray, per_species: int, seed: int) -> np.ndarray:
    """Sorted row indices: every species' rows, at most ``per_species`` of each (seeded)."""
    rng = np.random.default_rng(seed)
    keep = []
    for species in np.unique(labels):
        rows = np.flatnonzero(labels == species)
        keep.append(rows if len(rows) <= per_species else rng.choice(rows, per_species, replace=False))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def kth_distance(queries: np.ndarray, bank: np.ndarray, k: int = K) -> np.ndarray:
    """``1 - cos`` of each unit query row to its k-th nearest unit bank row (k capped at the bank)."""
    if not len(bank):
        raise HerbensError("OOD bank is empty: no training embedding to measure a distance to")
    k = min(k, len(bank))
    bank = np.asarray(bank, dtype=np.float32)
    out = np.empty(len(queries), dtype=np.float64)
    for start in range(0, len(queries), QUERY_BLOCK):
        sims = np.asarray(queries[start:start + QUERY_BLOCK], dtype=np.float32) @ bank.T
        out[start:start + len(sims)] = 1.0 - np.partition(sims, len(bank) - k, axis=1)[:, len(bank) - k]
    return out


def combined_distance(member_queries: list[np.ndarray], banks: list[np.ndarray], k: int = K) -> np.ndarray:
    """Mean over members of each row's k-th nearest distance."""
    return np.mean([kth_distance(q, b, k) for q, b in zip(member_queries, banks)], axis=0)


def bank_record(banks: list[np.ndarray] | None) -> dict | None:
    """``bundle.json``'s description of the banks (None without)."""
    return None if banks is None else {"k": K, "per_species": PER_SPECIES, "rows": [len(b) for b in banks]}


def save_bank(folder: Path, vectors: np.ndarray) -> None:
    # Through atomic_write: enrolment stages bundles with hard links (never rewrite in place).
    with atomic_write(folder / BANK, "wb") as handle:
        np.save(handle, np.asarray(vectors, dtype=np.float16), allow_pickle=False)


def load_banks(root: Path, member_names: list[str]) -> list[np.ndarray] | None:
    """Every member's bank (its training rows, then enrolled species' rows), or None when the
    bundle has none (exported without embeddings)."""
    paths = [root / "members" / name / BANK for name in member_names]
    if not any(p.is_file() for p in paths):
        return None
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise HerbensError(f"bundle {root}: {missing[0].relative_to(root)} is missing (every member needs its bank)")
    return [np.concatenate([np.load(p, allow_pickle=False), _enrolled_rows(root, name)[0]])
            for p, name in zip(paths, member_names)]


def _enrolled_rows(root: Path, member: str) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [m, D] float16, category_id per row)`` enrolment added to a member's bank."""
    rows, owners = root / ENROLLED_DIR / f"{member}.{BANK}", root / ENROLLED_DIR / f"{member}.{BANK_OWNERS}"
    if not rows.is_file():
        dim = np.load(root / "members" / member / BANK, mmap_mode="r").shape[1]
        return np.zeros((0, dim), np.float16), np.zeros(0, np.int64)
    return np.load(rows, allow_pickle=False), np.load(owners, allow_pickle=False)


def _save_enrolled(tmp: Path, member: str, rows: np.ndarray, owners: np.ndarray) -> None:
    (tmp / ENROLLED_DIR).mkdir(exist_ok=True)
    for name, array in ((f"{member}.{BANK}", rows.astype(np.float16)), (f"{member}.{BANK_OWNERS}", owners)):
        with atomic_write(tmp / ENROLLED_DIR / name, "wb") as handle:
            np.save(handle, array, allow_pickle=False)


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


def training_banks(run_dirs: list[Path], taxonomy, seed: int, per_species: int = PER_SPECIES) -> list[np.ndarray]:
    """Per member run: a stratified sample of its unit training embeddings (float16)."""
    banks = []
    for run in run_dirs:
        train = read_embeddings(run, "train", taxonomy=taxonomy)
        if train.labels is None:
            raise HerbensError(f"{train.where}: the OOD bank's stratified sample needs species labels")
        banks.append(np.asarray(train.matrix[stratified_sample(train.labels, per_species, seed)], dtype=np.float16))
    return banks


def split_distance(run_dirs: list[Path], banks: list[np.ndarray], split: str, image_ids: list[str],
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
