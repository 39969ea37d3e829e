"""Fused window attention for timm's SwinV2: the same maths through ``scaled_dot_product_attention``.

timm's SwinV2 ``WindowAttention`` (timm 1.0) writes its cosine attention as explicit matmul,
softmax and matmul, so every block materialises (and keeps for backward) the full
``[B * nW, nH, N, N]`` attention matrix; with window 24 (N = 576 tokens) that dominates
SwinV2-B's training time. :class:`FusedWindowAttention` computes the same function with
``F.scaled_dot_product_attention``:

- q and k are L2-normalised (cosine attention) and the clamped per-head logit scale is folded
  into q, so SDPA runs with ``scale=1``;
- the continuous relative-position bias (``16 * sigmoid(cpb_mlp(coords))``) and the
  shifted-window mask are summed into one float mask of shape ``[1, nW * nH, N, N]``, broadcast
  over the batch: q, k, v are viewed as ``[B, nW * nH, N, d]`` so no per-image copy of the
  mask is made.

It is applied by changing the class of existing instances after ``timm.create_model``
(:func:`fuse_window_attention`): parameters, buffers and state-dict keys stay those of timm,
so timm's checkpoint loading, gradient checkpointing and ``torch.compile`` work unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.swin_transformer_v2 import WindowAttention

from herbens.core.errors import HerbensError

# timm clamps the learned logit scale at log(1 / 0.01) before exponentiating it.
_MAX_LOGIT_SCALE = math.log(1.0 / 0.01)


class FusedWindowAttention(WindowAttention):
    """timm's SwinV2 ``WindowAttention`` with its attention computed by SDPA (same outputs)."""

    def position_bias(self) -> torch.Tensor:
        """The continuous relative-position bias ``[nH, N, N]`` (timm's formula, unchanged)."""
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        area = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1)
        return 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Window attention of ``x`` ``[B * nW, N, C]`` with the optional shift mask ``[nW, N, N]``."""
        windows, tokens, channels = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        elif self.qkv_bias_separate:
            qkv = self.qkv(x) + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        else:
            qkv = F.linear(x, weight=self.qkv.weight, bias=torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(windows, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        logit_scale = torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp()
        # The scale multiplies q @ k^T; folding it into q scales the same products. The cast
        # keeps q in v's dtype (the fp32 scale would otherwise promote a bf16 q).
        q = (F.normalize(q, dim=-1) * logit_scale).to(v.dtype)
        k = F.normalize(k, dim=-1)
        bias = self.position_bias().unsqueeze(0)  # [1, nH, N, N]
        if mask is not None:
            # Windows are batch-major (timm's window_partition): [B * nW] -> [B, nW]; fold the
            # windows into the head axis so one [1, nW * nH, N, N] mask serves every image.
            num_windows = mask.shape[0]
            bias = (bias + mask.unsqueeze(1)).reshape(1, num_windows * self.num_heads, tokens, tokens)
            q, k, v = (t.reshape(-1, num_windows * self.num_heads, tokens, t.shape[-1]) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0.0,
            scale=1.0)
        out = out.reshape(windows, self.num_heads, tokens, -1).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj_drop(self.proj(out))


def fuse_window_attention(trunk: nn.Module, option: bool | None, backbone: str) -> int:
    """Switch every timm SwinV2 ``WindowAttention`` of ``trunk`` to :class:`FusedWindowAttention`.

    Args:
        trunk: a timm model, changed in place.
        option: the recipe's ``model.fused_attention``: ``None`` (auto: fuse whatever SwinV2
            attention the trunk has), ``True`` (fuse; the trunk must have some) or ``False``.
        backbone: the model name, for the error message.

    Returns:
        How many attention modules now run fused.

    Raises:
        HerbensError: ``option`` is true but the trunk has no SwinV2 window attention.
    """
    if option is False:
        return 0
    # Exact type only: a subclass may have changed the forward this one reproduces.
    targets = [m for m in trunk.modules() if type(m) is WindowAttention]
    if option and not targets:
        raise HerbensError(f"model.fused_attention is true but {backbone!r} has no SwinV2 window "
                           f"attention to fuse (set it to null or false)")
    for module in targets:
        module.__class__ = FusedWindowAttention
    return len(targets)


def fused_attention_count(model: nn.Module) -> int:
    """How many fused SwinV2 attention modules ``model`` holds (what ``herbens recipes`` shows)."""
    return sum(isinstance(m, FusedWindowAttention) for m in model.modules())
