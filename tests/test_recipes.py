"""Every shipped recipe is valid without training: keys, model name, heads, losses, sizes, shapes.

Models are built on the meta device (shapes, no storage, no weights): a 200 M-parameter model
costs about a second and nothing is downloaded.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from herbens.cli.main import main as cli_main
from herbens.config import catalogue as recipes_module
from herbens.config import load_config, recipes_dir
from herbens.config.catalogue import HERBARIUM_2022_CLASSES, build_meta_model, input_hw, list_recipes, recipe_paths, run_on_zeros
from herbens.data.taxonomy import LEVELS, Taxonomy
from herbens.data.transforms import build_eval_transform, build_train_transform, model_data_config
from herbens.losses import build_criterion
from herbens.optim.optimizers import build_optimizer, scaled_lr
from herbens.optim.schedules import build_schedule

RECIPES = [p.stem for p in recipe_paths()]
# Shared parents (``_paper.yaml``, ...) are not listed but must load on their own too.
ALL_FILES = sorted(p.name for p in recipes_dir().glob("*.yaml"))
BATCH = 2  # images per forward in the shape checks


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    """7 species in 3 genera in 2 families, with uneven counts (for the count-based losses)."""
    return Taxonomy(category_ids=[3, 5, 8, 13, 21, 34, 55],
                    species_names=[f"Genus{g} sp{i}" for i, g in enumerate([0, 0, 0, 1, 1, 2, 2])],
                    genus_names=["Genus0", "Genus1", "Genus2"], family_names=["FamA", "FamB"],
                    species_to_genus=[0, 0, 0, 1, 1, 2, 2], species_to_family=[0, 0, 0, 0, 0, 1, 1],
                    counts=[40, 7, 12, 100, 9, 25, 7])


def active_levels(cfg: dict) -> list[str]:
    return [level for level in LEVELS if cfg["levels"].get(level) is not None]


def test_recipes_are_shipped():
    expected = {
        "paper_mobilenetv3_s", "paper_resnet50", "paper_effnetv2_b1", "paper_effnetv2_s",
        "paper_effnetv2_m", "paper_vit_b32", "paper_vit_b16", "effnetv2_s", "swinv2_b", "swin_b",
        "swin_l", "convnext_b", "deit3_b", "caformer_b36", "effnet_b6_ns", "resnest101",
        "regnety_12g", "team1_swin", "team1_convnext", "team2_caformer", "team2_convnext",
        "team5_regnety"}
    assert expected <= set(RECIPES)
    assert not any(name.startswith("_") for name in RECIPES)


@pytest.mark.parametrize("filename", ALL_FILES)
def test_recipe_loads_with_known_keys(filename):
    cfg = load_config(recipes_dir() / filename)  # unknown keys raise HerbensError
    assert "species" in cfg["levels"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_header_says_what_and_how(name):
    text = (recipes_dir() / f"{name}.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and text.startswith("#"), f"{name}: needs a header comment"
    if not name.startswith("demo_"):
        assert f"accelerate launch herbens/train.py recipes/{name}.yaml data.root=" in text


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_settings_are_consistent(name):
    cfg = load_config(name)
    backbone = cfg["model"]["backbone"]
    assert timm.is_model(backbone), f"{name}: {backbone} is not a timm model"
    if "." in backbone and not backbone.startswith("test_"):
        assert backbone in timm.list_models(backbone.split(".")[0] + "*", pretrained=True), \
            f"{name}: {backbone} has no pretrained tag of that name"
    height, width = input_hw(cfg)
    assert isinstance(cfg["input"]["size"], list) and len(cfg["input"]["size"]) == 2
    assert all(isinstance(s, int) and s > 0 for s in cfg["input"]["size"])
    img_size = cfg["model"]["model_kwargs"].get("img_size")
    if img_size is not None:  # a ViT built for the input size (an int: square)
        assert img_size in (height, [height, width]) and (height == width or img_size == [height, width])
    # Names, parameters and the rules between keys are the schema's (load_config raised if not).
    if cfg["sampler"]["name"] == "pk":
        # The loader's batch is P x K; the LR scaling reads train.batch_size: keep them equal.
        sampler = cfg["sampler"]
        assert sampler["classes_per_batch"] * sampler["images_per_class"] == cfg["train"]["batch_size"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_losses_resolve_and_compute(name, taxonomy):
    cfg = load_config(name)
    criterion = build_criterion(cfg["levels"], taxonomy)
    levels = active_levels(cfg)
    species = torch.tensor([0, 0, 3, 3, 5, 5])  # pairs: the metric losses need positives
    targets = {level: taxonomy.level_indices(level, species) for level in levels}
    outputs = {"embedding": torch.randn(len(species), 16)}
    for level in levels:
        outputs[level] = torch.randn(len(species), taxonomy.num_classes(level))
        if "subcenter_arcface" in [node["name"] for node in cfg["levels"][level]["loss"]]:
            outputs[f"{level}_margin_loss"] = torch.tensor(2.5)  # computed by the head in forward
    losses = criterion(outputs, targets)
    assert torch.isfinite(losses["loss"]) and set(levels) <= set(losses)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_transforms_give_the_input_size(name):
    cfg = load_config(name)
    height, width = input_hw(cfg)
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg["model"]["backbone"]).to_dict()
    data_config = model_data_config(timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg), cfg["input"])
    sheet = Image.new("RGB", (60, 90), (200, 180, 150))  # portrait, like a herbarium sheet
    assert build_train_transform(data_config, cfg["augment"])(sheet).shape == (3, height, width)
    assert build_eval_transform(data_config)(sheet).shape == (3, height, width)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_model_builds_with_its_heads(name, taxonomy):
    # The trunk's forward at the recipe's input size runs once per recipe in
    # test_recipes_command_lists_every_recipe (through the FLOP count); here: heads and optimizer.
    cfg = load_config(name)
    model = build_meta_model(cfg, taxonomy)  # build_model on the meta device, pretrained off
    assert set(model.heads) == set(active_levels(cfg))
    if cfg["model"]["neck"]["name"] != "none":
        assert model.embedding_dim == cfg["model"]["neck"]["embedding_dim"]
    for level, head in model.heads.items():
        _, logits = run_on_zeros(copy.deepcopy(head), (BATCH, model.embedding_dim))
        assert tuple(logits.shape) == (BATCH, taxonomy.num_classes(level)), level
    # The optimizer (layer decay needs the trunk's group matcher) and the schedule build too.
    criterion = build_criterion(cfg["levels"], taxonomy)
    lr = scaled_lr(cfg["optimizer"], global_batch=int(cfg["train"]["batch_size"]) * 8)
    optimizer = build_optimizer(model, list(criterion.parameters()), cfg["optimizer"], lr)
    trainable = [p for p in model.parameters() if p.requires_grad]  # bnneck's BN bias is frozen
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    build_schedule(optimizer, cfg["scheduler"], int(cfg["train"]["epochs"]), 10, lr)


def test_team1_trains_arcface_plus_ce_on_species():
    # As the team's write-up says: sub-center ArcFace and cross-entropy on species, CE above it.
    for name in ("team1_swin", "team1_convnext"):
        levels = load_config(name)["levels"]
        assert levels["species"]["head"]["name"] == "subcenter_arcface"
        assert [(n["name"], n["weight"]) for n in levels["species"]["loss"]] == [("subcenter_arcface", 1.0),
                                                                               ("ce", 1.0)]
        assert all([n["name"] for n in levels[level]["loss"]] == ["ce"] for level in ("genus", "family"))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no optimizer step here
def test_paper_final_model_matches_the_script(taxonomy):
    cfg = load_config("effnetv2_s")
    assert cfg["model"]["backbone"] == "tf_efficientnetv2_s.in21k"
    assert input_hw(cfg) == (400, 400) and cfg["train"]["epochs"] == 60
    assert list(cfg["levels"]) == ["species"]
    assert cfg["levels"]["species"]["loss"] == [{"name": "class_balanced", "weight": 1.0, "beta": 0.9,
                                                 "label_smoothing": 0.1}]
    opt = cfg["optimizer"]
    assert (opt["name"], opt["nesterov"], opt["momentum"], opt["weight_decay"]) == ("sgdw", True, 0.9, 1e-5)
    # 0.7 at the paper's global batch of 512 (64 x 8); one-cycle 0.007 -> 0.7 -> 7e-5.
    assert scaled_lr(opt, 512) == pytest.approx(0.7) and scaled_lr(opt, 64) == pytest.approx(0.0875)
    model = build_meta_model(cfg, taxonomy)
    optimizer = build_optimizer(model, [], opt, 0.7)
    assert type(optimizer).__name__ == "SGDW"  # decoupled weight decay, as the script's SGDW
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    schedule = build_schedule(optimizer, cfg["scheduler"], epochs=1, updates_per_epoch=100, lr=0.7)
    lrs = [optimizer.param_groups[0]["lr"]]
    for step in range(1, 101):
        schedule.step(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.007) and max(lrs) == pytest.approx(0.7, rel=1e-3)
    assert 15 <= int(np.argmax(lrs)) <= 25 and lrs[-1] == pytest.approx(7e-5, rel=0.05)


def test_recipes_json_lists_size_cost_and_losses(capsys):
    names = ["demo_ce", "demo_arcface", "regnety_12g"]
    assert cli_main(["recipes", *names, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == names
    for row in rows:
        assert row["params"] > row["trunk_params"] > 0 and row["gflops"] > 0
    assert rows[1]["levels"]["species"] == {"head": "subcenter_arcface", "loss": "subcenter_arcface", "weight": 1.0}
    regnet = rows[2]
    assert regnet["input_size"] == [544, 416]
    assert regnet["levels"]["species"]["loss"] == "ce"
    assert 80 < regnet["gflops"] < 140  # RegNetY-12G: ~12 GMACs at 224 px, x4.5 the pixels


FOUNDATION = {  # recipe: (input size, pre-training size)
    "dinov2_b14_518": ([518, 518], [518, 518]), "dinov2_b14_392": ([392, 392], [518, 518]),
    "dinov2_l14_518": ([518, 518], [518, 518]), "dinov2_l14_392": ([392, 392], [518, 518]),
    "dinov2_b14_546x420": ([546, 420], [518, 518]), "eva02_b14_448": ([448, 448], [448, 448]),
    "eva02_l14_448": ([448, 448], [448, 448]), "convnextv2_b_384": ([384, 384], [384, 384]),
    "bioclip_b16": ([224, 224], [224, 224]), "bioclip2_l14": ([224, 224], [224, 224])}


def test_foundation_recipes_say_their_pretraining_resolution(capsys):
    assert cli_main(["recipes", *FOUNDATION, "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    for name, (size, pretrained) in FOUNDATION.items():
        assert (rows[name]["input_size"], rows[name]["pretrained_size"]) == (size, pretrained), name
        assert rows[name]["gflops"] > 0
    # The CLIP towers keep their image projection: the heads see CLIP's joint embedding.
    assert rows["bioclip_b16"]["outputs"]["embedding"] == 512
    assert rows["bioclip2_l14"]["outputs"]["embedding"] == 768
    # ViT-B/14 at 518 px, counted by hand: 37 x 37 patches + class + 4 register tokens, 12 blocks of
    # 12 d^2 MACs per token (qkv, projection, 4x MLP) plus 2 N^2 d for attention, the patch
    # embedding and the three heads.
    d, tokens, patches = 768, 37 * 37 + 5, 37 * 37
    macs = 12 * (12 * d * d * tokens + 2 * tokens * tokens * d) + patches * d * 14 * 14 * 3 \
        + d * sum(HERBARIUM_2022_CLASSES.values())
    assert rows["dinov2_b14_518"]["gflops"] == pytest.approx(2 * macs / 1e9, rel=0.01)
    assert rows["dinov2_b14_392"]["gflops"] < 0.6 * rows["dinov2_b14_518"]["gflops"]


def test_foundation_recipes_probe_then_fine_tune():
    for name in FOUNDATION:
        cfg = load_config(name)
        if name.startswith("convnextv2"):
            continue  # a supervised CNN: fine-tuned directly
        assert cfg["train"]["freeze_trunk_epochs"] >= 1 and cfg["optimizer"]["layer_decay"], name
        if name.startswith("bioclip"):
            assert cfg["text_heads"]["levels"] == ["species", "genus", "family"]
            assert all(cfg["levels"][level]["head"]["name"] == "cosine" for level in cfg["text_heads"]["levels"])


def test_unknown_recipe_name_is_a_clear_error(capsys):
    assert cli_main(["recipes", "no_such_recipe"]) == 2
    assert "no_such_recipe" in capsys.readouterr().err


@pytest.mark.slow
def test_recipes_command_lists_every_recipe(capsys, monkeypatch):
    """Every recipe's full model runs at its input size (meta device) with the expected outputs."""
    rows, describe = [], recipes_module.describe_recipe

    def spy(*args, **kwargs):  # keeps each row, whose output sizes the table does not show
        rows.append(describe(*args, **kwargs))
        return rows[-1]

    monkeypatch.setattr(recipes_module, "describe_recipe", spy)
    assert cli_main(["recipes"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "params (M)" in lines[0] and "GFLOPs" in lines[0]
    table, note, experimental = lines[1:len(RECIPES) + 1], lines[len(RECIPES) + 1], lines[len(RECIPES) + 2:]
    assert {line.split()[0] for line in table} == set(RECIPES) and note.startswith("params and GFLOPs")
    # Distillation has not beaten a single run of the same epochs yet (README, Distillation).
    assert [line.split()[0] for line in experimental] == ["demo_distil", "distil_effnetv2_s"]
    assert "n/a" not in out
    for row in rows:
        cfg = load_config(row["name"])
        expected = {level: HERBARIUM_2022_CLASSES[level] for level in active_levels(cfg)}
        outputs = dict(row["outputs"])
        embedding = outputs.pop("embedding")
        assert outputs == expected, row["name"]
        if cfg["model"]["neck"]["name"] != "none":
            assert embedding == cfg["model"]["neck"]["embedding_dim"], row["name"]


def test_list_recipes_without_flops_is_cheap_and_complete():
    rows = list_recipes(["paper_vit_b16"], flops=False)
    assert rows[0]["gflops"] is None and rows[0]["input_size"] == [256, 256]
    assert np.isclose(rows[0]["params_m"], rows[0]["params"] / 1e6, atol=0.01)


def test_recipes_say_which_speed_options_they_train_with():
    rows = {row["name"]: row for row in list_recipes(["swinv2_b", "convnext_b", "resnest101", "swin_b"], flops=False)}
    assert rows["swinv2_b"]["fused_attention"] and rows["swinv2_b"]["compile"] is False
    assert recipes_module.speed_text(rows["swinv2_b"]) == "fused-attn"
    for name in ("convnext_b", "resnest101"):  # measured faster compiled on an H200
        assert rows[name]["compile"] is True and not rows[name]["fused_attention"]
        assert recipes_module.speed_text(rows[name]) == "compile=model"
    assert recipes_module.speed_text(rows["swin_b"]) == "-"  # Swin V1: timm's own fused attention
    assert recipes_module.speed_text({"fused_attention": True, "compile": "trunk"}) == "fused-attn compile=trunk"
    assert "speed" in recipes_module.format_table(list(rows.values())).splitlines()[0]


def test_a_recipe_whose_header_says_experimental_is_listed_as_experimental(tmp_path):
    base = recipes_module.recipe_paths()[0].parent / "demo_ce.yaml"
    (tmp_path / "plain.yaml").write_text(f"# A plain recipe.\ndefaults: {base}\n")
    (tmp_path / "trial.yaml").write_text(f"# A trial recipe.\n# EXPERIMENTAL: no student beat the single run yet\n"
                                         f"defaults: {base}\n")
    rows = {row["name"]: row for row in list_recipes(flops=False, folder=tmp_path)}
    assert rows["plain"]["experimental"] is None
    assert rows["trial"]["experimental"] == "no student beat the single run yet"
    table = recipes_module.format_table(list(rows.values()))
    assert "trial (experimental)" in table and "plain (experimental)" not in table
    assert recipes_module.experimental_lines(list(rows.values())) == [
        "trial is experimental: no student beat the single run yet"]


def test_dinov2_style_weights_load_at_a_non_square_size(tmp_path, taxonomy):
    """A DINOv2-with-registers trunk pre-trained on a square grid loads at a portrait size (as
    dinov2_b14_546x420 does at full size): timm resamples the position embeddings, and the model
    trains (forward and backward) there."""
    from herbens.models.net import build_model

    small = {"embed_dim": 32, "depth": 1, "num_heads": 2}
    source = timm.create_model("vit_base_patch14_reg4_dinov2", img_size=28, num_classes=0, **small)  # 2x2 grid
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(source.state_dict(), path)
    cfg = load_config("dinov2_b14_546x420", [
        f"model.pretrained_file={path}", "model.grad_checkpointing=false",
        "model.model_kwargs={img_size: [42, 28], embed_dim: 32, depth: 1, num_heads: 2}"])
    model = build_model(cfg, taxonomy)
    assert model.trunk.pos_embed.shape[1] == 3 * 2  # registers and class token carry no position
    assert torch.equal(model.trunk.reg_token, source.reg_token)
    out = model(torch.randn(2, 3, 42, 28))
    sum(out[level].sum() for level in model.heads).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
