r"""AMS: herbens' own adaptive-mining triplet loss, inspired by Huang et al. (2022).

Team 5 of Herbarium 2022 trained RegNetY models with an "adaptive mining sample (AMS) loss"
plus CE inside a BagTricks-style re-identification baseline (Huang et al., Information
13(10):453, 2022). Only the paper's abstract is public: no formula, no code. This module is
therefore **not** their loss but an honest formulation of what the abstract describes (triplets
whose hard positives and negatives are mined adaptively, combined with an ID loss). It is close
to the weighted-regularisation triplet of AGW (Ye et al., TPAMI 2021), plus a temperature and a
margin. (In other papers "AMS" means additive-margin softmax, a different thing.)

Formula, on L2-normalised embeddings ``e`` of one batch with labels ``y``:

.. math::

    d_{ij} &= \lVert e_i - e_j \rVert_2 = \sqrt{\max(2 - 2\, e_i \cdot e_j,\ 10^{-12})} \\
    P(a) &= \{ j \ne a : y_j = y_a \}, \quad N(a) = \{ j : y_j \ne y_a \} \\
    w^+_{aj} &= \operatorname{softmax}_{j \in P(a)}(d_{aj} / T), \quad
    w^-_{aj} = \operatorname{softmax}_{j \in N(a)}(-d_{aj} / T) \\
    D^+_a &= \textstyle\sum_{j \in P(a)} w^+_{aj} d_{aj}, \quad
    D^-_a = \textstyle\sum_{j \in N(a)} w^-_{aj} d_{aj} \\
    L_\text{metric} &= \operatorname{mean}_{a : P(a) \ne \emptyset,\ N(a) \ne \emptyset}
        \log(1 + \exp(D^+_a - D^-_a + m)) \\
    L &= \lambda \, L_\text{metric} + \operatorname{CE}_{\varepsilon}(z, y)

Harder pairs (far positives, close negatives) get more weight; the temperature ``T`` moves the
mining from "average of all pairs" (large T) to "batch-hard" (T -> 0). Gradients flow through
the weights too, as in AGW. Anchors with no positive in the batch are skipped, so use the
``pk`` sampler (P classes x K images). ``z`` are this level's classifier logits; with
``model.neck: bnneck`` (recommended) the metric term sees the embedding before the BatchNorm
and the classifier sees it after, as in BagTricks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herbens.core.errors import HerbensError
from herbens.losses.base import LevelLoss
from herbens.core.registry import register
from herbens.core.runtime import autocast_off


def ams_metric_loss(embedding: torch.Tensor, labels: torch.Tensor, temperature: float,
                    margin: float) -> torch.Tensor:
    """The metric term ``L_metric`` of the module docstring (fp32 scalar; 0 without valid anchors)."""
    emb = F.normalize(embedding.float(), dim=1)
    dist = (2.0 - 2.0 * emb @ emb.t()).clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    neg = ~same
    valid = pos.any(1) & neg.any(1)
    if not valid.any():
        return dist.sum() * 0.0  # keeps the graph (and DDP) happy on a batch with no triplet
    dist, pos, neg = dist[valid], pos[valid], neg[valid]
    d_pos = _weighted_mean(dist, pos, dist / temperature)
    d_neg = _weighted_mean(dist, neg, -dist / temperature)
    return F.softplus(d_pos - d_neg + margin).mean()


def _weighted_mean(dist: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    # Softmax over the masked entries of each row; every row has at least one True entry.
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
    return (weights * dist).sum(1)


@register("loss")
class AMSLoss(LevelLoss):
    """``metric_weight * L_metric(embedding) + CE(logits, label_smoothing)`` (hard labels).

    Args:
        level, num_classes, counts: see :class:`LevelLoss` (counts unused).
        margin: m in the soft-margin term.
        temperature: T of the adaptive pair weighting (smaller = harder mining).
        label_smoothing: epsilon of the CE (ID) term; 0.1 as in BagTricks.
        metric_weight: lambda, the weight of the metric term.
    """

    name = "ams"
    supports_soft_targets = False
    is_margin_loss = True
    needs_class_batches = True  # an anchor without a positive in its batch contributes nothing

    def __init__(self, level: str, num_classes: int, counts=None, margin: float = 0.0,
                 temperature: float = 0.1, label_smoothing: float = 0.1, metric_weight: float = 1.0):
        super().__init__(level, num_classes, counts)
        if temperature <= 0:
            raise HerbensError(f"loss ams on level {level}: temperature must be > 0, got {temperature}")
        self.margin = float(margin)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)
        self.metric_weight = float(metric_weight)

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        target = self.check_target(target)
        if "embedding" not in outputs:
            raise HerbensError("loss ams: the model outputs have no 'embedding'")
        ce = F.cross_entropy(self.logits(outputs), target, label_smoothing=self.label_smoothing)
        with autocast_off(target.device.type):
            metric = ams_metric_loss(outputs["embedding"], target, self.temperature, self.margin)
        return self.metric_weight * metric + ce
