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

from herbens.errors import HerbensError
from herbens.losses.base import LevelLoss, mixup_error
from herbens.losses.distill import sparse_kl_div


class HierarchicalLoss(nn.Module):
    """Weighted sum of per-level losses.

    Args:
        losses: per level, a built :class:`LevelLoss`.
        weights: per level, its share of the total.
        level_maps: per level, species index -> level index (``Taxonomy.level_map``).
        distill: ``{"levels": [...], "alpha": a, "temperature": T}`` to mix each of those levels'
            loss with the distillation term: ``(1 - a) * loss + a * T^2 KL`` against the teacher
            targets that travel in the batch (``teacher.<level>.classes|logp|rest``).
    """

    def __init__(self, losses: dict[str, LevelLoss], weights: dict[str, float],
                 level_maps: dict[str, np.ndarray], distill: dict | None = None):
        super().__init__()
        self.distill = dict(distill) if distill else None
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
            ``{"loss": weighted sum (to backprop), "<level>": unweighted level loss (detached)}``,
            plus ``"<level>_distill"`` (the distillation term) for distilled levels.
        """
        total = None
        parts = {}
        for level, loss_fn in self.losses.items():
            value = loss_fn(outputs, self.level_target(level, targets))
            parts[level] = value.detach()
            if self.distill and level in self.distill["levels"]:
                kd = self.distillation(level, outputs, targets)
                parts[f"{level}_distill"] = kd.detach()
                value = (1.0 - self.distill["alpha"]) * value + self.distill["alpha"] * kd
            weighted = self.weights[level] * value
            total = weighted if total is None else total + weighted
        return {"loss": total, **parts}

    def distillation(self, level: str, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """``T^2 KL(teacher || student)`` of one level from the batch's sparse teacher targets."""
        key = f"teacher.{level}"
        if f"{key}.classes" not in targets:
            raise HerbensError(f"distillation of level {level!r}: the batch carries no teacher targets")
        return sparse_kl_div(outputs[level], targets[f"{key}.classes"], targets[f"{key}.logp"],
                             targets[f"{key}.rest"], self.distill["temperature"])

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


def check_mixup_compatible(levels_cfg: dict, augment_cfg: dict, losses: dict | None = None) -> None:
    """Refuse mixup/cutmix with a loss that needs hard labels (margin losses, Seesaw).

    The trainer calls this at start-up, so the error comes before any compute is spent.

    Args:
        levels_cfg: the recipe's ``levels`` block.
        augment_cfg: the recipe's ``augment`` block (``mixup`` and ``cutmix`` alphas).
        losses: name -> loss class registry (default: ``herbens.losses.LOSSES``).
    """
    if not ((augment_cfg.get("mixup") or 0) > 0 or (augment_cfg.get("cutmix") or 0) > 0):
        return
    if losses is None:
        from herbens.losses import LOSSES as losses  # noqa: N811 (late import: avoids a cycle)
    for level, spec in levels_cfg.items():
        if spec is None:
            continue
        cls = losses.get(spec.get("loss", "ce"))
        if cls is not None and not cls.supports_soft_targets:
            raise HerbensError(mixup_error(cls, level))
