"""Recipes: a YAML file of differences from ``recipes/_base.yaml`` plus ``key=value`` overrides.

Loading merges the ``defaults`` chain and the overrides, then validates the result against the
schema (:mod:`herbens.config.schema`) and the cross-key rules (:mod:`herbens.config.rules`).
The resolved recipe is a plain nested dict (YAML/JSON-safe) with every key and every
component parameter filled. Component nodes merge by name: a node naming another component
replaces the old one whole (it starts from that component's own defaults); a node without a
name, or with the same one, edits the old node.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from herbens.config.components import (
    lowercase,
    params_model,
    registry,
    suggestion,
    with_value,
)
from herbens.config.rules import check_rules
from herbens.config.schema import Recipe, section_class
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write, read_text

# The recipes shipped with the checkout, and the setting that points every reader elsewhere
# (a suite run as another user from a private clone, a site's own recipe folder).
SHIPPED_RECIPES_DIR = Path(__file__).resolve().parent.parent.parent / "recipes"
RECIPES_DIR_ENV = "HERBENS_RECIPES_DIR"

# libyaml's parser when installed (same YAML, ~10x faster than the pure-Python one).
_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice (plain YAML keeps the last value without a word)."""

    def __init__(self, key, first: int, second: int):
        super().__init__(f"key {key!r} appears twice, on lines {first} and {second}")


