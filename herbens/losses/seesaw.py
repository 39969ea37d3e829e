"""Seesaw loss (Wang et al., CVPR 2021), as in mmdetection/mmpretrain ``seesaw_loss``.

For a sample of class i with logits z and running label counts N (clamped to >= 1):

- mitigation ``M_ij = (N_j / N_i)^p`` if ``N_j < N_i`` else 1 (damps the penalty a rare
  class j receives from samples of a frequent class i);
- compensation ``C_ij = (s_j / s_i)^q`` if ``s_j > s_i`` else 1, with ``s = softmax(z)``
  detached and ``s_i`` clamped to ``eps`` (restores the penalty when j is wrongly winning);
- loss = CE on ``z'_j = z_j + log(M_ij * C_ij)`` for ``j != i``; the target logit is unchanged.

N counts the labels seen in training so far: a buffer (so it is checkpointed), updated with
each training batch *before* the loss is computed, as in mmdetection. Under
``torch.distributed`` every rank adds the all-reduced batch counts, so all ranks agree.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from herbens.core.errors import HerbensError
from herbens.losses.base import LevelLoss
from herbens.core.registry import register


@register("loss")
class SeesawLoss(LevelLoss):
    """Seesaw loss on hard labels.

    Args:
        level, num_classes, counts: see :class:`LevelLoss` (dataset counts unused: N starts at 0
            and accumulates the labels actually seen, as in the paper).
        p: mitigation exponent (0 disables mitigation).
        q: compensation exponent (0 disables compensation).
        eps: floor of the target probability in the compensation ratio.
    """

    name = "seesaw"
    supports_soft_targets = False

    def __init__(self, level: str, num_classes: int, counts=None, p: float = 0.8, q: float = 2.0,
                 eps: float = 1e-2):
        super().__init__(level, num_classes, counts)
        if p < 0 or q < 0 or eps <= 0:
            raise HerbensError(f"loss seesaw on level {level}: need p >= 0, q >= 0, eps > 0")
        self.p, self.q, self.eps = float(p), float(q), float(eps)
        self.register_buffer("cum_samples", torch.zeros(self.num_classes, dtype=torch.long))

    def forward(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        target = self.check_target(target)
        if self.training:
            self.update_counts(target)
        logits = self.logits(outputs)
        return F.cross_entropy(logits + self.log_seesaw_weights(logits, target), target)

    @torch.no_grad()
    def update_counts(self, target: torch.Tensor) -> None:
        """Add this batch's label counts (summed over all ranks when distributed)."""
        batch = torch.bincount(target, minlength=self.num_classes).to(self.cum_samples)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch, op=dist.ReduceOp.SUM)
        self.cum_samples += batch

    @torch.no_grad()
    def log_seesaw_weights(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``log(M_ij * C_ij)`` ``[B, C]``, zero in the target column.

        Computed in log space: ``p * min(log(N_j / N_i), 0)`` equals ``log M_ij`` and
        ``q * max(log(s_j / s_i), 0)`` equals ``log C_ij``, without overflowing powers.
        """
        log_w = torch.zeros_like(logits)
        if self.p > 0:
            log_n = self.cum_samples.clamp(min=1).to(logits.dtype).log()
            log_w += self.p * (log_n[None, :] - log_n[target][:, None]).clamp(max=0)
        if self.q > 0:
            log_s = F.log_softmax(logits, dim=1)
            log_s_i = log_s.gather(1, target[:, None]).clamp(min=math.log(self.eps))
            log_w += self.q * (log_s - log_s_i).clamp(min=0)
        return log_w.scatter(1, target[:, None], 0.0)
