"""Training throughput: herbens' training step, with and without its speed options, against bare timm.

For each recipe (default: swinv2_b, convnext_b, effnetv2_s), on synthetic tensors at the recipe's
input size with Herbarium 2022 class counts (15,501 species, 2,564 genera, 272 families):

- **bare timm**: ``timm.create_model(backbone, num_classes=15501)``, cross-entropy with label
  smoothing 0.1, the same timm optimizer, ``torch.autocast`` at the same precision, the same
  batch and memory format, no host sync in the step (the baseline every ratio divides by);
- **herbens variants**: ``herbens.training.engine.train_step`` with the recipe's model (trunk, neck,
  species + genus + family heads), criterion, optimizer, schedule, EMA and clipping, under
  Accelerate at the recipe's precision (bf16), with the speed options of :data:`VARIANTS`:
  ``eager`` (no fused attention, no compile), ``fused`` (SwinV2 window attention through fused
  SDPA), ``compile`` (``model.compile=true``), ``trunk`` (``model.compile=trunk``) and
  ``fused+trunk``. Each recipe runs its :data:`DEFAULT_VARIANTS` unless ``--variants`` says
  otherwise; a fused variant is skipped for a backbone without SwinV2 attention.

All are built and warmed up (warm-up includes compiling; its seconds are reported), then timed
in alternating rounds (so clock and thermal drift hit all alike); images/s is the median over
rounds. Peak memory is each contender's own: the most its warm-up allocated above what was
allocated before it was built. Weights are random (no download): speed does not depend on them.
The summary is rewritten after every recipe, so a run stopped by its time limit keeps what it
measured.

Usage::

    bench/gpu_train.sh                       # GPU, under 8 minutes; summary to $OUT if set
    python bench/gpu_train.py --device cpu --tiny   # smoke test: tiny stand-ins, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path; herbens lives one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from herbens.config import load_config  # noqa: E402
from herbens.config.catalogue import HERBARIUM_2022_CLASSES  # noqa: E402
from herbens.data.taxonomy import LEVELS, Taxonomy  # noqa: E402

DEFAULT_RECIPES = ("swinv2_b", "convnext_b", "effnetv2_s")
# herbens variants: the overrides each applies to the recipe.
VARIANTS = {
    "eager": ["model.fused_attention=false", "model.compile=false"],
    "fused": ["model.fused_attention=true", "model.compile=false"],
    "compile": ["model.fused_attention=false", "model.compile=true"],
    "trunk": ["model.fused_attention=false", "model.compile=trunk"],
    "fused+trunk": ["model.fused_attention=true", "model.compile=trunk"],
}
# What each recipe measures by default (kept under 8 minutes on one GPU, compiling included).
DEFAULT_VARIANTS = {"swinv2_b": ["eager", "fused", "fused+trunk"], "convnext_b": ["eager", "compile", "trunk"],
                    "effnetv2_s": ["eager", "trunk"]}
OTHER_RECIPES_VARIANTS = ["eager", "trunk"]
# --tiny: a small model of the same family stands in for each backbone (a shrunken SwinV2, so the
# fused attention runs), at a non-square input.
TINY_STAND_INS = {
    "swinv2_b": ("swinv2_tiny_window8_256", {"img_size": [64, 96], "embed_dim": 16, "depths": [2, 2],
                                             "num_heads": [2, 4], "window_size": 4}, [64, 96]),
    "convnext_b": ("test_convnext", {}, [64, 96]),
    "effnetv2_s": ("test_efficientnet", {}, [64, 96]),
}
TINY_BATCH = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke mode: test_* stand-in models, batch 2, 2 timed steps, one round")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's train.batch_size")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 8; tiny 2)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating timed rounds (default 3; tiny 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
    parser.add_argument("--precision", default=None, choices=("no", "fp16", "bf16"),
                        help="default: the recipe's on a GPU, 'no' on the CPU")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="herbens variants for every recipe (default: DEFAULT_VARIANTS per recipe)")
    parser.add_argument("--budget-s", type=float, default=390.0,
                        help="skip the remaining contenders once this many seconds have passed")
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder for gpu_train.json / gpu_train.txt (default: $OUT, if set)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 8)
    args.rounds = args.rounds or (1 if args.tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    return args


def synthetic_taxonomy(classes: dict[str, int], seed: int = 0) -> Taxonomy:
    """A random species -> genus -> family tree with the given class counts (every class used)."""
    rng = np.random.default_rng(seed)
    n_species, n_genus, n_family = (classes[level] for level in LEVELS)
    genus_to_family = np.concatenate([np.arange(n_family), rng.integers(0, n_family, n_genus - n_family)])
    species_to_genus = np.concatenate([np.arange(n_genus), rng.integers(0, n_genus, n_species - n_genus)])
    return Taxonomy(
        category_ids=np.arange(n_species), species_names=[f"species {i}" for i in range(n_species)],
        genus_names=[f"genus {i:05d}" for i in range(n_genus)],
        family_names=[f"family {i:04d}" for i in range(n_family)],
        species_to_genus=species_to_genus, species_to_family=genus_to_family[species_to_genus],
        counts=rng.integers(7, 101, n_species))  # NAFlora-1M: 7 to 100 images per species


def bench_config(name: str, args: argparse.Namespace, variant: str = "eager") -> dict:
    """The recipe, offline (random weights), with a variant's overrides and --tiny / --batch-size."""
    overrides = ["model.pretrained=false", "model.pretrained_file=null", *VARIANTS[variant]]
    if args.tiny:
        backbone, kwargs, (height, width) = TINY_STAND_INS.get(name, ("test_efficientnet", {}, [64, 96]))
        overrides += [f"model.backbone={backbone}", f"model.model_kwargs={json.dumps(kwargs)}",
                      f"input.size=[{height},{width}]", f"train.batch_size={TINY_BATCH}"]
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    return load_config(name, overrides)


