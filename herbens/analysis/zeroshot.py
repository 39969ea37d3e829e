"""``herbens zeroshot``: macro-F1 of text-initialised heads on the validation split, no training.

A CLIP-family recipe (``model.clip_embed_dim``, ``model.open_clip_model``,
``model.pretrained_file``, cosine heads for ``text_heads.levels``) is built exactly as training
would build it before its first step: the trunk from the checkpoint, the heads from the text
tower's embeddings of the class names. Those heads are CLIP's zero-shot classifier, so this is
the score of the checkpoint with no training at all (the start of a linear probe). The
validation split is the run's own ``split.csv`` when ``<output_dir>/<name>/`` exists (scores
comparable with that run), else the seeded split training would draw.
"""

from __future__ import annotations

from pathlib import Path

from herbens.config import (
    apply_overrides,
    load_config,
    load_run_config,
    validate_config,
)
from herbens.core.errors import HerbensError
from herbens.data.loaders import predict_loader
from herbens.data.run_data import load_run_data
from herbens.data.transforms import build_tta_views, model_data_config
from herbens.models.clip import init_text_heads
from herbens.models.net import build_model
from herbens.training.fit import validate
from herbens.training.setup import build_accelerator


def zero_shot_scores(cfg: dict, run_dir: Path | None = None, progress: bool = True) -> dict:
    """Per-level macro-F1 of the text-initialised heads on the validation split.

    Args:
        cfg: the resolved recipe.
        run_dir: the run whose ``split.csv`` to score when it has one (default
            ``<output_dir>/<name>``).

    Returns:
        ``{"val_<level>_macro_f1": float, ..., "val_images": N, "template": str, "levels": [...]}``.

    Raises:
        HerbensError: no ``text_heads.levels`` (the recipe's rules already require the checkpoint).
    """

    levels = list(cfg["text_heads"]["levels"])
    if not levels:
        raise HerbensError("herbens zeroshot needs text_heads.levels, e.g. text_heads.levels=[species,genus,family]")
    accelerator = build_accelerator(cfg)
    data = load_run_data(cfg, run_dir or Path(cfg["output_dir"]) / cfg["name"], reuse_split=True)
    if len(data.val) == 0:
        raise HerbensError(f"{cfg['data']['root']}: the validation split is empty (data.val_fraction)")
    model = build_model(cfg, data.taxonomy)
    init_text_heads(model, cfg, data.taxonomy)
    data_config = model_data_config(model.data_config, cfg["input"])
    loader = predict_loader(data.val, data.images_dir, data.taxonomy,
                            build_tta_views(["center"], data_config), cfg, data_config=data_config)
    model, loader = accelerator.prepare(model, loader)
    scores = validate(accelerator, model, loader, tuple(levels), data.taxonomy, progress)
    return {**scores, "val_images": int(len(data.val)), "template": cfg["text_heads"]["template"],
            "levels": levels}


def load_zeroshot_config(source: str, overrides: list[str]) -> dict:
    """The resolved config of a recipe, or of a run folder's ``config.yaml``, with overrides.

    Either goes through the recipe schema and its rules (:mod:`herbens.config`).
    """

    if not Path(source).is_dir():
        return load_config(source, overrides)
    cfg = load_run_config(source)
    if not overrides:
        return cfg
    return validate_config(apply_overrides(cfg, overrides), f"{Path(source) / 'config.yaml'} with overrides")
