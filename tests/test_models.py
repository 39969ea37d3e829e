"""HierarchicalNet and heads, tested by behaviour on tiny timm ``test_*`` models."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from herbens.config import base_recipe, load_config
from herbens.core.errors import HerbensError
from herbens.losses import build_criterion
from herbens.models.heads import CosineHead, LinearHead, SubCenterArcFaceHead, build_head
from herbens.models.net import HierarchicalNet, build_model, create_trunk

def make_cfg(*overrides, backbone="test_efficientnet"):
    """The base recipe resolved with ``overrides`` (so nodes are as the trainer receives them)."""
    return load_config(base_recipe(), [f"model.backbone={backbone}", *overrides])


def model_cfg(backbone="test_efficientnet", **model):
    """The base recipe with ``backbone`` and ``model.<key>`` values (JSON is YAML: overrides)."""
    return make_cfg(*(f"model.{key}={json.dumps(value)}" for key, value in model.items()), backbone=backbone)


def batch(taxonomy, size=4):
    torch.manual_seed(0)
    images = torch.randn(size, 3, 64, 64)
    species = torch.tensor([0, 0, 3, 5, 1, 2, 4, 4][:size])
    targets = {level: taxonomy.level_indices(level, species) for level in ("species", "genus", "family")}
    return images, targets


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_vit", "test_convnext", "test_mambaout"])
def test_shapes_per_level_and_finite(backbone, taxonomy):
    model = build_model(make_cfg(backbone=backbone), taxonomy).eval()
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
    ("none", "subcenter_arcface", "[subcenter_arcface, logit_adjusted]", "logit_adjusted"),
])
def test_every_parameter_gets_a_gradient(neck, species_head, species_loss, family_loss, taxonomy):
    cfg = make_cfg(f"model.neck={neck}", "model.drop_path_rate=0.1", "model.drop_rate=0.1",
                   f"levels.species.head={species_head}", f"levels.species.loss={species_loss}",
                   f"levels.family.loss={family_loss}", "sampler=pk")
    model = build_model(cfg, taxonomy).train()
    criterion = build_criterion(cfg["levels"], taxonomy).train()
    images, targets = batch(taxonomy)
    out = model(images, targets)
    assert ("species_margin_loss" in out) == (species_head == "subcenter_arcface")
    result = criterion(out, targets)
    assert torch.isfinite(result["loss"])
    result["loss"].backward()
    _assert_every_parameter_gets_a_gradient(model)


def test_margin_loss_only_when_training_with_targets(taxonomy):
    cfg = make_cfg("levels.species.head=subcenter_arcface", "levels.species.loss=subcenter_arcface")
    model = build_model(cfg, taxonomy)
    images, targets = batch(taxonomy, 2)
    assert "species_margin_loss" not in model.train()(images)
    assert "species_margin_loss" not in model.eval()(images, targets)
    out = model.train()(images, targets)
    assert out["species_margin_loss"].dtype == torch.float32 and out["species_margin_loss"].ndim == 0
    with pytest.raises(HerbensError, match="no 'species' target"):
        model(images, {"genus": targets["genus"]})


def test_heads_dropped_when_level_is_none(taxonomy):
    model = build_model(make_cfg("levels.genus=null", "levels.family=null"), taxonomy)
    assert list(model.heads) == ["species"]
    out = model.eval()(batch(taxonomy, 2)[0])
    assert set(out) == {"embedding", "species"}
    with pytest.raises(HerbensError, match="at least one level"):
        HierarchicalNet("test_efficientnet", {}, {})


@pytest.mark.parametrize("neck,dim", [("none", 256), ("linear", 16), ("bnneck", 16)])
def test_neck_variants(neck, dim, taxonomy):
    model = build_model(make_cfg(f"model.neck={{name: {neck}}}", *(
        ["model.neck.embedding_dim=16"] if neck != "none" else [])), taxonomy)
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



def test_unknown_backbone_is_loud_outside_recipes_too():
    # Recipes check it at load (tests/test_config.py); the trunk factory says the same.
    with pytest.raises(HerbensError, match="unknown timm model 'convnext_huger'; did you mean convnext"):
        create_trunk("convnext_huger")


def test_offline_pretrained_file(tmp_path, monkeypatch, taxonomy):
    # No network: every remote loader of timm's builder fails the test if it is reached.
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download weights")

    for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
        monkeypatch.setattr(timm.models._builder, name, no_network)
    source = timm.create_model("test_efficientnet")  # with its 1000-class classifier, like hub weights
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model = build_model(make_cfg("model.pretrained=true", f"model.pretrained_file={path}"), taxonomy)
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("classifier.")}
    got = model.trunk.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)
    with pytest.raises(HerbensError, match="does not exist"):
        build_model(make_cfg("model.pretrained=true", f"model.pretrained_file={tmp_path / 'missing.pth'}"), taxonomy)


def test_channels_last_and_grad_checkpointing_run(taxonomy):
    model = build_model(make_cfg("model.channels_last=true", "model.grad_checkpointing=true"), taxonomy).train()
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
    model = HierarchicalNet("test_convnext", {"species": 7, "genus": 3}, heads={"genus": {"name": "cosine"}})
    assert isinstance(model.heads["species"], LinearHead)
    assert isinstance(model.heads["genus"], CosineHead)


def test_build_head_types_and_cosine_scale():
    assert isinstance(build_head(8, 5, name="subcenter_arcface", sub_centers=2), SubCenterArcFaceHead)
    head = build_head(8, 5, name="cosine", scale=10.0)
    logits = head(torch.randn(3, 8) * 100)
    assert logits.abs().max() <= 10.0 + 1e-4


def test_model_kwargs_reach_timm(taxonomy):
    # test_vit3 is built for 160 px; model_kwargs lets a recipe run a ViT at another size.
    net = HierarchicalNet("test_vit3", {"species": 7}, {}, model_kwargs={"img_size": 64})
    assert net.trunk.patch_embed.img_size == (64, 64)
    assert net.eval()(torch.zeros(1, 3, 64, 64))["species"].shape == (1, 7)
    with pytest.raises(Exception):
        HierarchicalNet("test_vit3", {"species": 7}, {})(torch.zeros(1, 3, 64, 64))


def test_offline_pretrained_recipe_fails_at_once_offering_both_ways_out(monkeypatch, taxonomy):
    from herbens.models import hub

    def unreachable(address, timeout=None):
        assert address == ("huggingface.co", 443)
        raise OSError("Network is unreachable")

    def no_download(*args, **kwargs):
        raise AssertionError("timm was asked to fetch weights the probe knew it could not get")

    monkeypatch.setattr(hub.socket, "create_connection", unreachable)
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo, name: None)  # nothing cached
    for name in hub.PROXY_VARIABLES + ("HF_HUB_OFFLINE",):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(timm, "create_model", no_download)
    with pytest.raises(HerbensError) as caught:
        build_model(make_cfg("model.pretrained=true"), taxonomy)
    message = str(caught.value)
    assert "huggingface.co cannot be reached" in message
    assert "model.pretrained_file=PATH" in message and "model.pretrained=false" in message


def test_cached_weights_need_no_probe(monkeypatch):
    from herbens.models import hub

    def probe(*args, **kwargs):
        raise AssertionError("probed the network for cached weights")

    monkeypatch.setattr(hub.socket, "create_connection", probe)
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda repo, name: "/cache/" + name)
    hub.check_weights_reachable("test_resnet")
