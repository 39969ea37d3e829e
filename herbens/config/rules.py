"""Checks that tie several keys together, and the --resume comparison.

Run on the resolved recipe (plain dicts, every node filled) after the schema has checked each
key on its own. Each message names the key path and the bad value.
"""

from __future__ import annotations

from typing import Any

from herbens.config.schema import Recipe, section_class
from herbens.core.errors import HerbensError
from herbens.losses.base import mixup_error
from herbens.models.clip import template_error
from herbens.core.registry import components


def check_rules(cfg: dict, source: str) -> None:
    """Raise HerbensError for keys that are fine alone but not together.

    What a component needs is declared on its class (:mod:`herbens.core.registry`) and checked here
    only: a loss's ``requires_head``, ``needs_class_batches`` and ``supports_soft_targets``,
    a sampler's ``class_batches``, a head's ``is_margin_head`` (trained by the loss that
    requires it).
    """
    try:
        check_mixup_compatible(cfg["levels"], cfg["augment"])
        _check_component_needs(cfg)
    except HerbensError as exc:
        raise HerbensError(f"{source}: {exc}") from None
    distill = cfg["distill"]
    if distill["teacher"] and not distill["online"] and (cfg["augment"]["mixup"] or cfg["augment"]["cutmix"]):
        raise HerbensError(f"{source}: distill.teacher cannot be combined with augment.mixup/cutmix (the "
                           "teacher's stored targets describe the unmixed images): set augment.mixup=0 and "
                           "augment.cutmix=0, or distill.online=true (the teacher scores the mixed batch)")
    if distill["online"] and not distill["teacher"]:
        raise HerbensError(f"{source}: distill.online=true needs distill.teacher (a bundle or a herbens teach folder)")
    _check_probe(cfg, source)
    _check_text_heads(cfg, source)


def check_mixup_compatible(levels_cfg: dict, augment_cfg: dict) -> None:
    """Refuse mixup/cutmix with a loss that needs hard labels (``supports_soft_targets`` False:
    margin losses, Seesaw), so the error comes before any compute is spent."""
    if not (augment_cfg["mixup"] > 0 or augment_cfg["cutmix"] > 0):
        return
    losses = components("loss")
    for level, spec in levels_cfg.items():
        for i, node in enumerate(spec["loss"]):
            cls = losses[node["name"]]
            if not cls.supports_soft_targets:
                raise HerbensError(mixup_error(cls, level, f"levels.{level}.loss[{i}]"))


def _check_component_needs(cfg: dict) -> None:
    """Each loss's head and sampler needs, and each margin head's loss."""
    losses, sampler = components("loss"), cfg["sampler"]
    batching = [name for name, cls in components("sampler").items() if cls.class_batches]
    class_batches = components("sampler")[sampler["name"]].class_batches
    for level, spec in cfg["levels"].items():
        names = [loss["name"] for loss in spec["loss"]]
        head = spec["head"]["name"]
        for i, name in enumerate(names):
            needed = losses[name].requires_head
            if needed and head != needed:
                raise HerbensError(f"levels.{level}.loss[{i}]: loss {name} needs levels.{level}.head: {needed}, "
                                   f"got head {head!r}")
            if losses[name].needs_class_batches and not class_batches:
                raise HerbensError(
                    f"levels.{level}.loss[{i}]: loss {name} needs several images of a species in each batch: "
                    f"set sampler: {{name: {batching[0]}, classes_per_batch: P, images_per_class: K}}, "
                    f"got sampler {sampler['name']!r}")
        margin_losses = sorted(n for n, cls in losses.items() if cls.requires_head == head)
        if components("head")[head].is_margin_head and not set(margin_losses) & set(names):
            fix = (f"add {{name: {margin_losses[0]}}} to levels.{level}.loss" if margin_losses else
                   f"no registered loss declares requires_head = {head!r}")
            raise HerbensError(f"levels.{level}.head: head {head} is trained by its margin loss: {fix}, "
                               f"got {', '.join(names)}")
    metric = any(losses[loss["name"]].needs_class_batches for spec in cfg["levels"].values() for loss in spec["loss"])
    if class_batches and metric and sampler["images_per_class"] < 2:
        raise HerbensError(f"sampler.images_per_class: a metric loss needs at least 2 images per class, "
                           f"got {sampler['images_per_class']}")


def _check_probe(cfg: dict, source: str) -> None:
    """A linear probe (``train.freeze_trunk_epochs``) fits in the run and in its schedule."""
    train = cfg["train"]
    frozen, epochs = train["freeze_trunk_epochs"], train["epochs"]
    if frozen > epochs:
        raise HerbensError(f"{source}: train.freeze_trunk_epochs={frozen} is more than train.epochs={epochs}")
    if 0 < frozen < epochs and cfg["scheduler"]["name"] == "onecycle":
        # The probe and the fine-tuning each get a schedule; two one-cycle schedulers cannot
        # share one optimizer (each rewrites the groups' initial_lr and momentum).
        raise HerbensError(f"{source}: train.freeze_trunk_epochs={frozen} (probe, then fine-tune) needs "
                           f"scheduler.name cosine or none, got onecycle")


def _check_text_heads(cfg: dict, source: str) -> None:
    """``text_heads.levels`` needs the CLIP trunk and cosine heads its embeddings are copied into."""
    levels = cfg["text_heads"]["levels"]
    if not levels:
        return
    model = cfg["model"]
    for level in levels:
        error = template_error(cfg["text_heads"]["template"], level)
        if error:
            raise HerbensError(f"{source}: text_heads.template {cfg['text_heads']['template']!r}: {error}")
        if level not in cfg["levels"]:
            raise HerbensError(f"{source}: text_heads.levels names {level}, but levels.{level} is null")
        head = cfg["levels"][level]["head"]["name"]
        if head != "cosine":
            raise HerbensError(f"{source}: text_heads.levels: levels.{level}.head must be cosine (its weights "
                               f"become the class-name embeddings), got {head!r}")
    if model["neck"]["name"] != "none":
        raise HerbensError(f"{source}: text_heads.levels needs model.neck: none (the heads must see CLIP's "
                           f"image embedding), got {model['neck']['name']!r}")
    if not model["clip_embed_dim"]:
        raise HerbensError(f"{source}: text_heads.levels needs model.clip_embed_dim (the trunk must keep "
                           f"CLIP's image projection)")
    if not model["open_clip_model"]:
        raise HerbensError(f"{source}: text_heads.levels needs model.open_clip_model (the checkpoint's "
                           f"open_clip architecture)")
    if not model["pretrained"] or not (model["pretrained_file"]
                                       or model["open_clip_model"].startswith("local-dir:")):
        # Heads from one checkpoint's text tower on a trunk without its image tower would not match.
        raise HerbensError(f"{source}: text_heads.levels needs model.pretrained=true and model.pretrained_file "
                           f"(the open_clip checkpoint both towers come from)")


def resumable_paths() -> list[str]:
    """Dotted key paths (``train.epochs``, ``infer``) a resumed run may change."""
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
