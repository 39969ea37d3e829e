"""HierarchicalLoss: one loss per taxonomic level, weighted and summed.

Targets: hard labels per level (``{"species": [B], "genus": [B], ...}``), or a soft species
target ``[B, C_species]`` from timm's Mixup/CutMix. A soft species target is the truth for every
level: the genus/family targets are the species probabilities summed through the
species -> genus/family maps (the hard genus/family labels of the batch describe only one of
the mixed images).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from herbens.core.errors import HerbensError
from herbens.losses.base import LevelLoss
from herbens.losses.distill import sparse_kl_div


class HierarchicalLoss(nn.Module):
    """Weighted sum of per-level losses.

    Args:
        losses: per level, its :class:`WeightedLosses`.
        weights: per level, its share of the total.
        level_maps: per level, species index -> level index (``Taxonomy.level_map``).
        distill: ``{"levels": [...], "alpha": a, "temperature": T}`` to mix each of those levels'
            loss with the distillation term: ``(1 - a) * loss + a * T^2 KL`` against the teacher
            targets that travel in the batch (``teacher.<level>.classes|logp|rest``).
        distill_class_weights: per species, the factor on the distillation term of each image of
            that species (every distilled level; None: unweighted).
    """

    def __init__(self, losses: dict[str, WeightedLosses], weights: dict[str, float],
                 level_maps: dict[str, np.ndarray], distill: dict | None = None,
                 distill_class_weights: np.ndarray | None = None):
        super().__init__()
        self.distill = dict(distill) if distill else None
        # Derived from the training counts each run, so not part of the checkpoint.
        self.register_buffer("distill_class_weights", None if distill_class_weights is None else torch.as_tensor(
            np.asarray(distill_class_weights), dtype=torch.float32), persistent=False)
        if not losses:
            raise HerbensError("no loss configured: every level is null")
        self.losses = nn.ModuleDict(losses)
        self.weights = {level: float(weights[level]) for level in losses}
        for level, mapping in level_maps.items():
            # Not persistent: the maps come from the taxonomy, not from the checkpoint.
            self.register_buffer(f"map_{level}", torch.as_tensor(np.asarray(mapping), dtype=torch.long),
                                 persistent=False)

    def forward(self, outputs: dict[str, torch.Tensor],
                targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Total loss and detached per-level parts.

        Returns:
            ``{"loss": weighted sum (to backprop), "<level>": the level's loss before its level
            weight (detached)}``, plus ``"<level>/<name>"`` per term of a level with several
            losses (unweighted, detached) and ``"<level>_distill"`` (the distillation term) for
            distilled levels.
        """
        total = None
        parts = {}
        kd_weights = self.distillation_weights(targets) if self.distill else None
        for level, loss_fn in self.losses.items():
            value, terms = loss_fn(outputs, self.level_target(level, targets))
            parts[level] = value.detach()
            if len(terms) > 1:
                parts.update({f"{level}/{name}": term.detach() for name, term in zip(loss_fn.names, terms)})
            if self.distill and level in self.distill["levels"]:
                kd = self.distillation(level, outputs, targets, kd_weights)
                parts[f"{level}_distill"] = kd.detach()
                value = (1.0 - self.distill["alpha"]) * value + self.distill["alpha"] * kd
            weighted = self.weights[level] * value
            total = weighted if total is None else total + weighted
        return {"loss": total, **parts}

    def distillation_weights(self, targets: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Each image's factor on its distillation terms (its species' weight), or None."""
        if self.distill_class_weights is None:
            return None
        species = self.level_target("species", targets)
        if species.ndim == 2:  # a mixed (soft) species target: the mixed images' weights, mixed alike
            return species.float() @ self.distill_class_weights
        return self.distill_class_weights[species.long()]

    def distillation(self, level: str, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                     weights: torch.Tensor | None = None) -> torch.Tensor:
        """``T^2 KL(teacher || student)`` of one level from the batch's sparse teacher targets,
        each image's term multiplied by ``weights`` (None: unweighted)."""
        key = f"teacher.{level}"
        if f"{key}.classes" not in targets:
            raise HerbensError(f"distillation of level {level!r}: the batch carries no teacher targets")
        return sparse_kl_div(outputs[level], targets[f"{key}.classes"], targets[f"{key}.logp"],
                             targets[f"{key}.rest"], self.distill["temperature"], weights)

    def level_target(self, level: str, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """Target of ``level``: derived from a soft species target, else the given hard labels."""
        species = targets.get("species")
        if species is not None and species.ndim == 2:
            return species if level == "species" else self.soft_level_target(level, species)
        if level in targets:
            return targets[level]
        if species is not None:
            return self._map(level)[species.long()]
        raise HerbensError(f"no target for level {level!r} (targets have {', '.join(targets) or 'nothing'})")

    def soft_level_target(self, level: str, species_soft: torch.Tensor) -> torch.Tensor:
        """``[B, C_level]``: species probabilities summed into their genus/family columns."""
        mapping = self._map(level)
        num_classes = self.losses[level].num_classes
        out = species_soft.new_zeros(species_soft.shape[0], num_classes)
        return out.index_add_(1, mapping, species_soft)

    def _map(self, level: str) -> torch.Tensor:
        name = f"map_{level}"
        if not hasattr(self, name):
            raise HerbensError(f"no species -> {level} map in the criterion")
        return getattr(self, name)


class WeightedLosses(nn.Module):
    """One level's list of losses, summed with their weights: ``sum_i w_i * loss_i``.

    Args:
        losses: the level's built losses (all on the same level).
        weights: their weights.
    """

    def __init__(self, losses: list[LevelLoss], weights: list[float]):
        super().__init__()
        if not losses or len(losses) != len(weights):
            raise HerbensError("a level needs at least one loss and one weight per loss")
        self.terms = nn.ModuleList(losses)
        self.weights = [float(w) for w in weights]
        self.num_classes = losses[0].num_classes
        self.names = [loss.name for loss in losses]

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The weighted sum and each term's unweighted value."""
        values = [loss(outputs, target) for loss in self.terms]
        total = sum(w * v for w, v in zip(self.weights, values))
        return total, values