def recipe_variants(name: str, args: argparse.Namespace) -> list[str]:
    return list(args.variants or DEFAULT_VARIANTS.get(name, OTHER_RECIPES_VARIANTS))


def synthetic_batch(cfg: dict, taxonomy: Taxonomy, device: torch.device, seed: int = 0) -> dict:
    """Random images at the recipe's input size and random (hierarchy-consistent) labels."""
    gen = torch.Generator().manual_seed(seed)
    batch = int(cfg["train"]["batch_size"])
    height, width = cfg["input"]["size"]
    species = torch.randint(0, taxonomy.num_classes("species"), (batch,), generator=gen)
    out = {"image": torch.randn(batch, 3, height, width, generator=gen), "index": torch.arange(batch)}
    out.update({level: taxonomy.level_indices(level, species) for level in LEVELS})
    return {key: value.to(device) for key, value in out.items()}


def herbens_step(cfg: dict, taxonomy: Taxonomy, accelerator):
    """herbens' own training step, assembled as ``herbens.training.fit.fit`` assembles it."""
    from herbens.training.engine import TrainParts, TrainState, train_step
    from herbens.losses import build_criterion
    from herbens.models.compiling import compile_model
    from herbens.models.net import build_model
    from herbens.optim.optimizers import build_optimizer, scaled_lr
    from herbens.optim.schedules import build_schedule
    from herbens.training.setup import build_ema

    model = build_model(cfg, taxonomy)
    criterion = build_criterion(cfg["levels"], taxonomy).to(accelerator.device)
    lr = scaled_lr(cfg["optimizer"], int(cfg["train"]["batch_size"]) * accelerator.num_processes)
    optimizer = build_optimizer(model, list(criterion.parameters()), cfg["optimizer"], lr)
    if cfg["model"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    compile_model(model, cfg["model"]["compile"], cfg["model"]["backbone"])
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = build_schedule(optimizer, cfg["scheduler"], int(cfg["train"]["epochs"]), 1000, lr)
    ema = build_ema(cfg, accelerator.unwrap_model(model))
    parts = TrainParts(accelerator, model, criterion, optimizer, schedule, tuple(cfg["levels"]),
                       ema=ema, clip_grad=cfg["train"]["clip_grad"])
    state = TrainState()
    model.train()
    return lambda batch: train_step(parts, batch, state)


def bare_timm_step(cfg: dict, num_classes: int, device: torch.device, precision: str):
    """A plain timm loop: one classifier, cross-entropy, the same timm optimizer and autocast."""
    from timm.optim import create_optimizer_v2

    m, opt = cfg["model"], cfg["optimizer"]
    kwargs = dict(m["model_kwargs"] or {}, num_classes=num_classes, drop_rate=float(m["drop_rate"]))
    if m["drop_path_rate"]:
        kwargs["drop_path_rate"] = float(m["drop_path_rate"])
    model = timm.create_model(m["backbone"], pretrained=False, **kwargs).to(device)
    memory_format = torch.channels_last if m["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    extra = {"momentum": float(opt["momentum"]), "nesterov": bool(opt["nesterov"])} \
        if opt["name"].lower() in ("sgd", "momentum", "nesterov") else {}
    optimizer = create_optimizer_v2(model, opt=opt["name"], lr=float(opt["lr"]),
                                    weight_decay=float(opt["weight_decay"]), **extra)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step(batch: dict) -> torch.Tensor:
        images = batch["image"].contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), batch["species"], label_smoothing=0.1)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()  # no float(): a host sync per step would slow the baseline down

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(step, batch: dict, steps: int, device: torch.device) -> float:
    """Seconds for ``steps`` training steps, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    synchronize(device)
    return time.perf_counter() - start


def allocated_gb(device: torch.device, peak: bool = False) -> float | None:
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def warm_contender(build, batch: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Build a contender and run its warm-up: its step, compile seconds and own peak memory."""
    from herbens.models.compiling import compile_seconds

    reset_peak_memory(device)
    before_gb, before_s = allocated_gb(device), compile_seconds()
    step = build()
    run_steps(step, batch, args.warmup, device)
    peak = allocated_gb(device, peak=True)
    return {"step": step, "compile_s": compile_seconds() - before_s,
            "peak_memory_gb": None if peak is None else peak - before_gb}


