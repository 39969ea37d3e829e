"""Recipe loading: defaults chains, overrides, the schema's checks, component nodes, run folders."""

import time

import pytest
import torch
import yaml

from herbens.config import (RECIPES_DIR_ENV, SHIPPED_RECIPES_DIR, apply_overrides, base_recipe, check_resume,
                            load_config, load_run_config, parse_override, recipes_dir, save_config)
from herbens.config.basefile import render_base_yaml
from herbens.config.catalogue import recipe_paths
from herbens.core.errors import HerbensError


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def recipe(tmp_path):
    return write(tmp_path / "r.yaml", {"defaults": str(base_recipe())})


def test_every_recipe_reader_honours_the_recipe_folder_setting(tmp_path, monkeypatch):
    folder = tmp_path / "site-recipes"
    folder.mkdir()
    base = yaml.safe_load(SHIPPED_RECIPES_DIR.joinpath("_base.yaml").read_text())
    base["seed"] = 4242  # a base that differs from the shipped one shows which base was read
    write(folder / "_base.yaml", base)
    write(folder / "mine.yaml", {"train": {"epochs": 3}})
    monkeypatch.setenv(RECIPES_DIR_ENV, str(folder))
    assert recipes_dir() == folder and base_recipe() == folder / "_base.yaml"
    cfg = load_config("mine")  # a bare name is looked up there, on that folder's base
    assert (cfg["seed"], cfg["train"]["epochs"], cfg["name"]) == (4242, 3, "mine")
    assert [p.name for p in recipe_paths()] == ["mine.yaml"]
    with pytest.raises(HerbensError, match=r"recipe 'demo_ce' not found .*site-recipes"):
        load_config("demo_ce")
    monkeypatch.setenv(RECIPES_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(HerbensError, match=rf"{RECIPES_DIR_ENV}=.*absent: not a folder"):
        load_config("mine")
    monkeypatch.delenv(RECIPES_DIR_ENV)
    assert recipes_dir() == SHIPPED_RECIPES_DIR
    assert load_config("demo_ce")["seed"] == yaml.safe_load(SHIPPED_RECIPES_DIR.joinpath("_base.yaml").read_text())["seed"]


def test_recipe_inherits_base_and_overrides_apply(tmp_path):
    recipe = write(tmp_path / "r.yaml", {"defaults": str(base_recipe()), "train": {"epochs": 3}})
    cfg = load_config(recipe, ["train.batch_size=7", "optimizer.lr=0.5", "input.size=[64,48]"])
    assert cfg["train"]["epochs"] == 3
    assert cfg["train"]["batch_size"] == 7
    assert cfg["optimizer"]["lr"] == 0.5
    assert cfg["input"]["size"] == [64, 48]
    assert cfg["name"] == "r"  # defaults to the recipe stem
    assert cfg["seed"] == yaml.safe_load(base_recipe().read_text())["seed"]


def test_base_recipe_is_the_schema_rendered():
    # One place declares every key: the schema. _base.yaml is generated from it.
    assert base_recipe().read_text() == render_base_yaml(), (
        "recipes/_base.yaml differs from herbens/config/schema.py: regenerate it with "
        "python -m herbens.config.basefile > recipes/_base.yaml")


def test_resolved_recipe_has_full_nodes(recipe):
    cfg = load_config(recipe, ["input.size=96"])
    assert cfg["input"]["size"] == [96, 96]
    species = cfg["levels"]["species"]
    assert species["head"] == {"name": "linear"}
    assert species["loss"] == [{"name": "ce", "weight": 1.0, "label_smoothing": 0.1}]
    assert cfg["model"]["neck"] == {"name": "none"} and cfg["sampler"] == {"name": "random"}
    assert cfg["train"]["precision"] == "no"


def test_changing_a_node_name_starts_from_its_own_defaults(recipe):
    cfg = load_config(recipe, ["levels.species.loss=seesaw"])
    assert cfg["levels"]["species"]["loss"] == [{"name": "seesaw", "weight": 1.0, "p": 0.8, "q": 2.0,
                                                 "eps": 0.01}]
    cfg = load_config(recipe, ["levels.species.loss=seesaw", "levels.species.loss.p=0.5"])
    assert cfg["levels"]["species"]["loss"][0]["p"] == 0.5
    # Editing a parameter keeps the node's name and its other parameters.
    cfg = load_config(recipe, ["levels.genus.loss.label_smoothing=0.2"])
    assert cfg["levels"]["genus"]["loss"] == [{"name": "ce", "weight": 1.0, "label_smoothing": 0.2}]
    cfg = load_config(recipe, ["model.neck=bnneck", "model.neck.embedding_dim=64", "sampler=pk"])
    assert cfg["model"]["neck"] == {"name": "bnneck", "embedding_dim": 64}
    assert cfg["sampler"] == {"name": "pk", "classes_per_batch": 16, "images_per_class": 4}
    cfg = load_config(recipe, ["levels.species.head={name: cosine, scale: 10}"])
    assert cfg["levels"]["species"]["head"] == {"name": "cosine", "scale": 10.0}


def test_chained_recipes_merge_nodes_by_name(tmp_path):
    parent = write(tmp_path / "parent.yaml", {"defaults": str(base_recipe()),
                                             "levels": {"species": {"loss": {"name": "seesaw", "p": 0.5}}}})
    child = write(tmp_path / "child.yaml", {"defaults": "parent.yaml",
                                           "levels": {"species": {"loss": {"q": 1.0}}}})
    assert load_config(child)["levels"]["species"]["loss"][0] == {
        "name": "seesaw", "weight": 1.0, "p": 0.5, "q": 1.0, "eps": 0.01}
    other = write(tmp_path / "other.yaml", {"defaults": "parent.yaml",
                                           "levels": {"species": {"loss": {"name": "logit_adjusted"}}}})
    assert load_config(other)["levels"]["species"]["loss"][0] == {
        "name": "logit_adjusted", "weight": 1.0, "tau": 1.0, "label_smoothing": 0.0}


def test_a_list_of_losses_and_editing_one_of_them(recipe):
    cfg = load_config(recipe, ["levels.species.head=subcenter_arcface",
                               "levels.species.loss=[subcenter_arcface, {name: ce, weight: 0.5}]",
                               "levels.species.loss.1.label_smoothing=0.2"])
    assert cfg["levels"]["species"]["loss"] == [
        {"name": "subcenter_arcface", "weight": 1.0},
        {"name": "ce", "weight": 0.5, "label_smoothing": 0.2}]
    with pytest.raises(HerbensError, match=r"levels\.species\.loss is a list of 2 losses"):
        load_config(recipe, ["levels.species.head=subcenter_arcface",
                             "levels.species.loss=[subcenter_arcface, ce]", "levels.species.loss.weight=2"])


# Each bad recipe or override fails at load with one line naming its key (and the bad value).
BAD = [
    (["infer.tta=[centre]"], r"infer\.tta\[0\]: unknown test-time view 'centre' \(did you mean center\?\)"),
    (["infer.tta=[rrc]"], r"infer\.tta\[0\]: .*rrc needs its number of crops"),
    (["infer.tta=[tencrop@-1]"], r"infer\.tta\[0\]: .*positive number"),
    (["infer.tta=[]"], r"infer\.tta: "),
    (["infer.splits=[vall]"], r"infer\.splits\[0\]: must be 'val' or 'test', got 'vall'"),
    (["train.precision=fp32x"], r"train\.precision: must be 'no', 'fp16' or 'bf16', got 'fp32x'"),
    (["train.epochs=abc"], r"train\.epochs: must be a valid integer.*got 'abc'"),
    (["train.epochs=0"], r"train\.epochs: must be greater than or equal to 1, got 0"),
    (["train.epochs=1.7"], r"train\.epochs: must be a valid integer, got a number with a fractional part \(1\.7\)$"),
    (["train.grad_accum=0"], r"train\.grad_accum: must be greater than or equal to 1, got 0"),
    (["train.batch_size=-1"], r"train\.batch_size: must be greater than or equal to 1, got -1"),
    (["input.size=[0,0]"], r"input\.size\[0\]: must be greater than or equal to 1, got 0"),
    (["input.size=[224]"], r"input\.size: "),
    (["augment.scale=[1.0,0.5]"], r"augment\.scale: must be \[min, max\] with 0 <= min <= max <= 1"),
    (["augment.hflip=1.5"], r"augment\.hflip: must be less than or equal to 1, got 1\.5"),
    (["data.val_fraction=1.0"], r"data\.val_fraction: must be less than 1, got 1\.0"),
    (["model.backbone=resnet5O"], r"model\.backbone: unknown timm model 'resnet5O'; did you mean resnet50"),
    (["model.backbone=resnet50.bogus_tag"], r"model\.backbone: unknown pretrained tag 'resnet50\.bogus_tag'"),
    (["levels.species.head=arcface"], r"levels\.species\.head\.name: unknown head 'arcface'.*known: linear, cosine"),
    (["levels.genus.loss=seesw"], r"levels\.genus\.loss\.name: unknown loss 'seesw' \(did you mean seesaw\?\)"),
    (["model.neck=bneck"], r"model\.neck\.name: unknown neck 'bneck' \(did you mean bnneck\?\)"),
    (["sampler=pq"], r"sampler\.name: unknown sampler 'pq'"),
    (["optimizer.name=adamx"], r"optimizer\.name: unknown timm optimizer 'adamx'"),
    (["scheduler.name=cosin"], r"scheduler\.name: unknown scheduler 'cosin' \(did you mean cosine\?\)"),
    (["levels.species.loss.p=0.5"], r"levels\.species\.loss\.p: loss ce takes no parameter 'p' \(accepted: label_smoothing\)"),
    (["levels.species.loss={name: seesaw, p: abc}"], r"levels\.species\.loss\.p: must be a valid number.*got 'abc'"),
    (["levels.species.loss={name: class_balanced, beta: 1.5}"], r"levels\.species\.loss: loss class_balanced: .*beta must be in \[0, 1\)"),
    (["levels.species.loss={name: ce, weight: -1}"], r"levels\.species\.loss\.weight: must be a number >= 0"),
    (["levels.species.head={name: cosine, scael: 3}"], r"levels\.species\.head\.scael: head cosine takes no parameter 'scael'"),
    (["model.neck={name: linear, embedding_dim: 0}"], r"model\.neck: neck linear: embedding_dim must be positive"),
    (["sampler={name: pk, classes_per_batch: 0}"], r"sampler: sampler pk: .*must be >= 1"),
    (["sampler={name: random, alpha: 0.5}"], r"sampler\.alpha: sampler random takes no parameter 'alpha'"),
    (["levels.species.loss=subcenter_arcface"], r"levels\.species\.loss\[0\]: loss subcenter_arcface needs levels\.species\.head: subcenter_arcface, got head 'linear'"),
    (["levels.species.head=subcenter_arcface"], r"levels\.species\.head: head subcenter_arcface is trained by its margin loss"),
    (["augment.mixup=0.8", "levels.species.loss=seesaw"], r"levels\.species\.loss\[0\]: mixup/cutmix cannot be combined with loss seesaw"),
    (["levels.species.loss=ams"], r"levels\.species\.loss\[0\]: loss ams needs several images .*got sampler 'random'"),
    (["levels.species.loss=ams", "sampler={name: pk, images_per_class: 1}"], r"sampler\.images_per_class: a metric loss needs at least 2"),
    (["levels.species=null"], r"levels\.species: .*species level is required"),
    (["train.epochz=2"], r"train\.epochz: unknown key \(known keys here: epochs"),
    (["levels.species.loss_params={p: 0.5}"], r"levels\.species\.loss_params: unknown key from an older recipe format: the loss is one node"),
    (["model.embedding_dim=128"], r"model\.embedding_dim: unknown key from an older recipe format"),
    (["data.format=kaggle2023"], r"data\.format: must be 'auto', 'kaggle2022', 'kaggle2021' or 'csv'"),
    (["train.trackers=[tensorboard, wandbb]"], r"train\.trackers\[1\]: unknown tracker 'wandbb' \(did you mean wandb\?\)"),
    (["infer.tta_space=logits"], r"infer\.tta_space: must be 'logit' or 'prob', got 'logits'"),
    (["infer.splits=[val, val]"], r"infer\.splits: names a split twice"),
    (["augment.ratio=[1.5, 0.5]"], r"augment\.ratio: must be \[min, max\] with 0 < min <= max"),
    (["optimizer.layer_decay=1.5"], r"optimizer\.layer_decay: must be less than or equal to 1, got 1\.5"),
    (["scheduler.pct_start=1.0"], r"scheduler\.pct_start: must be less than 1, got 1\.0"),
    (["train.ema_decay=1"], r"train\.ema_decay: must be less than 1, got 1"),
    (["distill.teacher=runs/t", "augment.mixup=0.2"], r"distill\.teacher cannot be combined with augment\.mixup"),
    (["distill.class_balanced_beta=1.0"], r"distill\.class_balanced_beta: must be less than 1, got 1\.0"),
    (["train.trackers=tensorboard"], r"train\.trackers: must be a valid list, got 'tensorboard'"),
]


@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_values_fail_at_load_naming_the_key(recipe, overrides, message):
    with pytest.raises(HerbensError, match=message) as info:
        load_config(recipe, overrides)
    assert "\n" not in str(info.value) and str(recipe) in str(info.value)


def test_all_bad_values_fail_fast(recipe):
    load_config(recipe)  # imports done
    start = time.perf_counter()
    for overrides, _ in BAD:
        with pytest.raises(HerbensError):
            load_config(recipe, overrides)
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("data, key", [
    ({"train": {"epoch": 3}}, "train.epoch"),
    ({"modle": {}}, "modle"),
    ({"levels": {"species": {"haed": "linear"}}}, "levels.species.haed"),
])
def test_unknown_keys_in_recipe_are_errors(tmp_path, data, key):
    recipe = write(tmp_path / "r.yaml", {"defaults": str(base_recipe()), **data})
    with pytest.raises(HerbensError, match=key.replace(".", r"\.") + ": unknown key"):
        load_config(recipe)


def test_override_syntax_errors(recipe):
    with pytest.raises(HerbensError, match="key=value"):
        load_config(recipe, ["train.epochs"])


def test_level_can_be_dropped(recipe):
    assert set(load_config(recipe, ["levels.family=null"])["levels"]) == {"species", "genus"}


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(HerbensError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(HerbensError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_values_are_yaml_typed():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert apply_overrides({"a": {"b": 1}}, ["a.b=x"]) == {"a": {"b": "x"}}


def test_run_config_round_trips(tmp_path):
    cfg = load_config("team1_swin", ["train.epochs=3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path) == cfg


def test_old_run_config_is_upgraded(tmp_path):
    # A config.yaml written by the format before component nodes.
    old = load_config("demo_ce")
    old["git_revision"] = "unknown"
    old["model"].update(neck="bnneck", embedding_dim=128)
    old["sampler"] = {"name": "random", "alpha": 0.5, "classes_per_batch": 16, "images_per_class": 4}
    for level, spec in old["levels"].items():
        spec.update(head="linear", head_params={}, loss="ce", loss_params={"label_smoothing": 0.1})
    old["levels"]["species"].update(head="cosine", head_params={"scale": 20}, loss="seesaw",
                                    loss_params={"p": 0.5})
    write(tmp_path / "config.yaml", old)
    cfg = load_run_config(tmp_path)
    assert cfg["model"]["neck"] == {"name": "bnneck", "embedding_dim": 128}
    assert cfg["sampler"] == {"name": "random"}
    assert cfg["levels"]["species"]["head"] == {"name": "cosine", "scale": 20.0}
    assert cfg["levels"]["species"]["loss"] == [{"name": "seesaw", "weight": 1.0, "p": 0.5, "q": 2.0, "eps": 0.01}]
    assert "git_revision" not in cfg


def test_resume_refuses_a_changed_loss_or_backbone_and_accepts_epochs(tmp_path):
    recorded = load_config("demo_ce")
    check_resume(recorded, load_config("demo_ce", ["train.epochs=30", "data.num_workers=0",
                                                   "infer.tta=[center]", "data.root=/elsewhere"]), tmp_path)
    changed = load_config("demo_ce", ["levels.species.loss=seesaw", "model.backbone=test_vit",
                                      "train.epochs=30"])
    with pytest.raises(HerbensError) as info:
        check_resume(recorded, changed, tmp_path)
    message = str(info.value)
    assert "model.backbone: run has 'test_resnet', command line has 'test_vit'" in message
    assert "levels.species.loss[0].name: run has 'ce', command line has 'seesaw'" in message
    assert "levels.species.loss[0].p: run has '<absent>', command line has 0.8" in message
    assert "train.epochs" not in message.split("only")[0] and "\n" not in message


def test_level_losses_are_the_weighted_sum_of_their_parts(recipe):
    from herbens.data.taxonomy import Taxonomy
    from herbens.losses import build_criterion, build_level_loss

    taxonomy = Taxonomy(category_ids=[1, 2, 3, 4], species_names=["A a", "A b", "B c", "B d"],
                        genus_names=["A", "B"], family_names=["F"], species_to_genus=[0, 0, 1, 1],
                        species_to_family=[0, 0, 0, 0], counts=[5, 1, 3, 9])
    cfg = load_config(recipe, ["levels.species.loss=[{name: ce, weight: 0.3}, "
                               "{name: logit_adjusted, weight: 2.0, tau: 0.5}]",
                               "levels.species.weight=0.7", "levels.genus=null", "levels.family=null"])
    criterion = build_criterion(cfg["levels"], taxonomy)
    torch.manual_seed(0)
    outputs = {"species": torch.randn(6, 4)}
    target = torch.tensor([0, 1, 2, 3, 3, 0])
    result = criterion(outputs, {"species": target})
    ce = torch.nn.functional.cross_entropy(outputs["species"], target)
    counts = torch.tensor([5.0, 1, 3, 9])
    adjusted = torch.nn.functional.cross_entropy(outputs["species"] + 0.5 * torch.log(counts / counts.sum()), target)
    assert torch.allclose(result["species/ce"], ce) and torch.allclose(result["species/logit_adjusted"], adjusted)
    assert torch.allclose(result["species"], 0.3 * ce + 2.0 * adjusted)
    assert torch.allclose(result["loss"], 0.7 * (0.3 * ce + 2.0 * adjusted))
    single = build_level_loss("ce", "species", 4, [5, 1, 3, 9])
    assert torch.allclose(single(outputs, target), ce)
