"""The ensemble's combination applied to in-memory logits of new images.

This module is the only place where a bundle touches the ensembler: :func:`fitted_params`
reads the fitted values of an ensemble's JSON record, and :func:`combine_members` calls the
ensembler's own combination (``herbens.ensemble.combine``) on one batch of member logits, so a
bundle predicts exactly what ``herbens ensemble`` writes. Nothing here re-implements it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from herbens.data.taxonomy import Taxonomy
from herbens.ensemble.combine import (Chunk, ClassSpace, Params, Run, class_space, log_softmax,
                                      species_scores)
from herbens.errors import HerbensError


def fitted_params(record: dict, num_members: int) -> Params:
    """The combination parameters stored in an ensemble's JSON record (or a bundle's copy).

    Args:
        record: the ``<submission>.json`` summary of ``herbens ensemble`` (keys ``weights``,
            ``temperatures``, ``ensemble_scale``, ``space``, ``tau``, ``alpha``, ``beta``, ``mode``).
        num_members: members the bundle holds (one weight and temperature each).

    Raises:
        HerbensError: naming the key that is missing or has the wrong length, or for vote mode,
            whose per-view votes a bundle does not reproduce.
    """
    try:
        params = Params(weights=np.asarray(record["weights"], dtype=np.float64),
                        temperatures=np.asarray(record["temperatures"], dtype=np.float64),
                        scale=float(record.get("ensemble_scale", record.get("scale", 1.0))),
                        space=record.get("space", "logit"), tau=float(record["tau"]),
                        alpha=float(record["alpha"]), beta=float(record["beta"]),
                        mode=record.get("mode", "mean"), vote_k=int(record.get("vote_k") or 5))
    except (KeyError, TypeError, ValueError) as exc:
        raise HerbensError(f"ensemble record: missing or malformed fitted value {exc}") from None
    if params.mode != "mean":
        raise HerbensError(f"ensemble record: mode {params.mode!r} cannot be exported (only mean mode)")
    for key in ("weights", "temperatures"):
        if len(getattr(params, key)) != num_members:
            raise HerbensError(f"ensemble record: {len(getattr(params, key))} {key} for {num_members} members")
    return params


def single_run_params() -> Params:
    """The combination of one run alone: its own logits, nothing fitted (what ``infer`` scores)."""
    return Params(weights=np.ones(1), temperatures=np.ones(1))


def params_record(params: Params) -> dict:
    """JSON form of ``params`` that :func:`fitted_params` reads back."""
    record = params.to_json()
    record["ensemble_scale"] = record.pop("scale")
    return record


def needed_levels(params: Params) -> tuple[str, ...]:
    """The levels whose logits the combination reads."""
    return params.levels


def class_space_of(taxonomy: Taxonomy, num_members: int) -> ClassSpace:
    """The ensemble's class space for members that share ``taxonomy`` (the bundle's)."""
    return class_space([Run(f"member{i}", Path(f"member{i}"), taxonomy, {}) for i in range(num_members)])


@dataclass
class LevelProbabilities:
    """Per-image probabilities at each level, and the final species scores they come from."""

    scores: np.ndarray                 # final species scores [n, C] (OOD energy reads them)
    species: np.ndarray                # softmax of the scores [n, C]
    genus: np.ndarray                  # species probabilities summed within each genus [n, G]
    family: np.ndarray                 # ... within each family [n, F]

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
    n = len(next(iter(member_logits[0].values())))
    logits = {(r, level): np.asarray(member[level], dtype=np.float32)
              for r, member in enumerate(member_logits) for level in needed_levels(params)}
    chunk = Chunk(0, n, logits, {}, None, None)
    scores = species_scores(chunk, params, space)
    species = np.exp(log_softmax(scores))
    tax = space.taxonomy
    return LevelProbabilities(scores, species, _sum_within(species, space.genus_of, tax.num_classes("genus")),
                              _sum_within(species, space.family_of, tax.num_classes("family")))


def _sum_within(probs: np.ndarray, groups: np.ndarray, count: int) -> np.ndarray:
    """Column sums of ``probs`` within each group (``groups[c]`` = group of column c)."""
    out = np.zeros((count, len(probs)), dtype=np.float64)
    np.add.at(out, groups, probs.T)
    return out.T.astype(np.float32)
