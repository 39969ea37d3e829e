"""Taxonomy: the class order every model, logits file and ensemble agrees on.

The model works on species indices 0..C-1; Kaggle files carry ``category_id``s, which are not
contiguous. This module is the only place that maps between them, and between species and
their genus and family.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import sys

import numpy as np

from herbens.core.errors import HerbensError
from herbens.core.fileio import read_json, write_json

if TYPE_CHECKING:
    from herbens.data.metadata import TrainMetadata

LEVELS = ("species", "genus", "family")
# Where a taxonomy's per-species counts come from (shown by the analyses that use them).
COUNTS_TRAIN_SPLIT = "training split"
COUNTS_METADATA = "all labelled images in the metadata"


class Taxonomy:
    """Species -> genus -> family hierarchy over a fixed class order.

    Args:
        category_ids: Kaggle category_id of each species index (sorted ascending).
        species_names: scientific name of each species index.
        genus_names, family_names: sorted names; a genus/family index points into these.
        species_to_genus, species_to_family: per species index, its genus / family index.
        counts: training images per species index.
        counts_source: what ``counts`` counted: the images a run trained on
            (``COUNTS_TRAIN_SPLIT``, after its split and ``data.limit_train``) or every labelled
            image of the metadata (``COUNTS_METADATA``, validation included).
    """

    def __init__(self, category_ids, species_names, genus_names, family_names,
                 species_to_genus, species_to_family, counts, counts_source: str = COUNTS_METADATA):
        self.category_ids = np.asarray(category_ids, dtype=np.int64)
        self.species_names = list(species_names)
        self.genus_names = list(genus_names)
        self.family_names = list(family_names)
        self.species_to_genus = np.asarray(species_to_genus, dtype=np.int64)
        self.species_to_family = np.asarray(species_to_family, dtype=np.int64)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.counts_source = str(counts_source)
        n = len(self.category_ids)
        for name, arr in (("species_names", self.species_names), ("species_to_genus", self.species_to_genus),
                          ("species_to_family", self.species_to_family), ("counts", self.counts)):
            if len(arr) != n:
                raise HerbensError(f"taxonomy: {name} has {len(arr)} entries for {n} species")
        if len(np.unique(self.category_ids)) != n:
            raise HerbensError("taxonomy: duplicate category_id")
        self._index = {int(c): i for i, c in enumerate(self.category_ids)}

    # ----- sizes and level maps -------------------------------------------------------
    def num_classes(self, level: str) -> int:
        """Number of classes at ``level`` (species, genus or family)."""
        return {"species": len(self.category_ids), "genus": len(self.genus_names),
                "family": len(self.family_names)}[_check_level(level)]

    def level_map(self, level: str) -> np.ndarray:
        """Array mapping each species index to its index at ``level``."""
        return {"species": np.arange(len(self.category_ids)), "genus": self.species_to_genus,
                "family": self.species_to_family}[_check_level(level)]

    def level_indices(self, level: str, species_idx):
        """Map species indices (numpy array or torch tensor) to indices at ``level``."""
        mapping = self.level_map(level)
        # torch is not imported here: numpy-only tools (the ensembler) would pay ~0.5 GB and
        # seconds for it. If torch was never imported, the input cannot be a tensor.
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(species_idx, torch.Tensor):
            return torch.as_tensor(mapping, device=species_idx.device)[species_idx]
        return mapping[np.asarray(species_idx)]

    def level_counts(self, level: str) -> np.ndarray:
        """Training images per class at ``level``."""
        return np.bincount(self.level_map(level), weights=self.counts,
                           minlength=self.num_classes(level)).astype(np.int64)

    def level_names(self, level: str) -> list[str]:
        """Class names at ``level`` in index order."""
        return {"species": self.species_names, "genus": self.genus_names,
                "family": self.family_names}[_check_level(level)]

    # ----- category_id <-> index ------------------------------------------------------
    def index_of(self, category_ids) -> np.ndarray:
        """Species indices of Kaggle category_ids; an unknown id raises HerbensError."""
        out = np.empty(len(category_ids), dtype=np.int64)
        for i, cid in enumerate(category_ids):
            try:
                out[i] = self._index[int(cid)]
            except (KeyError, ValueError, TypeError):
                # .item(): numpy scalars would print as "np.int64(77)"
                shown = cid.item() if isinstance(cid, np.generic) else cid
                raise HerbensError(f"unknown category_id {shown!r} (not in the taxonomy)") from None
        return out

    def category_of(self, indices) -> np.ndarray:
        """Kaggle category_ids of species indices."""
        return self.category_ids[np.asarray(indices, dtype=np.int64)]

    # ----- identity -------------------------------------------------------------------
    @property
    def hash(self) -> str:
        """Stable fingerprint of the class order and hierarchy (not of the counts)."""
        payload = json.dumps([self.category_ids.tolist(), self.species_names, self.genus_names,
                              self.family_names, self.species_to_genus.tolist(),
                              self.species_to_family.tolist()])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def __eq__(self, other) -> bool:
        return isinstance(other, Taxonomy) and self.hash == other.hash

    def __repr__(self) -> str:
        return (f"Taxonomy({self.num_classes('species')} species, {self.num_classes('genus')} genera, "
                f"{self.num_classes('family')} families, hash={self.hash})")

    # ----- construction and persistence -----------------------------------------------
    @classmethod
    def from_metadata(cls, meta: "TrainMetadata") -> "Taxonomy":
        """Build from training metadata: every category, counts from all its labelled images
        (a run replaces them with its training split's: :meth:`with_training_rows`)."""
        cats = meta.categories.sort_values("category_id").reset_index(drop=True)
        genus_names = sorted(set(cats["genus"]))
        family_names = sorted(set(cats["family"]))
        genus_of = {g: i for i, g in enumerate(genus_names)}
        family_of = {f: i for i, f in enumerate(family_names)}
        per_category = meta.images["category_id"].value_counts()
        counts = [int(per_category.get(c, 0)) for c in cats["category_id"]]
        return cls(cats["category_id"].to_numpy(), cats["scientific_name"].tolist(), genus_names,
                   family_names, [genus_of[g] for g in cats["genus"]],
                   [family_of[f] for f in cats["family"]], counts)

    def with_training_rows(self, category_ids) -> "Taxonomy":
        """The same taxonomy with counts of the given training rows' category_ids (a run's prior).

        Raises:
            HerbensError: on a category_id outside the taxonomy.
        """
        counts = np.bincount(self.index_of(np.asarray(category_ids)), minlength=self.num_classes("species"))
        return Taxonomy(self.category_ids, self.species_names, self.genus_names, self.family_names,
                        self.species_to_genus, self.species_to_family, counts, COUNTS_TRAIN_SPLIT)

    def to_dict(self) -> dict:
        return {
            "hash": self.hash,
            "category_ids": self.category_ids.tolist(),
            "species_names": self.species_names,
            "genus_names": self.genus_names,
            "family_names": self.family_names,
            "species_to_genus": self.species_to_genus.tolist(),
            "species_to_family": self.species_to_family.tolist(),
            "counts": self.counts.tolist(),
            "counts_source": self.counts_source,
        }

    def save(self, path: str | Path) -> None:
        """Write ``taxonomy.json`` atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def of_run(cls, run_dir: str | Path) -> "Taxonomy":
        """The taxonomy of a run folder; HerbensError when the folder has none (not a run)."""
        path = Path(run_dir) / "taxonomy.json"
        if not path.exists():
            raise HerbensError(f"run '{run_dir}': not a run directory (no taxonomy.json)")
        return cls.load(path)

    @classmethod
    def load(cls, path: str | Path) -> "Taxonomy":
        """Read a ``taxonomy.json``; a corrupted or edited file (hash mismatch) is an error.

        Files written before ``counts_source`` existed counted every labelled image of the
        metadata, and load so.
        """
        data = read_json(path)
        try:
            tax = cls(data["category_ids"], data["species_names"], data["genus_names"],
                      data["family_names"], data["species_to_genus"], data["species_to_family"],
                      data["counts"], data.get("counts_source", COUNTS_METADATA))
        except (KeyError, TypeError) as exc:
            raise HerbensError(f"{path}: not a herbens taxonomy file (missing {exc})") from exc
        if data.get("hash") not in (None, tax.hash):
            raise HerbensError(f"{path}: stored hash {data['hash']} does not match its content ({tax.hash})")
        return tax


def _check_level(level: str) -> str:
    if level not in LEVELS:
        raise HerbensError(f"unknown level {level!r}; expected one of {', '.join(LEVELS)}")
    return level
