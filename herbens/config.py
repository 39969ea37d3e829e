"""Recipes: a YAML file of differences from ``recipes/_base.yaml`` plus ``key=value`` overrides.

The base file declares every key once; a recipe or an override naming any other key is an
error (a typo must not silently train the wrong model). Values are plain nested dicts.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from herbens.errors import HerbensError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
BASE_RECIPE = RECIPES_DIR / "_base.yaml"

# Blocks whose contents belong to the component that receives them (a loss's or head's own
# keyword arguments), so they are not checked against the base.
FREE_FORM_KEYS = {"head_params", "loss_params", "model_kwargs"}


def resolve_recipe_path(recipe: str | Path) -> Path:
    """A recipe path as given, or a bare name looked up in the shipped ``recipes/`` folder."""
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / recipe, RECIPES_DIR / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    raise HerbensError(f"recipe {recipe!r} not found (neither a file nor a name in {RECIPES_DIR})")


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise HerbensError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        raise HerbensError(f"{path}: malformed YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise HerbensError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict, update: dict) -> dict:
    """Return ``base`` updated recursively by ``update`` (free-form blocks are replaced whole)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in FREE_FORM_KEYS:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Load a recipe and, recursively, the recipes named in its ``defaults``."""
    path = path.resolve()
    if path in seen:
        raise HerbensError(f"{path}: circular 'defaults' chain")
    data = _read_yaml(path)
    parents = data.pop("defaults", None)
    if parents is None:
        return data
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, _load_chain((path.parent / parent), seen + (path,)))
    return deep_merge(merged, data)


def check_keys(cfg: dict, base: dict, source: str, where: str = "") -> None:
    """Raise HerbensError for any key of ``cfg`` that ``base`` does not declare."""
    for key, value in cfg.items():
        name = f"{where}{key}"
        if key not in base:
            known = ", ".join(sorted(base))
            raise HerbensError(f"{source}: unknown key '{name}' (known keys here: {known})")
        if key in FREE_FORM_KEYS or value is None:
            continue
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise HerbensError(f"{source}: '{name}' must be a mapping, got {value!r}")
            check_keys(value, base[key], source, f"{name}.")


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
    """Apply ``key=value`` overrides; unknown keys are caught afterwards by check_keys."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        path, value = parse_override(text)
        node = cfg
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return cfg


def load_config(recipe: str | Path, overrides: list[str] | None = None) -> dict:
    """Load a recipe on top of the base, apply overrides, check every key, fill ``name``.

    Args:
        recipe: a YAML path or the name of a shipped recipe.
        overrides: ``key=value`` strings, e.g. ``["data.root=/data/h22", "train.epochs=2"]``.

    Returns:
        The fully resolved configuration as nested dicts.
    """
    path = resolve_recipe_path(recipe)
    base = _read_yaml(BASE_RECIPE)
    recipe_cfg = _load_chain(path)
    check_keys(recipe_cfg, base, str(path))
    cfg = deep_merge(base, recipe_cfg)
    cfg = apply_overrides(cfg, overrides or [])
    check_keys(cfg, base, "command-line override")
    cfg["levels"] = {k: v for k, v in cfg["levels"].items() if v is not None}
    if not cfg["levels"]:
        raise HerbensError(f"{path}: every level was removed; at least 'species' is needed")
    if "species" not in cfg["levels"]:
        raise HerbensError(f"{path}: the 'species' level is required (submissions predict species)")
    if cfg.get("name") is None:
        cfg["name"] = path.stem
    return cfg


def save_config(cfg: dict, path: str | Path) -> None:
    """Write the resolved configuration (the run's ``config.yaml``) atomically."""
    from herbens.fileio import atomic_write

    with atomic_write(path) as handle:
        yaml.safe_dump(cfg, handle, sort_keys=False)
