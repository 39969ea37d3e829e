"""Fused vs timm's SwinV2 window attention: forward + backward time and memory saved for backward.

One timm ``WindowAttention`` per SwinV2-B stage at 384 px (window 24, pretrained window 12), with
its real shift mask, and a copy switched to :class:`herbens.models.fused_swinv2.FusedWindowAttention`
(same weights). Both run forward + backward on the same windows, timed in alternating rounds in
one process (medians; ratio = timm time / fused time, higher is better). Also reported: the
bytes autograd saves for backward (activation memory, independent of the device) and the
largest output difference.

Usage::

    python bench/swinv2_attention_bench.py                # CPU, fp32, 2 images
    python bench/swinv2_attention_bench.py --autocast     # CPU bf16 autocast
    python bench/swinv2_attention_bench.py --device cuda  # a GPU, if there is one
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from timm.models.swin_transformer_v2 import SwinTransformerV2Block, window_partition  # noqa: E402

from herbens.models.fused_swinv2 import fuse_window_attention  # noqa: E402

# SwinV2-B (swinv2_base_window12to24_192to384) at 384 px: tokens per side, channels, heads per stage.
# Stage 4 (12 x 12 tokens) fits in one window without a shift; its attention is tiny.
STAGES = [(96, 128, 4), (48, 256, 8), (24, 512, 16)]
WINDOW, PRETRAINED_WINDOW = 24, 12


def stage_block(tokens: int, dim: int, heads: int, shifted: bool) -> SwinTransformerV2Block:
    """A timm block, built for its attention module and its shift mask."""
    return SwinTransformerV2Block(dim, (tokens, tokens), heads, window_size=WINDOW,
                                  shift_size=WINDOW // 2 if shifted else 0, pretrained_window_size=PRETRAINED_WINDOW)


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while running ``fn``."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_stage(tokens: int, dim: int, heads: int, shifted: bool, args) -> dict:
    device = torch.device(args.device)
    block = stage_block(tokens, dim, heads, shifted).to(device)
    timm_attn = block.attn.train()
    with torch.no_grad():  # non-trivial biases and scales (timm starts them at constants)
        for param in timm_attn.parameters():
            if param.dim() <= 3 and param.numel() <= 4096:
                param.add_(0.1 * torch.randn_like(param))
    fused_attn = copy.deepcopy(timm_attn)
    fuse_window_attention(fused_attn, True, "bench")
    mask = block.attn_mask
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, tokens, tokens, dim, generator=gen).to(device)
    windows = window_partition(image, (WINDOW, WINDOW)).view(-1, WINDOW * WINDOW, dim).requires_grad_(True)
    grad_out = torch.randn(windows.shape, generator=gen).to(device)

    def step(module):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
                out = module(windows, mask=mask)
            out.backward(grad_out.to(out.dtype))
            return out
        return run

    runs = {"timm": step(timm_attn), "fused": step(fused_attn)}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
        difference = (timm_attn(windows, mask) - fused_attn(windows, mask)).abs().max().item()
    memory = {name: saved_bytes(run) for name, run in runs.items()}
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    timm_s, fused_s = (statistics.median(times[name]) for name in ("timm", "fused"))
    return {"tokens": tokens, "dim": dim, "heads": heads, "shifted": shifted,
            "windows": windows.shape[0], "timm_ms": 1e3 * timm_s, "fused_ms": 1e3 * fused_s,
            "speedup": timm_s / fused_s, "timm_saved_mb": memory["timm"] / 2**20,
            "fused_saved_mb": memory["fused"] / 2**20, "max_abs_difference": difference}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast (else fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precision = "bf16 autocast" if args.autocast else "fp32"
    print(f"SwinV2-B window attention (window {WINDOW}, 384 px), forward + backward, {args.batch} images, "
          f"{precision}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} alternating rounds")
    speedups = []
    for tokens, dim, heads in STAGES:
        for shifted in (False, True) if tokens > WINDOW else (False,):
            row = bench_stage(tokens, dim, heads, shifted, args)
            speedups.append(row["speedup"])
            print(f"  {tokens}x{tokens} tokens  C {dim:<4} heads {heads:<3} {'shifted' if shifted else 'plain  '} "
                  f"{row['windows']:>3} windows: timm {row['timm_ms']:8.1f} ms  fused {row['fused_ms']:8.1f} ms  "
                  f"ratio {row['speedup']:.2f}x  saved for backward {row['timm_saved_mb']:.0f} -> "
                  f"{row['fused_saved_mb']:.0f} MB  max |diff| {row['max_abs_difference']:.1e}", flush=True)
    print(f"ratio = timm time / fused time (higher is better); geometric mean "
          f"{statistics.geometric_mean(speedups):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
