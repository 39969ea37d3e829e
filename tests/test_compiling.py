"""``model.compile``: which modules are compiled, plain state-dict keys, and the same numbers."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from herbens.core.errors import HerbensError
from herbens.models.compiling import compile_model, compile_seconds, trunk_blocks
from herbens.models.net import build_model
from test_fused_swinv2 import BACKBONE as SWINV2, TINY as SWINV2_TINY
from test_models import model_cfg


def _compiled(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m._compiled_call_impl is not None]


@pytest.mark.parametrize("backbone, expected", [
    ("test_convnext", lambda t: [b for stage in t.stages for b in stage.blocks]),
    ("test_vit", lambda t: list(t.blocks)),
    ("test_efficientnet", lambda t: [b for stage in t.blocks for b in stage]),
    ("test_resnet", lambda t: [b for layer in (t.layer1, t.layer2, t.layer3, t.layer4) for b in layer]),
])
def test_trunk_blocks_are_timms_blocks(backbone, expected):
    trunk = timm.create_model(backbone, num_classes=0)
    assert trunk_blocks(trunk) == expected(trunk)


def test_swinv2_trunk_blocks_are_its_transformer_blocks():
    trunk = timm.create_model(SWINV2, num_classes=0, **SWINV2_TINY)
    assert trunk_blocks(trunk) == [b for stage in trunk.layers for b in stage.blocks]


@pytest.mark.parametrize("mode", [True, "trunk"])
def test_compiling_in_place_keeps_modules_and_state_dict_keys(mode, taxonomy):
    model = build_model(model_cfg("test_convnext"), taxonomy)
    keys = list(model.state_dict())
    count = compile_model(model, mode, "test_convnext")
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    if mode is True:
        assert count == 1 and _compiled(model) == [""]
    else:
        assert count == len(trunk_blocks(model.trunk)) == 9
        depths = [len(stage.blocks) for stage in model.trunk.stages]  # test_convnext: 1, 2, 4, 2
        assert _compiled(model) == [f"trunk.stages.{s}.blocks.{b}" for s, n in enumerate(depths) for b in range(n)]
    # A deep copy (the EMA model) is an ordinary eager module.
    assert _compiled(copy.deepcopy(model)) == []


def test_false_compiles_nothing_and_bad_modes_are_refused(taxonomy):
    model = build_model(model_cfg(), taxonomy)
    assert compile_model(model, False, "test_efficientnet") == 0 and _compiled(model) == []
    with pytest.raises(HerbensError, match="model.compile must be false, true or trunk, got 'blocks'"):
        compile_model(model, "blocks", "test_efficientnet")


def test_trunk_without_block_sequences_is_refused(taxonomy):
    with torch.device("meta"):  # RegNet keeps its blocks as named attributes b1, b2, ...: none found
        model = build_model(model_cfg("regnety_002"), taxonomy)
    with pytest.raises(HerbensError, match="model.compile=trunk: timm model 'regnety_002' exposes no repeated"):
        compile_model(model, "trunk", "regnety_002")


@pytest.mark.slow
@pytest.mark.cpu_heavy  # inductor compiles 4 SwinV2 blocks forward and backward: > 5 min on 2 cores
def test_trunk_compiled_fused_swinv2_trains_like_eager(taxonomy):
    eager = build_model(model_cfg(SWINV2, model_kwargs=dict(SWINV2_TINY)), taxonomy).train()
    compiled = copy.deepcopy(eager)
    assert compile_model(compiled, "trunk", SWINV2) == 4
    before = compile_seconds()
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (eager, compiled):
        out = model(images)
        (out["species"].square().sum() + out["embedding"].square().mean()).backward()
        outputs.append((out["species"].detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert compile_seconds() > before
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-4, atol=1e-5)
    for name, grad in outputs[0][1].items():
        torch.testing.assert_close(outputs[1][1][name], grad, rtol=1e-3, atol=1e-4 * grad.abs().max().item() + 1e-9,
                                   msg=name)
