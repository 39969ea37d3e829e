"""Per-level losses, built by name from a recipe's ``levels`` block.

Each loss is an ``nn.Module`` constructed as ``cls(level=..., num_classes=..., counts=...,
**loss_params)`` and called as ``loss(outputs, target)``: it reads ``outputs[level]`` (AMS also
``outputs["embedding"]``, sub-center ArcFace ``outputs["<level>_margin_loss"]``); ``target`` is
``[B]`` int or ``[B, C]`` soft. :func:`build_criterion` combines them into a
:class:`HierarchicalLoss`.
"""

from __future__ import annotations

import inspect

from herbens.data.taxonomy import LEVELS
from herbens.errors import HerbensError
from herbens.losses.ams import AMSLoss
from herbens.losses.arcface import SubCenterArcFaceMarginLoss
from herbens.losses.base import LevelLoss
from herbens.losses.ce import CrossEntropyLoss
from herbens.losses.class_balanced import ClassBalancedLoss
from herbens.losses.hierarchical import HierarchicalLoss, check_mixup_compatible
from herbens.losses.logit_adjusted import LogitAdjustedLoss
from herbens.losses.seesaw import SeesawLoss

LOSSES: dict[str, type[LevelLoss]] = {cls.name: cls for cls in (
    CrossEntropyLoss, ClassBalancedLoss, SeesawLoss, LogitAdjustedLoss,
    SubCenterArcFaceMarginLoss, AMSLoss)}

# Losses that read a margin head's output: the level's head must be that head.
REQUIRED_HEAD = {"subcenter_arcface": "subcenter_arcface"}

__all__ = ["LOSSES", "LevelLoss", "HierarchicalLoss", "build_level_loss", "build_criterion",
           "check_mixup_compatible"]


def build_level_loss(name: str, level: str, num_classes: int, counts, **params) -> LevelLoss:
    """Build one level's loss by name.

    Args:
        name: one of ``LOSSES``.
        level: the level it applies to (the key of its logits in the model outputs).
        num_classes: classes at that level.
        counts: training images per class at that level.
        **params: the loss's options (``levels.<level>.loss_params``).

    Raises:
        HerbensError: unknown loss name or parameter.
    """
    if name not in LOSSES:
        raise HerbensError(f"levels.{level}.loss: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    cls = LOSSES[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters
                if p not in ("self", "level", "num_classes", "counts")]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise HerbensError(f"levels.{level}.loss_params: unknown parameter(s) {', '.join(unknown)} "
                           f"for loss {name}; accepted: {', '.join(accepted) or 'none'}")
    return cls(level=level, num_classes=num_classes, counts=counts, **params)


def build_criterion(levels_cfg: dict, taxonomy, distill: dict | None = None) -> HierarchicalLoss:
    """The training criterion from a recipe's ``levels`` block (null levels are skipped).

    ``distill`` (from :func:`herbens.targets.teacher_for_training`) mixes the distilled
    levels' losses with the teacher's soft targets.

    Raises:
        HerbensError: unknown loss or parameter, or a loss paired with the wrong head.
    """
    losses, weights = {}, {}
    for level, spec in levels_cfg.items():
        if spec is None:
            continue
        name = spec.get("loss", "ce")
        head = spec.get("head", "linear")
        if name in REQUIRED_HEAD and head != REQUIRED_HEAD[name]:
            raise HerbensError(f"levels.{level}: loss {name} needs head {REQUIRED_HEAD[name]}, got head {head}")
        losses[level] = build_level_loss(name, level, taxonomy.num_classes(level),
                                         taxonomy.level_counts(level), **(spec.get("loss_params") or {}))
        weights[level] = spec.get("weight", 1.0)
    maps = {level: taxonomy.level_map(level) for level in LEVELS}
    return HierarchicalLoss(losses, weights, maps, distill=distill)
