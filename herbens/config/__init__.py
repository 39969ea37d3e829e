"""Recipes: loading and merging (:mod:`.loading`), the typed schema (:mod:`.schema`), component
nodes (:mod:`.components`), cross-key rules and the --resume comparison (:mod:`.rules`), and
the generated ``recipes/_base.yaml`` (:mod:`.basefile`)."""

from herbens.config.loading import (RECIPES_DIR_ENV, SHIPPED_RECIPES_DIR, apply_overrides, base_recipe,
                                    deep_merge, load_config, load_run_config, parse_override,
                                    recipes_dir, resolve_recipe_path, save_config, validate_config)
from herbens.config.rules import check_resume

__all__ = ["RECIPES_DIR_ENV", "SHIPPED_RECIPES_DIR", "apply_overrides", "base_recipe", "check_resume",
           "deep_merge", "load_config", "load_run_config", "parse_override", "recipes_dir", "resolve_recipe_path",
           "save_config", "validate_config"]
