"""Fused SwinV2 window attention against timm's own forward, on a tiny SwinV2 with shifted windows.

The reference is timm's ``WindowAttention.forward`` (explicit matmul + softmax) in a deep copy
of the same model; inputs are not square so the windows, the shift mask and the
batch-major window order are exercised on both axes.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

from herbens.core.errors import HerbensError
from herbens.models.fused_swinv2 import FusedWindowAttention, fuse_window_attention, fused_attention_count
from herbens.models.net import build_model
from test_models import model_cfg

# 64 x 96 px, patch 4 -> 16 x 24 tokens; window 4 -> stage 1: 4 x 6 windows, stage 2: 2 x 3;
# every second block is shifted (shift 2), so half the blocks carry a mask.
TINY = dict(img_size=(64, 96), patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
BACKBONE = "swinv2_tiny_window8_256"  # a registered SwinV2; TINY shrinks it through model_kwargs


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial biases and logit scales (timm initialises them to constants), one scale past the clamp."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            if name.endswith("logit_scale"):
                param.copy_(math.log(10) + torch.randn(param.shape, generator=gen))
                param.view(-1)[0] = 6.0  # > log(100): timm clamps it
    return model


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    original = _perturb(timm.create_model(BACKBONE, num_classes=5, drop_path_rate=0.0, **TINY)).train()
    fused = copy.deepcopy(original)
    assert fuse_window_attention(fused, None, BACKBONE) == 4
    return original, fused


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 96, generator=torch.Generator().manual_seed(2))


def _forward_backward(model, images, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        features = model.forward_features(images)
        out = model.forward_head(features)
    (features.float().square().mean() + out.float().square().sum()).backward()
    return features.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_tiny_model_has_shifted_masked_windows(pair):
    original, _ = pair
    blocks = [b for stage in original.layers for b in stage.blocks]
    assert [any(b.shift_size) for b in blocks] == [False, True, False, True]
    assert all((b.attn_mask is not None) == any(b.shift_size) for b in blocks)


def _assert_gradients_close(got: dict, want: dict, relative: float) -> None:
    """Every parameter's gradient within ``relative`` of the reference (in norm, per tensor)."""
    assert set(got) == set(want)
    for name, grad in want.items():
        error = float((got[name] - grad).norm() / (grad.norm() + 1e-30))
        assert error < relative, f"{name}: relative gradient error {error:.2e}"


def test_outputs_and_gradients_equal_timm_in_float64(pair):
    # In float64 rounding vanishes: the two paths compute the same function.
    original, fused = (copy.deepcopy(m).double() for m in pair)
    images = _images().double()
    want, want_grads = _forward_backward(original, images)
    got, got_grads = _forward_backward(fused, images)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    _assert_gradients_close(got_grads, want_grads, 1e-10)


def test_outputs_and_gradients_equal_timm_in_fp32(pair):
    original, fused = pair
    images = _images()
    want, want_grads = _forward_backward(original, images)
    got, got_grads = _forward_backward(fused, images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The position-bias MLP's gradients are tiny sums of cancelling terms: ~1e-4 apart in fp32.
    _assert_gradients_close(got_grads, want_grads, 1e-3)


def _relative_error(got: torch.Tensor, truth: torch.Tensor) -> float:
    return float((got.double() - truth).norm() / (truth.norm() + 1e-30))


def test_outputs_and_gradients_under_bf16_autocast_are_as_close_to_exact_as_timms(pair):
    # Under bf16 autocast even timm's own gradients are ~10 % off the exact ones on this tiny
    # model (small gradients, much cancellation). The bf16 tolerance is therefore timm's own
    # error: against a float64 reference, the fused path may be at most twice as far off
    # (plus 1 %) as timm's path, tensor by tensor.
    original, fused = pair
    images = _images()
    exact, exact_grads = _forward_backward(copy.deepcopy(original).double(), images.double())
    timm_out, timm_grads = _forward_backward(original, images, autocast=True)
    got, got_grads = _forward_backward(fused, images, autocast=True)
    assert _relative_error(got, exact) <= 2 * _relative_error(timm_out, exact) + 0.01
    for name, truth in exact_grads.items():
        ours, theirs = _relative_error(got_grads[name], truth), _relative_error(timm_grads[name], truth)
        assert ours <= 2 * theirs + 0.01, f"{name}: fused {ours:.3f} vs timm {theirs:.3f} off the exact gradient"


def test_state_dict_keys_parameters_and_buffers_unchanged(pair):
    original, fused = pair
    assert list(fused.state_dict()) == list(original.state_dict())
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in original.named_buffers()]
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in original.named_parameters()]
    fresh = fuse_window_attention(timm.create_model(BACKBONE, num_classes=5, **TINY), True, BACKBONE)
    assert fresh == 4
    # timm's own checkpoint of the unfused model loads strictly into a fused one.
    target = timm.create_model(BACKBONE, num_classes=5, **TINY)
    fuse_window_attention(target, True, BACKBONE)
    target.load_state_dict(original.state_dict(), strict=True)
    torch.testing.assert_close(target.eval()(_images(1)), original.eval()(_images(1)), rtol=1e-5, atol=1e-5)
    original.train()


