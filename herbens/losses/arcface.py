"""Sub-center ArcFace loss: the value the model's ArcFace head computed inside forward.

The margin loss needs the head's weights, and DDP only synchronises gradients of weights used
inside the wrapped model's forward (pytorch-metric-learning issue #710). So
:class:`herbens.models.heads.SubCenterArcFaceHead` computes it there and puts it into the
outputs as ``"<level>_margin_loss"``; this loss only picks it up.
"""

from __future__ import annotations

import torch

from herbens.core.errors import HerbensError
from herbens.losses.base import LevelLoss
from herbens.core.registry import register


@register("loss")
class SubCenterArcFaceMarginLoss(LevelLoss):
    """Returns ``outputs[f"{level}_margin_loss"]`` (hard labels only).

    The margin, scale and sub-centers are parameters of the head node
    (``levels.<level>.head``), not of the loss.
    """

    name = "subcenter_arcface"
    supports_soft_targets = False
    is_margin_loss = True
    requires_head = "subcenter_arcface"  # it reads that head's margin loss output

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        self.check_target(target)
        key = f"{self.level}_margin_loss"
        if key not in outputs:
            raise HerbensError(
                f"loss subcenter_arcface on level {self.level}: the outputs have no {key!r}; it "
                f"needs levels.{self.level}.head: subcenter_arcface, the model in train() mode "
                f"and forward(images, targets)")
        return outputs[key]
