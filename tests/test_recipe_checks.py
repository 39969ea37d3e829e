"""Every shipped recipe passes the preflight (``herbens train --check``) on the tiny herbarium.

A recipe keeps its structure here: heads, losses, neck, sampler, optimizer, schedule and its
length, precision, gradient accumulation, EMA, test-time views, ``compile``. Only what cannot
run in seconds on a CPU is shrunk: the backbone becomes a tiny model of the same timm family
(:data:`STAND_INS`), the input and the batch shrink so a tiny split holds a full batch, and
pretrained weights are off (no download). Recipes that read external files get them built
here (a planted teacher folder for ``distill.teacher``, a tiny random open_clip checkpoint of
the same tower type for the CLIP recipes' text heads).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import planted_teacher
from test_clip import EMBED_DIM as CLIP_EMBED_DIM
from test_clip import HEADS as CLIP_HEADS
from test_clip import IMAGE as CLIP_IMAGE
from test_clip import LAYERS as CLIP_LAYERS
from test_clip import PATCH as CLIP_PATCH
from test_clip import WIDTH as CLIP_WIDTH
from test_clip import make_checkpoint
from herbens.config import load_config
from herbens.config.catalogue import recipe_paths
from herbens.optim.optimizers import scaled_lr
from herbens.training.fit import check

RECIPES = [p.stem for p in recipe_paths()]
BATCH = 4  # the tiny split's training images hold a few batches of 4

# Backbone prefix -> (tiny stand-in of the same family, its model_kwargs, input size). The
# real name is kept where timm's own keywords shrink it (Swin, ResNeSt), so the recipe's
# architecture, and its layer-decay grouping, is what the preflight builds.
_SWIN = {"img_size": 64, "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2}
_CLIP = {"img_size": CLIP_IMAGE, "patch_size": CLIP_PATCH, "embed_dim": CLIP_WIDTH, "depth": CLIP_LAYERS,
         "num_heads": CLIP_HEADS}
STAND_INS = {
    "test_": (None, None, [48, 32]),  # already tiny: the demo recipes
    "vit_base_patch16_clip": (None, _CLIP, [CLIP_IMAGE, CLIP_IMAGE]),  # the tiny open_clip tower of test_clip
    "vit_large_patch14_clip": (None, _CLIP, [CLIP_IMAGE, CLIP_IMAGE]),
    "eva02_": (None, {"img_size": 28, "embed_dim": 32, "depth": 1, "num_heads": 2}, [28, 28]),
    "vit_": ("test_vit", {"img_size": 32}, [32, 32]),
    "deit3_": ("test_vit", {"img_size": 32}, [32, 32]),
    "swin_": (None, _SWIN, [64, 64]),
    "swinv2_": (None, {**_SWIN, "pretrained_window_sizes": [0, 0, 0, 0]}, [64, 64]),
    "convnext": ("test_convnext", {}, [32, 32]),
    "caformer": ("caformer_s18", {}, [32, 32]),  # the smallest CAFormer (timm fixes its widths)
    "tf_efficientnet": ("test_efficientnet", {}, [32, 32]),
    "mobilenetv3_small": (None, {}, [32, 32]),  # 1.5 M parameters: fast as it is
    "resnet": ("test_resnet", {}, [32, 32]),
    "resnest": (None, {"layers": [1, 1, 1, 1]}, [32, 32]),
    "regnety_": ("regnety_002", {}, [40, 32]),
}


def stand_in(backbone: str) -> tuple[str, dict | None, list[int]]:
    """The tiny backbone, model_kwargs (None: the recipe's own) and input size for ``backbone``."""
    for prefix, (name, kwargs, size) in STAND_INS.items():
        if backbone.startswith(prefix):
            return name or backbone, kwargs, size
    raise AssertionError(f"no tiny stand-in for {backbone!r}: add its family to STAND_INS")


def clip_overrides(cfg: dict, folder: Path) -> list[str]:
    """A tiny random open_clip checkpoint (the recipe's GELU kind) for a recipe with text heads."""
    _, name, path, _ = make_checkpoint(folder, quick_gelu="quickgelu" in cfg["model"]["backbone"])
    return ["model.pretrained=true", f"model.pretrained_file={path}", f"model.clip_embed_dim={CLIP_EMBED_DIM}",
            f"model.open_clip_model={name}"]


def check_overrides(cfg: dict, root: Path, out: Path, teacher: Path) -> list[str]:
    """Overrides that shrink ``cfg`` (a loaded recipe) to the tiny herbarium, keeping its structure."""
    backbone, kwargs, size = stand_in(cfg["model"]["backbone"])
    overrides = [f"data.root={root}", f"output_dir={out}", "data.num_workers=0", "data.val_fraction=0.25",
                 "model.pretrained=false", "model.pretrained_file=null", f"model.backbone={backbone}",
                 f"input.size={size}", f"train.batch_size={BATCH}", f"infer.batch_size={BATCH}"]
    if cfg["text_heads"]["levels"]:
        overrides += clip_overrides(cfg, out.parent)
    if kwargs is not None:
        overrides.append(f"model.model_kwargs={kwargs}")
    if cfg["sampler"]["name"] == "pk":  # 2 species x 2 images: the batch of 4, from 6 species
        overrides += ["sampler.classes_per_batch=2", "sampler.images_per_class=2"]
    if cfg["distill"]["teacher"]:
        overrides.append(f"distill.teacher={teacher}")
    return overrides


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state, fixed by the first Accelerator: each recipe here
    has its own precision (one process trains one recipe in real use)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def teacher(tiny_herbarium, tmp_path_factory) -> Path:
    return planted_teacher(tiny_herbarium, tmp_path_factory.mktemp("teacher"))


def test_every_backbone_family_has_a_stand_in():
    for name in RECIPES:
        stand_in(load_config(name)["model"]["backbone"])


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_passes_the_preflight(name, tiny_herbarium, teacher, tmp_path):
    recipe = load_config(name)
    out = tmp_path / "runs"
    cfg = load_config(name, check_overrides(recipe, tiny_herbarium, out, teacher))
    # The structure under test is the recipe's own.
    assert cfg["levels"] == recipe["levels"] and cfg["scheduler"] == recipe["scheduler"]
    assert cfg["train"] == {**recipe["train"], "batch_size": BATCH}
    assert cfg["optimizer"] == recipe["optimizer"] and cfg["infer"] == {**recipe["infer"], "batch_size": BATCH}
    assert cfg["sampler"]["name"] == recipe["sampler"]["name"] and cfg["distill"].keys() == recipe["distill"].keys()
    for key in ("neck", "compile", "channels_last", "drop_path_rate", "drop_rate", "grad_checkpointing"):
        assert cfg["model"][key] == recipe["model"][key], key

    plan = check(cfg)
    grad_accum = recipe["train"]["grad_accum"]
    assert plan.epochs == recipe["train"]["epochs"] and plan.global_batch == BATCH * grad_accum
    assert plan.lr == pytest.approx(scaled_lr(recipe["optimizer"], BATCH * grad_accum))
    assert plan.batches_per_epoch >= 1 and plan.updates_per_epoch == -(-plan.batches_per_epoch // grad_accum)
    assert set(plan.logits_bytes) == set(recipe["infer"]["splits"]) and plan.checkpoint_bytes > plan.weights_bytes
    assert not out.exists()  # --check leaves the disk as it found it