def test_gradient_checkpointing_path_gives_the_same_gradients(pair):
    original, fused = pair
    checkpointed = copy.deepcopy(fused)
    checkpointed.set_grad_checkpointing(True)
    images = _images(2)
    want, want_grads = _forward_backward(original, images)
    got, got_grads = _forward_backward(checkpointed, images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_gradients_close(got_grads, want_grads, 1e-3)


def test_attention_dropout_is_active_only_in_training():
    # Perturbed: timm starts each block's post-norms at zero, which hides the attention.
    model = _perturb(timm.create_model(BACKBONE, num_classes=0, attn_drop_rate=0.5, **TINY))
    fuse_window_attention(model, True, BACKBONE)
    images = _images(1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
        model.train()
        assert not torch.equal(model(images), model(images))


def test_option_null_fuses_swinv2_only_and_true_refuses_other_backbones(taxonomy):
    swin = build_model(model_cfg(BACKBONE, model_kwargs=dict(TINY)), taxonomy)
    assert fused_attention_count(swin) == 4
    assert all(type(m) is FusedWindowAttention for m in swin.modules() if isinstance(m, FusedWindowAttention))
    off = build_model(model_cfg(BACKBONE, model_kwargs=dict(TINY), fused_attention=False), taxonomy)
    assert fused_attention_count(off) == 0
    assert fused_attention_count(build_model(model_cfg("test_vit"), taxonomy)) == 0
    with pytest.raises(HerbensError, match="model.fused_attention is true but 'test_vit'"):
        build_model(model_cfg("test_vit", fused_attention=True), taxonomy)
    images = torch.randn(2, 3, 64, 96)
    off.load_state_dict(swin.state_dict())
    torch.testing.assert_close(swin.eval()(images)["species"], off.eval()(images)["species"], rtol=1e-5, atol=1e-5)


def test_pretrained_file_loads_through_timm_into_the_fused_model(tmp_path, taxonomy):
    source = _perturb(timm.create_model(BACKBONE, **TINY))  # with a 1000-class head, like hub weights
    path = tmp_path / "swinv2.pth"
    torch.save(source.state_dict(), path)
    model = build_model(model_cfg(BACKBONE, model_kwargs=dict(TINY), pretrained=True, pretrained_file=str(path)),
                        taxonomy)
    assert fused_attention_count(model) == 4
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("head.fc.")}
    got = model.trunk.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=key)


@pytest.mark.slow
def test_fused_attention_under_torch_compile(pair):
    _, fused = pair
    compiled = copy.deepcopy(fused)
    compiled.compile()
    images = _images(2)
    want, want_grads = _forward_backward(fused, images)
    got, got_grads = _forward_backward(compiled, images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    _assert_gradients_close(got_grads, want_grads, 1e-3)


def test_one_mask_is_broadcast_over_the_batch(pair, monkeypatch):
    """SDPA sees q as [B, nW * nH, N, d] and a single [1, nW * nH, N, N] mask: no per-image copy."""
    import herbens.models.fused_swinv2 as fused_module

    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((tuple(q.shape), tuple(attn_mask.shape), kwargs["scale"]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(fused_module.F, "scaled_dot_product_attention", spy)
    _, fused = pair
    with torch.no_grad():
        fused(_images(3))
    # stage 1: 4 x 6 windows x 2 heads, 16 tokens of 8 channels; stage 2: 2 x 3 windows x 4 heads.
    assert calls == [((72, 2, 16, 8), (1, 2, 16, 16), 1.0), ((3, 48, 16, 8), (1, 48, 16, 16), 1.0),
                     ((18, 4, 16, 8), (1, 4, 16, 16), 1.0), ((3, 24, 16, 8), (1, 24, 16, 16), 1.0)]
