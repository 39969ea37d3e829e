"""What a bundle holds of its enrolled species, read back for prediction: the enrolled
species' records and prototypes fused with the trained head (:class:`Enrolment`).

Writing them (``herbens enrol`` / ``unenrol``) is :mod:`herbens.bundle.enrolment`, whose docstring
gives the design; this module is what :func:`herbens.bundle.load.load_bundle` needs, so the
loader never imports the verbs that load bundles themselves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from herbens.bundle.scoring import LevelProbabilities, sum_within
from herbens.core.errors import HerbensError
from herbens.core.fileio import load_npy, read_json
from herbens.core.numerics import log_softmax
from herbens.retrieval.prototypes import Prototypes, cosine_scores, fuse_with_head

PROTOTYPES = "prototypes.npy"
OWNERS = "prototype_owners.npy"
ENROLLED = "enrolled"
SPECIES_FILE = "species.json"
NAME_COLUMNS = ("category_id", "scientific_name", "authors", "genus", "family")


# ----------------------------------------------------------------------------------------
# Load: the enrolled species and how they are scored
# ----------------------------------------------------------------------------------------
@dataclass
class Enrolment:
    """Enrolled species of a loaded bundle and what fusing them with the head needs.

    Attributes:
        species: ``enrolled/species.json`` entries, in column order (after the trained species).
        prototypes: per member, known + enrolled :class:`~herbens.retrieval.prototypes.Prototypes`.
        temperatures: per member, its prototype temperature.
        head_temperature: divides the combined species scores before fusion.
        genus_names, family_names: trained ones, then the enrolled species' new ones.
        genus_of, family_of: genus/family column of every species column (known + enrolled).
        num_known: trained species (columns of the head).
    """

    species: list[dict]
    prototypes: list
    temperatures: list[float]
    head_temperature: float
    genus_names: list[str]
    family_names: list[str]
    genus_of: np.ndarray
    family_of: np.ndarray
    num_known: int

    def fuse(self, probs, embeddings: list[np.ndarray]):
        """:class:`~herbens.bundle.scoring.LevelProbabilities` over known + enrolled species from
        the combined head probabilities of ``n`` images and each member's embeddings ``[n, D]``."""

        proto = np.mean([log_softmax(cosine_scores(e, p) / np.float32(t))
                         for e, p, t in zip(embeddings, self.prototypes, self.temperatures)], axis=0)
        fused = fuse_with_head(probs.scores / np.float32(self.head_temperature), proto, self.num_known)
        species = np.exp(fused)
        return LevelProbabilities(fused, species, sum_within(species, self.genus_of, len(self.genus_names)),
                                  sum_within(species, self.family_of, len(self.family_names)))


def read_species(root: Path) -> list[dict]:
    """The enrolled species entries of a bundle folder (empty when none is enrolled)."""
    path = root / ENROLLED / SPECIES_FILE
    if not path.exists():
        return []
    record = read_json(path)
    species = record.get("species") if isinstance(record, dict) else None
    if not isinstance(species, list) or not species:
        raise HerbensError(f"{path}: no 'species' list")
    return species


def _taxon_columns(taxonomy, species: list[dict]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Genus and family names (trained, then new ones in enrolment order) and the column of each
    species (trained and enrolled)."""
    genera, families = list(taxonomy.genus_names), list(taxonomy.family_names)
    for entry in species:
        for names, value in ((genera, entry["genus"]), (families, entry["family"])):
            if value not in names:
                names.append(value)
    genus_of = np.r_[taxonomy.species_to_genus, [genera.index(e["genus"]) for e in species]].astype(np.int64)
    family_of = np.r_[taxonomy.species_to_family, [families.index(e["family"]) for e in species]].astype(np.int64)
    return genera, families, genus_of, family_of


def load_enrolment(root: Path, record: dict, taxonomy, member_names: list[str], manifest: dict) -> Enrolment | None:
    """The bundle's enrolled species (None when it has none).

    Raises:
        HerbensError: an enrolled file the manifest does not cover, a bundle without the
            export-time prototypes, or prototype shapes that do not match.
    """
    species = read_species(root)
    if not species:
        return None
    folder = root / ENROLLED
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.relative_to(root).as_posix() not in manifest:
            raise HerbensError(f"bundle {root}: file {path.relative_to(root).as_posix()} is not in the manifest")
    setup = record.get("enrolment")
    if not setup:
        raise HerbensError(f"bundle {root}: has enrolled species but bundle.json has no enrolment record")
    known = taxonomy.num_classes("species")
    prototypes, temperatures = [], []
    for name in member_names:
        member = root / "members" / name
        vectors, owners, enrolled = (load_npy(member / PROTOTYPES), load_npy(member / OWNERS),
                                     load_npy(folder / f"{name}.npy"))
        if enrolled.ndim != 2 or len(enrolled) != len(species) or enrolled.shape[1] != vectors.shape[1]:
            raise HerbensError(f"{folder / f'{name}.npy'}: shape {list(enrolled.shape)}, expected "
                               f"[{len(species)}, {vectors.shape[1]}] (one prototype per enrolled species)")
        protos = Prototypes(vectors.astype(np.float32), owners.astype(np.int64), known)
        for j, row in enumerate(enrolled):
            protos = protos.with_species(row[None].astype(np.float32), known + j)
        prototypes.append(protos)
        temperatures.append(float(setup["prototype_temperatures"][name]))
    genera, families, genus_of, family_of = _taxon_columns(taxonomy, species)
    return Enrolment(species, prototypes, temperatures, float(setup["head_temperature"]), genera, families,
                     genus_of, family_of, known)
