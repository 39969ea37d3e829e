"""Logit-adjusted cross-entropy (Menon et al., ICLR 2021): CE on ``z + tau * log(prior)``.

Training with the prior added makes the plain logits ``z`` balanced: at inference no
adjustment is needed (the model outputs ``z``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herbens.losses.base import LevelLoss, clamped_counts
from herbens.core.numerics import log_prior
from herbens.core.registry import register


@register("loss")
class LogitAdjustedLoss(LevelLoss):
    """CE (with label smoothing) on ``z + tau * log(pi)``, ``pi = counts / sum(counts)``.

    Args:
        level, num_classes, counts: see :class:`LevelLoss` (counts clamped to >= 1).
        tau: adjustment strength; 1.0 by default.
        label_smoothing: epsilon of label smoothing.
    """

    name = "logit_adjusted"

    def __init__(self, level: str, num_classes: int, counts=None, tau: float = 1.0,
                 label_smoothing: float = 0.0):
        super().__init__(level, num_classes, counts)
        self.tau = float(tau)
        self.label_smoothing = float(label_smoothing)
        prior = log_prior(clamped_counts(counts, self.num_classes))
        adjustment = torch.as_tensor(self.tau * prior, dtype=torch.float32)
        self.register_buffer("adjustment", adjustment, persistent=False)

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(outputs) + self.adjustment, self.check_target(target),
                               label_smoothing=self.label_smoothing)
