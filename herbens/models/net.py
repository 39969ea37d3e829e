"""HierarchicalNet: a timm trunk, an optional neck, and one head per taxonomic level.

```
images -> trunk (timm, num_classes=0: pooled features, dropout drop_rate)
       -> neck  (none | linear | bnneck)  -> "embedding"
       -> heads {species, genus, family}   -> "<level>" logits (+ "<level>_margin_loss")
```

The trunk is wrapped, not forked: ``timm.create_model(..., num_classes=0)`` and our own heads on
its pooled output (as open_clip's ``TimmModel`` does). ``model.trunk``, ``model.neck`` and
``model.heads`` are public so the trainer can give the trunk timm's layer-wise LR decay and
the rest full LR.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from herbens.core.errors import HerbensError
from herbens.models.fused_swinv2 import fuse_window_attention
from herbens.models.heads import build_head
from herbens.models.hub import check_weights_reachable
from herbens.core.registry import components, register

@register("neck", "none")
class IdentityNeck(nn.Module):
    """``none``: embedding and head input are the pooled trunk features."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.out_dim = int(in_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return features, features


@register("neck", "linear")
class LinearNeck(nn.Module):
    """``linear``: embedding = head input = ``Linear(features)``.

    Args:
        in_dim: trunk feature size.
        embedding_dim: the embedding size.
    """

    def __init__(self, in_dim: int, embedding_dim: int = 512):
        super().__init__()
        if embedding_dim <= 0:
            raise HerbensError(f"embedding_dim must be positive, got {embedding_dim!r}")
        self.out_dim = int(embedding_dim)
        self.fc = nn.Linear(in_dim, self.out_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.fc(features)
        return emb, emb


@register("neck", "bnneck")
class BNNeck(LinearNeck):
    """``bnneck`` (BagTricks, Luo et al. 2019): embedding = ``Linear(features)``, head input =
    ``BatchNorm1d(embedding)``.

    A metric loss (AMS) reads the embedding before BN and the classifier sees it after BN,
    which keeps the two losses from pulling the same feature space in different directions.
    The BN bias is frozen, as in BagTricks, so BN only rescales and the classifier's decision
    boundaries stay through the origin.
    """

    def __init__(self, in_dim: int, embedding_dim: int = 512):
        super().__init__(in_dim, embedding_dim)
        self.bn = nn.BatchNorm1d(self.out_dim)
        self.bn.bias.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.fc(features)
        return emb, self.bn(emb)


# Every registered neck (``@register("neck", NAME)``).
NECKS = components("neck")


def build_neck(node: dict, in_dim: int) -> nn.Module:
    """The neck of a resolved ``model.neck`` node ``{name, **params}``; returns
    ``(embedding, head_input)`` from ``forward``."""
    params = dict(node)
    return NECKS[params.pop("name")](in_dim, **params)


class HierarchicalNet(nn.Module):
    """timm trunk -> neck -> one head per level.

    Args:
        backbone: any timm model name (with or without a pretrained tag).
        level_classes: classes per level, e.g. ``{"species": 15501, "genus": 2564}``.
        heads: per level, a head node ``{"name": ..., **params}``. A level missing here gets a
            linear head.
        pretrained: load pretrained trunk weights (from the hub, or ``pretrained_file``).
        pretrained_file: local ``.pth``/``.safetensors`` weights for offline ``pretrained``.
        neck: a neck node, e.g. ``{"name": "bnneck", "embedding_dim": 512}``.
        drop_path_rate: stochastic depth in the trunk.
        drop_rate: dropout on the pooled features (timm's head dropout).
        channels_last: convert inputs (and the model, in :func:`build_model`) to NHWC.
        grad_checkpointing: recompute trunk activations in backward.
        model_kwargs: extra ``timm.create_model`` keywords (e.g. ``img_size`` for a ViT).
        clip_embed_dim: CLIP image towers: keep the image projection (timm's ``head``) of this
            output size, so the trunk outputs CLIP's joint embedding (see herbens.models.clip).
    """

    def __init__(self, backbone: str, level_classes: dict[str, int], heads: dict[str, dict],
                 pretrained: bool = False, pretrained_file: str | Path | None = None,
                 neck: dict | None = None, drop_path_rate: float = 0.0,
                 drop_rate: float = 0.0, channels_last: bool = False,
                 grad_checkpointing: bool = False, model_kwargs: dict | None = None,
                 clip_embed_dim: int | None = None):
        super().__init__()
        if not level_classes:
            raise HerbensError("the model needs at least one level (all levels are null)")
        self.backbone = backbone
        self.trunk = create_trunk(backbone, pretrained, pretrained_file, drop_rate, drop_path_rate,
                                  model_kwargs, clip_embed_dim)
        self.data_config = resolve_model_data_config(self.trunk)
        self.neck = build_neck(neck or {"name": "none"}, trunk_out_dim(self.trunk))
        self.heads = nn.ModuleDict({
            level: build_head(self.neck.out_dim, n, **(heads.get(level) or {"name": "linear"}))
            for level, n in level_classes.items()})
        self.channels_last = channels_last
        self.trunk_frozen = False  # a linear probe (set_trunk_frozen)
        self._frozen_params: list[nn.Parameter] = []
        if grad_checkpointing:
            _enable_grad_checkpointing(self.trunk, backbone)

    @property
    def embedding_dim(self) -> int:
        return self.neck.out_dim

    def set_trunk_frozen(self, frozen: bool) -> None:
        """Freeze the trunk for a linear probe (eval mode, no gradients) or release it.

        Without gradients the optimizer skips the trunk's parameters (no update, no weight
        decay), and in eval mode its BatchNorm statistics and stochastic depth stay still too;
        ``train()`` keeps a frozen trunk in eval mode. Releasing restores only what freezing
        turned off (a parameter timm keeps fixed stays fixed).
        """
        if frozen and not self._frozen_params:
            self._frozen_params = [p for p in self.trunk.parameters() if p.requires_grad]
        for p in self._frozen_params:
            p.requires_grad_(not frozen)
        if not frozen:
            self._frozen_params = []
        self.trunk_frozen = bool(frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.trunk_frozen:
            self.trunk.eval()
        return self

    def forward(self, images: torch.Tensor,
                targets: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Embedding and per-level logits (plus margin losses when training with targets).

        Args:
            images: ``[B, 3, H, W]``.
            targets: per level, hard labels ``[B]``; only margin heads read them.

        Returns:
            ``{"embedding": [B, D], "<level>": [B, C_level], "<level>_margin_loss": scalar}``.
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        emb, head_in = self.neck(self.trunk(images))
        out = {"embedding": emb}
        for level, head in self.heads.items():
            out[level] = head(head_in)
            if getattr(head, "is_margin_head", False) and self.training and targets is not None:
                # The margin loss is computed here, not in the criterion: DDP only all-reduces
                # gradients of parameters used inside the wrapped module's forward, and the
                # ArcFace weights would otherwise go unsynchronised across ranks (PML #710).
                out[f"{level}_margin_loss"] = head.margin_loss(head_in, _level_target(targets, level))
        return out


def create_trunk(backbone: str, pretrained: bool = False, pretrained_file: str | Path | None = None,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 model_kwargs: dict | None = None, clip_embed_dim: int | None = None) -> nn.Module:
    """``timm.create_model(backbone, num_classes=0, ...)`` with herbens errors.

    Offline weights use timm's own loader (``pretrained_cfg_overlay=dict(file=...)``), which
    drops the classifier and adapts input convolutions exactly as a hub download would, and
    converts OpenAI / open_clip checkpoints (``visual.*`` keys) of ``vit_*_clip_*`` models.
    With ``clip_embed_dim`` the trunk keeps timm's ``head`` at that size: for a CLIP tower it is
    the image projection (the checkpoint's ``visual.proj``, bias zero); ``num_classes`` is
    overlaid on the pretrained config too, or timm would drop the projection as a mismatched
    classifier.
    """
    error = backbone_error(backbone)
    if error:
        raise HerbensError(f"model.backbone: {error}")
    num_classes = int(clip_embed_dim or 0)
    kwargs = dict(model_kwargs or {}, pretrained=pretrained, num_classes=num_classes)
    # Only passed when set: a few architectures take no dropout / stochastic-depth argument.
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_file:
        if not pretrained:
            warnings.warn(f"model.pretrained_file {pretrained_file} ignored: model.pretrained is false",
                          stacklevel=2)
        elif not Path(pretrained_file).is_file():
            raise HerbensError(f"model.pretrained_file {pretrained_file} does not exist")
        else:
            kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
    if pretrained and "pretrained_cfg_overlay" not in kwargs:
        check_weights_reachable(backbone)  # offline: fail now, not after a minute of hub retries
    if num_classes:
        kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay", {}), num_classes=num_classes)
    try:
        return timm.create_model(backbone, **kwargs)
    except TypeError as exc:
        raise HerbensError(f"timm model {backbone!r} rejected an option: {exc}") from exc
    except (RuntimeError, OSError) as exc:
        where = pretrained_file or ("the hub (offline: set model.pretrained_file=PATH, or "
                                    "model.pretrained=false to train from scratch)")
        raise HerbensError(f"could not load pretrained weights for {backbone!r} from {where}: {exc}") from exc


def backbone_error(name: str) -> str | None:
    """Why ``name`` is not a timm model (with close matches), or None when it is one.

    A pretrained tag (``convnext_base.fb_in22k_ft_in1k_384``) must be one timm knows: an
    unknown tag would otherwise fail only when the weights are fetched. Hub names
    (``hf-hub:org/repo``) are resolved by timm itself.
    """
    if ":" in name:
        return None
    if "." in name:
        known = timm.list_models(pretrained=True)
        if name in known:
            return None
    else:
        known = timm.list_models()
        if timm.is_model(name):
            return None
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    what = "pretrained tag" if "." in name and timm.is_model(name) else "timm model"
    return (f"unknown {what} {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                         "; see timm.list_models()"))


def trunk_out_dim(trunk: nn.Module) -> int:
    """Size of the trunk's pooled output with ``num_classes=0``.

    Models with a pre-logits layer (MobileNetV3, MambaOut, ...) output ``head_hidden_size``,
    not ``num_features``; a trunk that keeps its head (a CLIP projection) outputs ``num_classes``.
    """
    if getattr(trunk, "num_classes", 0):
        return int(trunk.num_classes)
    return int(getattr(trunk, "head_hidden_size", None) or trunk.num_features)


def build_model(cfg: dict, taxonomy) -> HierarchicalNet:
    """Build the network from a resolved recipe's ``model`` and ``levels`` blocks.

    ``cfg`` is resolved (:func:`herbens.config.load_config`): every node filled, dropped levels
    absent. ``model.fused_attention`` switches SwinV2 window attention to fused SDPA
    (:mod:`herbens.models.fused_swinv2`); ``model.compile`` is left to the trainer.
    """
    m = cfg["model"]
    net = HierarchicalNet(
        backbone=m["backbone"],
        level_classes={level: taxonomy.num_classes(level) for level in cfg["levels"]},
        heads={level: spec["head"] for level, spec in cfg["levels"].items()},
        pretrained=m["pretrained"],
        pretrained_file=m["pretrained_file"],
        neck=m["neck"],
        drop_path_rate=m["drop_path_rate"],
        drop_rate=m["drop_rate"],
        channels_last=m["channels_last"],
        grad_checkpointing=m["grad_checkpointing"],
        model_kwargs=m["model_kwargs"],
        clip_embed_dim=m["clip_embed_dim"],
    )
    fuse_window_attention(net.trunk, m["fused_attention"], m["backbone"])
    if net.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def _enable_grad_checkpointing(trunk: nn.Module, backbone: str) -> None:
    try:
        trunk.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError) as exc:
        raise HerbensError(f"timm model {backbone!r} does not support model.grad_checkpointing: {exc}") from exc


def _level_target(targets: dict[str, torch.Tensor], level: str) -> torch.Tensor:
    if level not in targets:
        raise HerbensError(f"the {level} head has a margin loss but forward got no {level!r} target")
    return targets[level]
