"""Per-level losses, built by name from a recipe's ``levels`` block.

Each loss is an ``nn.Module`` constructed as ``cls(level=..., num_classes=..., counts=...,
**params)`` (the params of its recipe node) and called as ``loss(outputs, target)``: it reads ``outputs[level]`` (AMS also
``outputs["embedding"]``, sub-center ArcFace ``outputs["<level>_margin_loss"]``); ``target`` is
``[B]`` int or ``[B, C]`` soft. :func:`build_criterion` sums a level's weighted losses
(:class:`WeightedLosses`) and combines the levels into a :class:`HierarchicalLoss`.
"""

from __future__ import annotations

from herbens.data.taxonomy import LEVELS
from herbens.losses.base import LevelLoss
# Importing a loss module registers its loss; this order is the order they are listed in.
from herbens.losses.ce import CrossEntropyLoss  # isort: skip
from herbens.losses.class_balanced import ClassBalancedLoss, class_balanced_weights  # isort: skip
from herbens.losses.seesaw import SeesawLoss  # isort: skip
from herbens.losses.logit_adjusted import LogitAdjustedLoss  # isort: skip
from herbens.losses.arcface import SubCenterArcFaceMarginLoss  # isort: skip
from herbens.losses.ams import AMSLoss  # isort: skip
from herbens.losses.hierarchical import HierarchicalLoss, WeightedLosses
from herbens.core.registry import components

# Every registered loss (``@register("loss")``): the built-in ones imported above, and any other
# module's that registered one (a new loss is one new file).
LOSSES = components("loss")

__all__ = ["AMSLoss", "ClassBalancedLoss", "CrossEntropyLoss", "HierarchicalLoss", "LOSSES", "LevelLoss",
           "LogitAdjustedLoss", "SeesawLoss", "SubCenterArcFaceMarginLoss", "WeightedLosses",
           "build_criterion", "build_level_loss"]


def build_level_loss(name: str, level: str, num_classes: int, counts, **params) -> LevelLoss:
    """Build one loss by name (parameters checked by the recipe schema).

    Args:
        name: one of ``LOSSES``.
        level: the level it applies to (the key of its logits in the model outputs).
        num_classes: classes at that level.
        counts: training images per class at that level.
        **params: the loss's options (the rest of its node in ``levels.<level>.loss``).
    """
    return LOSSES[name](level=level, num_classes=num_classes, counts=counts, **params)


def build_criterion(levels_cfg: dict, taxonomy, distill: dict | None = None) -> HierarchicalLoss:
    """The training criterion from a resolved recipe's ``levels`` block.

    Each level's ``loss`` is a list of nodes ``{name, weight, **params}``, summed with their
    weights; the level's own ``weight`` is its share of the total. ``distill`` (from
    :func:`herbens.stores.targets.teacher_for_training`) mixes the distilled levels' losses with the
    teacher's soft targets; with its ``class_balanced_beta``, each image's distillation term is
    weighted by its species' class-balanced weight.
    """
    losses, weights = {}, {}
    for level, spec in levels_cfg.items():
        terms, term_weights = [], []
        for node in spec["loss"]:
            params = {k: v for k, v in node.items() if k not in ("name", "weight")}
            terms.append(build_level_loss(node["name"], level, taxonomy.num_classes(level),
                                          taxonomy.level_counts(level), **params))
            term_weights.append(node["weight"])
        losses[level] = WeightedLosses(terms, term_weights)
        weights[level] = spec["weight"]
    maps = {level: taxonomy.level_map(level) for level in LEVELS}
    beta = (distill or {}).get("class_balanced_beta")
    class_weights = None if beta is None else class_balanced_weights(taxonomy.level_counts("species"), beta)
    return HierarchicalLoss(losses, weights, maps, distill=distill, distill_class_weights=class_weights)
