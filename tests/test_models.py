"""HierarchicalNet and heads, tested by behaviour on tiny timm ``test_*`` models."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from herbens.errors import HerbensError
from herbens.losses import build_criterion
from herbens.models.heads import CosineHead, LinearHead, SubCenterArcFaceHead, build_head
from herbens.models.net import HierarchicalNet, build_model

LEVELS_CFG = {
    "species": {"head": "linear", "head_params": {}, "loss": "ce", "loss_params": {"label_smoothing": 0.1},
                "weight": 1.0},
    "genus": {"head": "linear", "head_params": {}, "loss": "ce", "loss_params": {}, "weight": 0.5},
    "family": {"head": "linear", "head_params": {}, "loss": "ce", "loss_params": {}, "weight": 0.25},
}



def make_cfg(backbone="test_efficientnet", levels=None, **model):
    cfg = {"model": {"backbone": backbone, "pretrained": False, "pretrained_file": None,
                     "drop_path_rate": 0.0, "drop_rate": 0.0, "neck": "none", "embedding_dim": 16,
                     "channels_last": False, "grad_checkpointing": False, "compile": False},
           "levels": copy.deepcopy(LEVELS_CFG if levels is None else levels)}
    cfg["model"].update(model)
    return cfg


def batch(taxonomy, size=4):
    torch.manual_seed(0)
    images = torch.randn(size, 3, 64, 64)
    species = torch.tensor([0, 0, 3, 5, 1, 2, 4, 4][:size])
    targets = {level: taxonomy.level_indices(level, species) for level in ("species", "genus", "family")}
    return images, targets


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_vit", "test_convnext", "test_mambaout"])
def test_shapes_per_level_and_finite(backbone, taxonomy):
    model = build_model(make_cfg(backbone), taxonomy).eval()
    images, _ = batch(taxonomy, 2)
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"embedding", "species", "genus", "family"}
    assert out["embedding"].shape == (2, model.embedding_dim)
    for level in ("species", "genus", "family"):
        assert out[level].shape == (2, taxonomy.num_classes(level))
        assert torch.isfinite(out[level]).all()


def _assert_every_parameter_gets_a_gradient(model):
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"


@pytest.mark.parametrize("neck,species_head,species_loss,family_loss", [
    ("none", "linear", "ce", "ce"),
    ("linear", "cosine", "seesaw", "class_balanced"),
    ("bnneck", "subcenter_arcface", "subcenter_arcface", "ams"),
    ("none", "subcenter_arcface", "ce", "logit_adjusted"),
])
def test_every_parameter_gets_a_gradient(neck, species_head, species_loss, family_loss, taxonomy):
    levels = copy.deepcopy(LEVELS_CFG)
    levels["species"].update(head=species_head, loss=species_loss, loss_params={})
    levels["family"].update(loss=family_loss, loss_params={})
    model = build_model(make_cfg(levels=levels, neck=neck, drop_path_rate=0.1, drop_rate=0.1), taxonomy).train()
    criterion = build_criterion(levels, taxonomy).train()
    images, targets = batch(taxonomy)
    out = model(images, targets)
    assert ("species_margin_loss" in out) == (species_head == "subcenter_arcface")
    result = criterion(out, targets)
    assert torch.isfinite(result["loss"])
    result["loss"].backward()
    _assert_every_parameter_gets_a_gradient(model)


def test_margin_loss_only_when_training_with_targets(taxonomy):
    levels = copy.deepcopy(LEVELS_CFG)
    levels["species"].update(head="subcenter_arcface", loss="subcenter_arcface", loss_params={})
    model = build_model(make_cfg(levels=levels), taxonomy)
    images, targets = batch(taxonomy, 2)
    assert "species_margin_loss" not in model.train()(images)
    assert "species_margin_loss" not in model.eval()(images, targets)
    out = model.train()(images, targets)
    assert out["species_margin_loss"].dtype == torch.float32 and out["species_margin_loss"].ndim == 0
    with pytest.raises(HerbensError, match="no 'species' target"):
        model(images, {"genus": targets["genus"]})


def test_heads_dropped_when_level_is_none(taxonomy):
    levels = copy.deepcopy(LEVELS_CFG)
    levels["family"] = None
    levels["genus"] = None
    model = build_model(make_cfg(levels=levels), taxonomy)
    assert list(model.heads) == ["species"]
    out = model.eval()(batch(taxonomy, 2)[0])
    assert set(out) == {"embedding", "species"}
    with pytest.raises(HerbensError, match="at least one level"):
        build_model(make_cfg(levels={"species": None, "genus": None, "family": None}), taxonomy)


@pytest.mark.parametrize("neck,dim", [("none", 256), ("linear", 16), ("bnneck", 16)])
def test_neck_variants(neck, dim, taxonomy):
    model = build_model(make_cfg(neck=neck, embedding_dim=16), taxonomy)
    assert model.embedding_dim == dim
    assert model.heads["species"].fc.in_features == dim
    if neck == "bnneck":
        assert not model.neck.bn.bias.requires_grad  # BagTricks: frozen BN bias
        # The embedding is taken before the BN, the heads see it after.
        model.train()
        images, _ = batch(taxonomy)
        emb = model(images)["embedding"]
        features = model.trunk(images)
        torch.testing.assert_close(emb, model.neck.fc(features))
    with pytest.raises(HerbensError, match="unknown neck 'bn'"):
        build_model(make_cfg(neck="bn"), taxonomy)
    with pytest.raises(HerbensError, match="embedding_dim"):
        build_model(make_cfg(neck="linear", embedding_dim=None), taxonomy)


def test_unknown_names_are_loud(taxonomy):
    with pytest.raises(HerbensError, match="unknown timm model 'convnext_huger'.*convnext"):
        build_model(make_cfg("convnext_huger"), taxonomy)
    levels = copy.deepcopy(LEVELS_CFG)
    levels["genus"]["head"] = "arcface"
    with pytest.raises(HerbensError, match="levels.genus: unknown head 'arcface'.*linear, cosine, subcenter_arcface"):
        build_model(make_cfg(levels=levels), taxonomy)
    levels["genus"].update(head="cosine", head_params={"scael": 3})
    with pytest.raises(HerbensError, match="unknown parameter.*scael.*accepted: scale"):
        build_model(make_cfg(levels=levels), taxonomy)


def test_offline_pretrained_file(tmp_path, monkeypatch, taxonomy):
    # No network: every remote loader of timm's builder fails the test if it is reached.
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(timm.models._builder, name, no_network)
    source = timm.create_model("test_efficientnet")  # with its 1000-class classifier, like hub weights
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model(make_cfg(pretrained=True, pretrained_file=str(path)), taxonomy)
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
    got = model.trunk.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)
    with pytest.raises(HerbensError, match="does not exist"):
        build_model(make_cfg(pretrained=True, pretrained_file=str(tmp_path / "missing.pth")), taxonomy)


def test_channels_last_and_grad_checkpointing_run(taxonomy):
    model = build_model(make_cfg(channels_last=True, grad_checkpointing=True), taxonomy).train()
    assert model.trunk.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    images, targets = batch(taxonomy)
    out = model(images, targets)
    assert all(torch.isfinite(v).all() for v in out.values())
    sum(out[level].sum() for level in ("species", "genus", "family")).backward()
    _assert_every_parameter_gets_a_gradient(model)


def test_data_config_and_public_parts(taxonomy):
    model = build_model(make_cfg(), taxonomy)
    assert model.data_config == timm.data.resolve_model_data_config(model.trunk)
    assert {"input_size", "mean", "std", "interpolation", "crop_pct"} <= set(model.data_config)
    assert isinstance(model.heads, torch.nn.ModuleDict)
    assert hasattr(model.trunk, "group_matcher")  # timm's layer-decay helper needs it
    n_parts = sum(p.numel() for part in (model.trunk, model.neck, model.heads) for p in part.parameters())
    assert n_parts == sum(p.numel() for p in model.parameters())


def test_direct_constructor_defaults_to_linear_heads():
    model = HierarchicalNet("test_convnext", {"species": 7, "genus": 3}, heads={"genus": {"head": "cosine"}})
    assert isinstance(model.heads["species"], LinearHead)
    assert isinstance(model.heads["genus"], CosineHead)


def test_build_head_types_and_cosine_scale():
    assert isinstance(build_head("subcenter_arcface", 8, 5, sub_centers=2), SubCenterArcFaceHead)
    head = build_head("cosine", 8, 5, scale=10.0)
    logits = head(torch.randn(3, 8) * 100)
    assert logits.abs().max() <= 10.0 + 1e-4
    with pytest.raises(HerbensError, match="unknown head 'softmax'"):
        build_head("softmax", 8, 5)


def test_model_kwargs_reach_timm(taxonomy):
    # test_vit3 is built for 160 px; model_kwargs lets a recipe run a ViT at another size.
    net = HierarchicalNet("test_vit3", {"species": 7}, {}, model_kwargs={"img_size": 64})
    assert net.trunk.patch_embed.img_size == (64, 64)
    assert net.eval()(torch.zeros(1, 3, 64, 64))["species"].shape == (1, 7)
    with pytest.raises(Exception):
        HierarchicalNet("test_vit3", {"species": 7}, {})(torch.zeros(1, 3, 64, 64))
