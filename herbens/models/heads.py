"""Classification heads that sit on the embedding: linear, cosine and sub-center ArcFace.

Every head maps an embedding ``[B, D]`` to logits ``[B, C]``. A *margin* head (sub-center
ArcFace) also owns a training loss that needs the labels (:meth:`SubCenterArcFaceHead.margin_loss`);
:class:`herbens.models.net.HierarchicalNet` calls it inside ``forward`` so DDP sees the weights
being used there. Heads are built from their recipe node with :func:`build_head`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import SubCenterArcFaceLoss
from torch import nn

from herbens.core.errors import HerbensError
from herbens.core.registry import components, register
from herbens.core.runtime import autocast_off


@register("head", "linear")
class LinearHead(nn.Module):
    """Plain affine classifier (``nn.Linear`` with bias).

    Args:
        in_dim: embedding size D.
        num_classes: number of classes C.
    """

    is_margin_head = False

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.fc(emb)


@register("head", "cosine")
class CosineHead(nn.Module):
    """Normalised-softmax classifier: ``scale * cos(emb, w_c)`` (no bias, no margin).

    Computed in fp32 with autocast off: a bf16 cosine times a scale of 30 would quantise the
    logits to about +-0.1.

    Args:
        in_dim: embedding size D.
        num_classes: number of classes C.
        scale: logit scale s (temperature 1/s); 30 by default.
    """

    is_margin_head = False

    def __init__(self, in_dim: int, num_classes: int, scale: float = 30.0):
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        with autocast_off(emb.device.type):
            emb = F.normalize(emb.float(), dim=1)
            weight = F.normalize(self.weight.float(), dim=1)
            return self.scale * emb @ weight.t()


@register("head", "subcenter_arcface")
class SubCenterArcFaceHead(nn.Module):
    """Sub-center ArcFace (Deng et al., ECCV 2020) wrapping pytorch-metric-learning 2.x.

    ``forward`` gives inference logits: scale times the best sub-center cosine per class, no
    margin (PML's ``get_logits``). :meth:`margin_loss` gives the ArcFace training loss (margin on
    the target class, then CE). The weight ``W`` ``[D, C * sub_centers]`` lives in
    ``self.loss``, so it is part of the model (optimizer, DDP, checkpoints).

    Both run in fp32 with autocast off. PML's ``compute_loss`` casts ``W.data`` to the dtype of
    the embeddings it receives, so one half-precision batch would leave the weights in half
    precision for good; casting the inputs to fp32 here prevents that.

    Args:
        in_dim: embedding size D.
        num_classes: number of classes C.
        margin: additive angular margin in degrees (PML 2.x units; 28.6 deg = 0.5 rad).
        scale: logit scale s.
        sub_centers: sub-centers k per class.
    """

    is_margin_head = True

    def __init__(self, in_dim: int, num_classes: int, margin: float = 28.6, scale: float = 64.0,
                 sub_centers: int = 3):
        super().__init__()
        self.loss = SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=in_dim,
                                         margin=margin, scale=scale, sub_centers=sub_centers)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        with autocast_off(emb.device.type):
            return self.loss.get_logits(self._fp32(emb))

    def margin_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """ArcFace training loss (fp32 scalar) for hard integer labels ``[B]``."""
        if labels.ndim != 1 or labels.is_floating_point():
            raise HerbensError("sub-center ArcFace needs hard integer labels [B]; "
                               "mixup/cutmix soft targets cannot be used with a margin loss")
        with autocast_off(emb.device.type):
            return self.loss(self._fp32(emb), labels.long())

    def _fp32(self, emb: torch.Tensor) -> torch.Tensor:
        # W must stay fp32 too; if someone called .half() on the model, restore it (see class doc).
        if self.loss.W.dtype != torch.float32:
            self.loss.W.data = self.loss.W.data.float()
        return emb.float()


# Every registered head (``@register("head", NAME)``), these three and any other module's.
HEADS = components("head")


def build_head(in_dim: int, num_classes: int, name: str, **params) -> nn.Module:
    """Build a head from its node ``{name, **params}`` (parameters checked by the recipe schema).

    Args:
        in_dim: embedding size D.
        num_classes: number of classes C.
        name: one of ``HEADS`` (linear, cosine, subcenter_arcface).
        **params: the head's own options (the rest of ``levels.<level>.head``).
    """
    return HEADS[name](in_dim, num_classes, **params)
