"""Checks that tie several keys together, and the --resume comparison.

Run on the resolved recipe (plain dicts, every node filled) after the schema has checked each
key on its own. Each message names the key path and the bad value.
"""

from __future__ import annotations

from typing import Any

from herbens.errors import HerbensError


def check_rules(cfg: dict, source: str) -> None:
    """Raise HerbensError for keys that are fine alone but not together."""
    from herbens.losses import LOSSES, REQUIRED_HEAD
    from herbens.losses.hierarchical import check_mixup_compatible

    try:
        check_mixup_compatible(cfg["levels"], cfg["augment"])
    except HerbensError as exc:
        raise HerbensError(f"{source}: {exc}") from None
    for level, spec in cfg["levels"].items():
        names = [loss["name"] for loss in spec["loss"]]
        head = spec["head"]["name"]
        for i, name in enumerate(names):
            needed = REQUIRED_HEAD.get(name)
            if needed and head != needed:
                raise HerbensError(f"{source}: levels.{level}.loss[{i}]: loss {name} needs "
                                   f"levels.{level}.head: {needed}, got head {head!r}")
            if LOSSES[name].needs_class_batches and cfg["sampler"]["name"] != "pk":
                raise HerbensError(
                    f"{source}: levels.{level}.loss[{i}]: loss {name} needs several images of a species "
                    f"in each batch: set sampler: {{name: pk, classes_per_batch: P, images_per_class: K}}, "
                    f"got sampler {cfg['sampler']['name']!r}")
        margin_losses = {n for n, h in REQUIRED_HEAD.items() if h == head}
        if margin_losses and not margin_losses & set(names):
            raise HerbensError(f"{source}: levels.{level}.head: head {head} is trained by its margin loss: "
                               f"add {{name: {sorted(margin_losses)[0]}}} to levels.{level}.loss, got "
                               f"{', '.join(names)}")
    if cfg["distill"]["teacher"] and (cfg["augment"]["mixup"] or cfg["augment"]["cutmix"]):
        raise HerbensError(f"{source}: distill.teacher cannot be combined with augment.mixup/cutmix (the "
                           "teacher's targets describe the unmixed images): set augment.mixup=0 and augment.cutmix=0")
    sampler = cfg["sampler"]
    if sampler["name"] == "pk" and any(LOSSES[loss["name"]].needs_class_batches
                                       for spec in cfg["levels"].values() for loss in spec["loss"]):
        if sampler["images_per_class"] < 2:
            raise HerbensError(f"{source}: sampler.images_per_class: a metric loss needs at least 2 "
                               f"images per class, got {sampler['images_per_class']}")


def resumable_paths() -> list[str]:
    """Dotted key paths (``train.epochs``, ``infer``) a resumed run may change."""
    from herbens.config.schema import Recipe, section_class

    found = []

    def walk(model, prefix):
        for key, field in model.model_fields.items():
            path = f"{prefix}{key}"
            if (field.json_schema_extra or {}).get("resumable"):
                found.append(path)
                continue
            section = section_class(field.annotation)
            if section is not None:
                walk(section, path + ".")

    walk(Recipe, "")
    return found


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts (and lists of dicts, by ``[i]``) as ``{dotted.path: leaf}``."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        out = {f"{prefix}.length": len(value)}
        for i, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def check_resume(recorded: dict, current: dict, run_dir) -> None:
    """Refuse to resume a run with a recipe that differs in a key not declared resumable.

    Args:
        recorded: the run's own resolved config (``config.yaml``, through the schema).
        current: the resolved recipe of the resuming command.
        run_dir: the run folder, for the message.

    Raises:
        HerbensError: naming each differing key with both values.
    """
    allowed = resumable_paths()
    old, new = flatten(recorded), flatten(current)
    differing = []
    for key in sorted(set(old) | set(new), key=lambda k: (k not in old, k)):
        if old.get(key, "<absent>") == new.get(key, "<absent>"):
            continue
        if any(key == path or key.startswith(path + ".") for path in allowed):
            continue
        differing.append(f"{key}: run has {old.get(key, '<absent>')!r}, command line has "
                         f"{new.get(key, '<absent>')!r}")
    if differing:
        raise HerbensError(f"--resume: the recipe differs from {run_dir}/config.yaml in keys that cannot "
                           f"change mid-run ({'; '.join(differing)}); only {', '.join(allowed)} may "
                           f"differ. Start a new run (another name=...) to train this recipe")