def bench_recipe(name: str, args: argparse.Namespace, accelerator, taxonomy: Taxonomy, start: float) -> dict:
    """Images/s of bare timm and of each herbens variant for one recipe (see the module docstring)."""
    from herbens.core.errors import HerbensError

    device = accelerator.device
    cfg = bench_config(name, args)
    batch = synthetic_batch(cfg, taxonomy, device)
    size = int(cfg["train"]["batch_size"])
    contenders = {"bare timm": warm_contender(
        lambda: bare_timm_step(cfg, taxonomy.num_classes("species"), device, accelerator.mixed_precision),
        batch, args, device)}
    skipped = {}
    for variant in recipe_variants(name, args):
        if time.perf_counter() - start > args.budget_s:
            skipped[variant] = f"skipped: over the {args.budget_s:.0f} s budget"
            continue
        variant_cfg = bench_config(name, args, variant)
        try:
            contenders[f"herbens {variant}"] = warm_contender(
                lambda: herbens_step(variant_cfg, taxonomy, accelerator), batch, args, device)
        except HerbensError as exc:  # e.g. fused attention asked of a backbone without SwinV2 attention
            skipped[variant] = f"not applicable: {exc}"
    rates = {label: [] for label in contenders}
    for _ in range(args.rounds):  # alternating, so drift hits all alike
        for label, contender in contenders.items():
            rates[label].append(size * args.steps / run_steps(contender["step"], batch, args.steps, device))
    bare = statistics.median(rates["bare timm"])
    rows = []
    for label, contender in contenders.items():
        ips = statistics.median(rates[label])
        rows.append({"contender": label, "images_per_s": ips, "ratio_to_bare": ips / bare, "rounds": rates[label],
                     "compile_s": contender["compile_s"], "peak_memory_gb": contender["peak_memory_gb"]})
    return {
        "recipe": name, "backbone": cfg["model"]["backbone"], "input_size": list(cfg["input"]["size"]),
        "batch_size": size, "precision": accelerator.mixed_precision, "contenders": rows, "skipped": skipped,
        "herbens_step_includes": {
            "levels": list(cfg["levels"]), "neck": cfg["model"]["neck"], "ema": bool(cfg["train"]["ema"]),
            "clip_grad": cfg["train"]["clip_grad"], "channels_last": bool(cfg["model"]["channels_last"]),
            "optimizer": cfg["optimizer"]["name"], "layer_decay": cfg["optimizer"]["layer_decay"]},
    }


