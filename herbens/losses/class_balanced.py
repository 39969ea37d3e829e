"""Class-balanced loss (Cui et al., CVPR 2019) on top of cross-entropy.

Effective number ``E_n = (1 - b^n) / (1 - b)``; class weight ``w_c = 1 / E_{n_c}``, rescaled so
the weights sum to C. Each sample's CE is multiplied by ``w_y`` and then *plainly averaged* over
the batch (PyTorch's ``weight=`` with mean reduction would divide by the sum of the weights
instead, undoing the re-weighting in every batch).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from herbens.core.errors import HerbensError
from herbens.losses.base import LevelLoss, clamped_counts
from herbens.core.registry import register


def class_balanced_weights(counts, beta: float) -> np.ndarray:
    """``w_c = (1 - b) / (1 - b^n_c)`` normalised to sum to C (counts clamped to >= 1)."""
    n = clamped_counts(counts, len(counts))
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    return w * (len(w) / w.sum())


@register("loss")
class ClassBalancedLoss(LevelLoss):
    """CE (with label smoothing) times the class-balanced weight of the target class.

    For soft targets the sample weight is the target-weighted mean ``sum_c t_c w_c``.

    Args:
        level, num_classes, counts: see :class:`LevelLoss`.
        beta: effective-number hyper-parameter b in [0, 1); 0.999 by default (iNat 2018).
        label_smoothing: epsilon of label smoothing.
    """

    name = "class_balanced"

    def __init__(self, level: str, num_classes: int, counts=None, beta: float = 0.999,
                 label_smoothing: float = 0.0):
        super().__init__(level, num_classes, counts)
        if not 0.0 <= beta < 1.0:
            raise HerbensError(f"loss class_balanced on level {level}: beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)
        # Derived from the data each run, so not part of the checkpoint.
        weights = torch.as_tensor(class_balanced_weights(counts, self.beta), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        target = self.check_target(target)
        per_sample = F.cross_entropy(self.logits(outputs), target, reduction="none",
                                     label_smoothing=self.label_smoothing)
        weight = target @ self.class_weights if target.ndim == 2 else self.class_weights[target]
        return (per_sample * weight).mean()
