"""Recipes: loading and merging (:mod:`.loading`), the typed schema (:mod:`.schema`), component
nodes (:mod:`.components`), cross-key rules and the --resume comparison (:mod:`.rules`), and
the generated ``recipes/_base.yaml`` (:mod:`.basefile`)."""

from herbens.config.loading import (BASE_RECIPE, RECIPES_DIR, apply_overrides, deep_merge,
                                    load_config, load_run_config, parse_override,
                                    resolve_recipe_path, save_config, validate_config)
from herbens.config.rules import check_resume

__all__ = ["BASE_RECIPE", "RECIPES_DIR", "apply_overrides", "check_resume", "deep_merge", "load_config",
           "load_run_config", "parse_override", "resolve_recipe_path", "save_config", "validate_config"]
