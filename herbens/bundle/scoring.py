"""The ensemble's combination applied to in-memory logits of new images.

This module is the only place where a bundle touches the ensembler: :func:`fitted_params`
reads the fitted values of an ensemble's JSON record, and :func:`combine_members` calls the
ensembler's own combination (``herbens.ensemble.combine``) on one batch of member logits, so a
bundle predicts exactly what ``herbens ensemble`` writes. Nothing here re-implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from herbens.data.taxonomy import Taxonomy
from herbens.ensemble.combine import Chunk, ClassSpace, Params, species_scores
from herbens.core.errors import HerbensError
from herbens.core.numerics import log_softmax


def fitted_params(record: dict, num_members: int) -> Params:
    """The combination parameters of an ensemble's JSON record (or of a bundle's copy).

    Args:
        record: the ``<submission>.json`` summary of ``herbens ensemble`` (its ``params``), or
            the ``params`` themselves as a bundle stores them (:func:`params_record`).
        num_members: members the bundle holds (one weight and temperature each).

    Raises:
        HerbensError: naming the key that is missing or has the wrong length, or for vote mode,
            whose per-view votes a bundle does not reproduce.
    """
    params = Params.from_json(record.get("params", record))
    if params.mode != "mean":
        raise HerbensError(f"ensemble record: mode {params.mode!r} cannot be exported (only mean mode)")
    if len(params.weights) != num_members:
        raise HerbensError(f"ensemble record: {len(params.weights)} weights for {num_members} members")
    return params


def single_run_params() -> Params:
    """The combination of one run alone: its own logits, nothing fitted (what ``infer`` scores)."""
    return Params.initial(1)


def params_record(params: Params) -> dict:
    """JSON form of ``params`` that :func:`fitted_params` reads back."""
    return params.to_json()


def needed_levels(params: Params) -> tuple[str, ...]:
    """The levels whose logits the combination reads."""
    return params.levels


def class_space_of(taxonomy: Taxonomy) -> ClassSpace:
    """The ensemble's class space for members that share ``taxonomy`` (the bundle's, whose
    training counts give the prior of ``tau``)."""
    return ClassSpace.of_taxonomy(taxonomy)


@dataclass
class LevelProbabilities:
    """Per-image probabilities at each level, and the final species scores they come from."""

    scores: np.ndarray                 # final species scores [n, C] (OOD energy reads them)
    species: np.ndarray                # softmax of the scores [n, C]
    genus: np.ndarray                  # species probabilities summed within each genus [n, G]
    family: np.ndarray                 # ... within each family [n, F]
    distance: np.ndarray | None = None  # [n] embedding distance to the OOD banks (knn score), if any

    def level(self, name: str) -> np.ndarray:
        return {"species": self.species, "genus": self.genus, "family": self.family}[name]


def combine_members(member_logits: Sequence[dict[str, np.ndarray]], params: Params,
                    space: ClassSpace) -> LevelProbabilities:
    """Combine each member's per-level logits of the same images as the ensembler does.

    The species scores are the ensembler's (:func:`herbens.ensemble.combine.species_scores`:
    weights, temperatures, ``- tau log prior``, ``+ alpha log p(genus) + beta log p(family)``
    from the combined genus/family heads); genus and family probabilities sum the resulting
    species probabilities within each genus and family, so the three levels always agree.

    Args:
        member_logits: per member, ``{level: [n, C_level]}`` float arrays, class order of
            ``space.taxonomy``.
        params: from :func:`fitted_params` or :func:`single_run_params`.
        space: from :func:`class_space_of`.
    """
    chunk = Chunk.of_arrays([{level: member[level] for level in needed_levels(params)} for member in member_logits])
    scores = species_scores(chunk, params, space)
    species = np.exp(log_softmax(scores))
    tax = space.taxonomy
    return LevelProbabilities(scores, species, sum_within(species, space.genus_of, tax.num_classes("genus")),
                              sum_within(species, space.family_of, tax.num_classes("family")))


def sum_within(probs: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """Column sums of ``probs`` within each group (``groups[c]`` = group of column c)."""
    out = np.zeros((count, len(probs)), dtype=np.float64)
    np.add.at(out, groups, probs.T)
    return out.T.astype(np.float32)