class _UniqueKeyLoader(_BASE_LOADER):
    """The safe loader, refusing a key (or a whole section) that a mapping repeats."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" merges on purpose
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in lines:
                raise DuplicateKey(key, lines[key], line)
            lines[key] = line
        return super().construct_mapping(node, deep)


_LOADER = _UniqueKeyLoader
# Key paths that hold component nodes ("*": any level).
NODE_PATHS = (("model", "neck"), ("sampler",), ("levels", "*", "head"), ("levels", "*", "loss"))
# Mappings replaced whole by a recipe or override, never merged key by key.
REPLACED_PATHS = (("model", "model_kwargs"),)

# Keys of the format before component nodes, with what to write instead.
OLD_KEYS = {
    "head_params": "the head is one node now: head: {name: cosine, scale: 30}",
    "loss_params": "the loss is one node now: loss: {name: seesaw, p: 0.8}",
    "embedding_dim": "the embedding size is a neck parameter now: model.neck: {name: bnneck, embedding_dim: 512}",
    "git_revision": "the git revision is recorded in the run's provenance.json now",
}


def _matches(path: tuple, patterns) -> bool:
    return any(len(path) == len(p) and all(q in ("*", k) for q, k in zip(p, path)) for p in patterns)


def recipes_dir() -> Path:
    """The recipe folder every reader uses: ``$HERBENS_RECIPES_DIR`` when set, else the shipped
    ``recipes/``. Read at each call, so a change of the setting applies at once."""
    value = os.environ.get(RECIPES_DIR_ENV)
    if not value:
        return SHIPPED_RECIPES_DIR
    folder = Path(value)
    if not folder.is_dir():
        raise HerbensError(f"{RECIPES_DIR_ENV}={value}: not a folder (unset it to use {SHIPPED_RECIPES_DIR})")
    return folder


def base_recipe() -> Path:
    """``_base.yaml`` of the recipe folder: the defaults every recipe starts from."""
    return recipes_dir() / "_base.yaml"


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe path as given, or a bare name looked up in the recipe folder (:func:`recipes_dir`)."""
    path = Path(recipe)
    if path.is_file():
        return path
    folder = recipes_dir()
    for candidate in (folder / recipe, folder / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    names = [p.stem for p in folder.glob("*.yaml") if not p.name.startswith("_")]
    raise HerbensError(f"recipe {recipe!r} not found (neither a file nor a name in {folder})"
                       + suggestion(path.stem, names))


def read_yaml(path: Path) -> dict:
    """A YAML mapping from ``path`` (empty file: ``{}``), with herbens errors."""
    text = read_text(path, hint="save the recipe as UTF-8")
    try:
        data = yaml.load(text, Loader=_LOADER)
    except DuplicateKey as exc:
        raise HerbensError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise HerbensError(f"{path}: malformed YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HerbensError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def merge_node(old, new, where: str = ""):
    """``new`` applied to the component node ``old`` (see the module docstring)."""
    if not isinstance(new, dict):
        return copy.deepcopy(new)  # a name, a list of losses or null: replaces
    if isinstance(old, list):
        if new and all(str(k).isdigit() for k in new):  # levels.species.loss.1.weight=0.5
            out = copy.deepcopy(old)
            for index, edit in new.items():
                if int(index) >= len(out):
                    raise HerbensError(f"{where}.{index}: the list has only {len(out)} entries")
                out[int(index)] = merge_node(out[int(index)], edit, f"{where}.{index}")
            return out
        if len(old) != 1:
            raise HerbensError(f"{where} is a list of {len(old)} losses: edit one by its position, "
                               f"e.g. {where}.0.weight=0.5, or give the whole list")
        old = old[0]
    if isinstance(old, str):
        old = {"name": old}
    if not isinstance(old, dict) or ("name" in new and new["name"] != old.get("name")):
        return copy.deepcopy(new)
    return {**copy.deepcopy(old), **copy.deepcopy(new)}


def deep_merge(base: dict, update: dict, path: tuple = ()) -> dict:
    """``base`` updated recursively by ``update``; component nodes merge by :func:`merge_node`."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        here = path + (key,)
        if _matches(here, NODE_PATHS):
            out[key] = merge_node(out.get(key), value, ".".join(map(str, here)))
        elif isinstance(value, dict) and isinstance(out.get(key), dict) and not _matches(here, REPLACED_PATHS):
            out[key] = deep_merge(out[key], value, here)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Load a recipe and, recursively, the recipes named in its ``defaults``."""
    path = path.resolve()
    if path in seen:
        raise HerbensError(f"{path}: circular 'defaults' chain")
    data = read_yaml(path)
    parents = data.pop("defaults", None)
    if parents is None:
        return data
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, _load_chain((path.parent / parent), seen + (path,)))
    try:
        return deep_merge(merged, data)
    except HerbensError as exc:
        raise HerbensError(f"{path}: {exc}") from None


def parse_override(text: str) -> tuple[list[str], object]:
    """Split ``a.b.c=value`` into its key path and YAML-parsed value."""
    if "=" not in text:
        raise HerbensError(f"override {text!r} is not of the form key=value (e.g. train.epochs=2)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise HerbensError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise HerbensError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return key.split("."), value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides with the merge rules of recipes (nodes merge by name)."""
    for text in overrides:
        path, value = parse_override(text)
        for part in reversed(path):
            value = {part: value}
        try:
            cfg = deep_merge(cfg, value)
        except HerbensError as exc:
            raise HerbensError(f"override {text!r}: {exc}") from None
    return cfg


def error_line(error: dict) -> str:
    """One pydantic error as ``key.path: what is wrong, got VALUE``."""
    loc = [str(part) for part in error["loc"]]
    path = ""
    for part in loc:
        path += f"[{part}]" if part.isdigit() else (f".{part}" if path else part)
    path += (error.get("ctx") or {}).get("subpath", "")
    if error["type"] == "extra_forbidden":
        hint = OLD_KEYS.get(loc[-1])
        return f"{path}: unknown key" + (f" from an older recipe format: {hint}" if hint else
                                         _known_keys(error["loc"][:-1]))
    message = lowercase(error["msg"])
    if error["type"] in ("herbens_node", "value_error"):  # our own messages show the value
        return f"{path}: {message}"
    return f"{path}: {with_value(message, error.get('input'))}"


def _known_keys(loc) -> str:
    model = Recipe
    for part in loc:
        field = model.model_fields.get(str(part))
        section = section_class(field.annotation) if field is not None else None
        if section is None:
            return ""
        model = section
    return f" (known keys here: {', '.join(model.model_fields)})"


def validate_config(data: dict, source: str) -> dict:
    """Check a merged recipe against the schema and the rules; returns the resolved dict.

    Raises:
        HerbensError: one line per bad key (``source: key.path: problem, got VALUE``).
    """
    try:
        cfg = Recipe.model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        lines = [error_line(e) for e in exc.errors()]
        raise HerbensError(f"{source}: " + "; ".join(lines)) from None
    cfg["levels"] = {level: spec for level, spec in cfg["levels"].items() if spec is not None}
    check_rules(cfg, source)
    return cfg


def load_config(recipe: str | Path, overrides: list[str] | None = None) -> dict:
    """Load a recipe on top of the base, apply overrides, validate, fill ``name``.

    Args:
        recipe: a YAML path or the name of a shipped recipe.
        overrides: ``key=value`` strings, e.g. ``["data.root=/data/h22", "train.epochs=2"]``.

    Returns:
        The fully resolved configuration as nested dicts.
    """
    path = resolve_recipe_path(recipe)
    cfg = deep_merge(read_yaml(base_recipe()), _load_chain(path))
    cfg = apply_overrides(cfg, overrides or [])
    if cfg.get("name") is None:
        cfg["name"] = path.stem
    return validate_config(cfg, str(path) + (" with overrides" if overrides else ""))


def upgrade_old_config(cfg: dict) -> dict:
    """A run config written before component nodes (``head_params``, ``loss_params``,
    ``model.embedding_dim``, a sampler block with every sampler's keys, ``git_revision``)
    in the current format; a current config is returned unchanged."""
    cfg = copy.deepcopy(cfg)
    old = "git_revision" in cfg or "embedding_dim" in cfg.get("model", {}) or any(
        isinstance(spec, dict) and ("head_params" in spec or "loss_params" in spec)
        for spec in (cfg.get("levels") or {}).values())
    if not old:
        return cfg
    cfg.pop("git_revision", None)
    model = cfg.get("model", {})
    dim = model.pop("embedding_dim", None)
    if isinstance(model.get("neck"), str):
        model["neck"] = {"name": model["neck"]} | ({"embedding_dim": dim} if model["neck"] != "none" and dim else {})
    for spec in (cfg.get("levels") or {}).values():
        if isinstance(spec, dict):
            spec["head"] = {"name": spec.get("head", "linear"), **(spec.pop("head_params", None) or {})}
            spec["loss"] = {"name": spec.get("loss", "ce"), **(spec.pop("loss_params", None) or {})}
    sampler = cfg.get("sampler")
    if isinstance(sampler, dict) and sampler.get("name") in registry("sampler"):
        # The old block carried every sampler's keys; keep those of the named one.

        accepted = params_model("sampler", sampler["name"]).model_fields
        cfg["sampler"] = {k: v for k, v in sampler.items() if k == "name" or k in accepted}
    return cfg


def load_run_config(run_dir: str | Path) -> dict:
    """A run's recorded ``config.yaml``, through the same schema as a recipe.

    Configs of older herbens versions are upgraded (:func:`upgrade_old_config`); keys added
    since get their defaults.
    """
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.exists():
        raise HerbensError(f"{run_dir} is not a run directory (no config.yaml)")
    return validate_config(upgrade_old_config(read_yaml(config_file)), str(config_file))


def save_config(cfg: dict, path: str | Path) -> None:
    """Write the resolved configuration (the run's ``config.yaml``) atomically."""

    with atomic_write(path) as handle:
        yaml.safe_dump(cfg, handle, sort_keys=False)
