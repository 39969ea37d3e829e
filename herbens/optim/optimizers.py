"""The optimizer from the recipe, through timm's factory.

Layer-wise LR decay applies to the trunk only; the neck, the heads and any trainable loss
parameters train at the full learning rate (they start from scratch).
"""

from __future__ import annotations


import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

from herbens.core.errors import HerbensError


# timm optimizer names that take momentum and nesterov keywords.
SGD_FAMILY = ("sgd", "sgdw", "sgdp", "momentum", "nesterov")


def scaled_lr(opt_cfg: dict, global_batch: int) -> float:
    """Peak learning rate, scaled linearly with the global batch when ``lr_base_batch`` is set."""
    lr = float(opt_cfg["lr"])
    if opt_cfg.get("lr_base_batch"):
        lr *= global_batch / float(opt_cfg["lr_base_batch"])
    return lr


def param_groups(model: torch.nn.Module, extra: list[torch.nn.Parameter], opt_cfg: dict) -> list[dict]:
    """Parameter groups: the trunk (layer-decayed if asked), then everything else at full LR."""
    weight_decay = float(opt_cfg["weight_decay"])
    if opt_cfg.get("layer_decay"):
        trunk_groups = param_groups_layer_decay(
            model.trunk, weight_decay=weight_decay, layer_decay=float(opt_cfg["layer_decay"]))
    else:
        trunk_groups = param_groups_weight_decay(model.trunk, weight_decay=weight_decay)
    trunk_ids = {id(p) for p in model.trunk.parameters()}
    rest = [p for p in model.parameters() if id(p) not in trunk_ids and p.requires_grad]
    rest_ids = {id(p) for p in rest}
    rest += [p for p in extra if p.requires_grad and id(p) not in rest_ids and id(p) not in trunk_ids]
    decay = [p for p in rest if p.ndim > 1]
    no_decay = [p for p in rest if p.ndim <= 1]
    groups = list(trunk_groups)
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, extra_params: list, opt_cfg: dict, lr: float):
    """timm optimizer over :func:`param_groups`."""
    kwargs = {}
    if opt_cfg["name"].lower() in SGD_FAMILY:
        kwargs["momentum"] = float(opt_cfg["momentum"])
        if opt_cfg.get("nesterov") is not None:  # null keeps timm's default for the name
            kwargs["nesterov"] = bool(opt_cfg["nesterov"])
    try:
        return create_optimizer_v2(param_groups(model, extra_params, opt_cfg), opt=opt_cfg["name"],
                                   lr=lr, weight_decay=float(opt_cfg["weight_decay"]), **kwargs)
    except (ValueError, AssertionError) as exc:
        raise HerbensError(f"optimizer.name={opt_cfg['name']!r}: {exc}") from None
