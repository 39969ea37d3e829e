"""Shared behaviour of the per-level losses: reading logits, checking targets and counts."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from herbens.core.errors import HerbensError


class LevelLoss(nn.Module):
    """Base of every per-level loss: ``loss(outputs: dict, target: Tensor) -> scalar``.

    Class attributes tell the criterion and the recipe checks what a loss can take:
    ``supports_soft_targets`` (mixup/cutmix ``[B, C]`` targets), ``is_margin_loss``,
    ``needs_class_batches`` (several images of a class per batch: a sampler with
    ``class_batches``) and ``requires_head`` (the head the level must have, for a loss that reads
    that head's output). A loss registers itself with ``@register("loss")``
    (:mod:`herbens.core.registry`); :func:`herbens.config.rules.check_rules` checks these needs.

    Args:
        level: the level whose logits ``outputs[level]`` this loss reads.
        num_classes: classes at that level.
        counts: training images per class (``Taxonomy.level_counts``); some losses ignore it.
    """

    name = "?"
    supports_soft_targets = True
    is_margin_loss = False
    needs_class_batches = False
    requires_head: str | None = None

    def __init__(self, level: str, num_classes: int, counts=None):
        super().__init__()
        self.level = level
        self.num_classes = int(num_classes)
        if counts is not None and len(counts) != self.num_classes:
            raise HerbensError(f"loss {self.name} on level {level}: {len(counts)} class counts "
                               f"for {self.num_classes} classes")

    def logits(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """This level's logits in fp32 (losses are computed in fp32 even under autocast)."""
        if self.level not in outputs:
            raise HerbensError(f"loss {self.name}: the model outputs have no {self.level!r} logits")
        return outputs[self.level].float()

    def check_target(self, target: torch.Tensor) -> torch.Tensor:
        """Return ``target`` as long ``[B]`` or float ``[B, C]``; soft only where supported."""
        if target.ndim == 2:
            if not self.supports_soft_targets:
                raise HerbensError(mixup_error(self, self.level))
            return target.float()
        return target.long()

    def extra_repr(self) -> str:
        return f"level={self.level!r}, num_classes={self.num_classes}"


def mixup_error(loss_cls, level: str, key: str | None = None) -> str:
    """The message for a hard-label loss that is handed mixup/cutmix soft targets."""
    kind = "margin loss" if loss_cls.is_margin_loss else "loss"
    key = key or f"levels.{level}.loss"
    return (f"{key}: mixup/cutmix cannot be combined with {kind} {loss_cls.name} on level {level} "
            f"(it needs hard labels): set augment.mixup=0 and augment.cutmix=0, or change {key}")


def clamped_counts(counts, num_classes: int) -> np.ndarray:
    """Class counts as float64, each at least 1 (an empty class must not divide by zero)."""
    if counts is None:
        raise HerbensError("this loss needs per-class training counts")
    out = np.asarray(counts, dtype=np.float64).reshape(-1)
    if len(out) != num_classes:
        raise HerbensError(f"{len(out)} class counts for {num_classes} classes")
    return np.maximum(out, 1.0)
