"""Cross-entropy with label smoothing; takes hard labels or mixup/cutmix soft targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herbens.losses.base import LevelLoss
from herbens.core.registry import register


@register("loss")
class CrossEntropyLoss(LevelLoss):
    """``F.cross_entropy(z, y, label_smoothing)``; ``y`` is ``[B]`` int or ``[B, C]`` soft.

    Soft targets are smoothed too (``t * (1 - ls) + ls / C``), so timm's ``Mixup`` must be
    built with ``label_smoothing=0`` to avoid smoothing twice.

    Args:
        level, num_classes, counts: see :class:`LevelLoss` (counts unused).
        label_smoothing: epsilon of label smoothing.
    """

    name = "ce"

    def __init__(self, level: str, num_classes: int, counts=None, label_smoothing: float = 0.0):
        super().__init__(level, num_classes, counts)
        self.label_smoothing = float(label_smoothing)

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(outputs), self.check_target(target),
                               label_smoothing=self.label_smoothing)