def result_lines(row: dict) -> list[str]:
    if "error" in row:
        return [f"{row['recipe']:<12} {row['error']}"]
    height, width = row["input_size"]
    head = f"{row['recipe']:<12} {row['backbone']} {height}x{width} batch {row['batch_size']} {row['precision']}"
    lines = [head]
    for c in row["contenders"]:
        memory = f"  peak {c['peak_memory_gb']:.1f} GiB" if c["peak_memory_gb"] is not None else ""
        compiling = f"  compile {c['compile_s']:.0f} s" if c["compile_s"] > 0 else ""
        lines.append(f"  {c['contender']:<24} {c['images_per_s']:8.1f} img/s  ratio {c['ratio_to_bare']:.3f}"
                     f"{memory}{compiling}")
    lines += [f"  herbens {variant:<16} {why}" for variant, why in row["skipped"].items()]
    return lines


def environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads(),
    }


def write_summary(out_dir: str, summary: dict, text: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_train.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "gpu_train.txt").write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator

    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = args.precision or ("no" if device.type == "cpu" else None)
    if precision is None:  # the recipes' own (one Accelerator per process: they must agree)
        precisions = {str(bench_config(name, args)["train"]["precision"]) for name in args.recipes}
        precision = precisions.pop() if len(precisions) == 1 else "bf16"
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    taxonomy = synthetic_taxonomy(HERBARIUM_2022_CLASSES)
    env = environment(accelerator.device)
    lines = [f"herbens training step (eager, fused attention, compiled) vs bare timm loop on {env['device']} "
             f"(torch {env['torch']}, timm {env['timm']}, {precision}, {args.steps} steps x {args.rounds} rounds)"]
    print(lines[0], flush=True)
    rows = []
    for name in args.recipes:
        if time.perf_counter() - start > args.budget_s:
            row = {"recipe": name, "error": f"skipped: over the {args.budget_s:.0f} s budget"}
        else:
            try:
                row = bench_recipe(name, args, accelerator, taxonomy, start)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"recipe": name, "error": f"out of memory ({str(exc).splitlines()[0]}): try --batch-size"}
            finally:
                accelerator.free_memory()
                reset_peak_memory(accelerator.device)
        rows.append(row)
        for line in result_lines(row):
            lines.append(line)
            print(line, flush=True)
        if args.out:  # after every recipe: a run stopped by its time limit keeps what it measured
            write_summary(args.out, {"environment": env, "args": vars(args), "results": rows}, "\n".join(lines))
    lines.append(f"ratio = images per second / bare timm's (higher is better; 1.0 = bare timm's speed); "
                 f"total {time.perf_counter() - start:.0f} s")
    print(lines[-1], flush=True)
    if args.out:
        write_summary(args.out, {"environment": env, "args": vars(args), "results": rows}, "\n".join(lines))
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
