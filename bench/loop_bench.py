"""herbens' training step against a bare timm loop with the same trunk, measured in the same run.

* herbens: ``herbens.training.engine.train_step``: HierarchicalNet (timm trunk, species + genus + family
  heads), HierarchicalLoss (label-smoothed CE per level), Accelerate (``accumulate``,
  ``backward``), the recipe's optimizer (timm, through ``build_optimizer``), the LR schedule,
  and EMA weights (``ModelEmaV3``) updated every step;
* bare: ``timm.create_model(backbone, num_classes=species)``, plain cross-entropy,
  ``loss.backward()``, the same timm optimizer, ``zero_grad``.

Both see the same synthetic batch (random images and labels), on the CPU. Blocks of ``--steps``
steps (default one) alternate between the two (bare first in even repeats, herbens first in odd
ones) after a warm-up block each, so that a busy machine slows both alike; the median time per
step is reported, and the ratio bare / herbens (herbens' throughput relative to the bare loop;
1.0 = no overhead).

    python bench/loop_bench.py                               # resnet18, 128 px, batch 16, 15,501 species
    python bench/loop_bench.py --backbone convnext_tiny --size 160 --batch 8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

from herbens.config import load_config  # noqa: E402
from herbens.data.taxonomy import Taxonomy  # noqa: E402
from herbens.losses import build_criterion  # noqa: E402
from herbens.models.net import build_model  # noqa: E402
from herbens.optim.optimizers import build_optimizer  # noqa: E402
from herbens.optim.schedules import build_schedule
from herbens.training.engine import TrainParts, TrainState, train_step  # noqa: E402
from herbens.training.setup import build_accelerator, build_ema  # noqa: E402

# Herbarium 2022: 15,501 species in 2,564 genera and 272 families.
SPECIES, GENERA, FAMILIES = 15_501, 2_564, 272


def make_taxonomy(species: int, genera: int, families: int, seed: int = 0) -> Taxonomy:
    """A random hierarchy of the given sizes (every genus and family used)."""
    rng = np.random.default_rng(seed)
    to_genus = np.sort(np.concatenate([np.arange(genera), rng.integers(0, genera, species - genera)]))
    genus_family = np.sort(np.concatenate([np.arange(families), rng.integers(0, families, genera - families)]))
    return Taxonomy(np.arange(species), [f"G{g} s{i}" for i, g in enumerate(to_genus)],
                    [f"G{g}" for g in range(genera)], [f"F{f}" for f in range(families)],
                    to_genus, genus_family[to_genus], np.full(species, 50))


def herbens_step(cfg: dict, taxonomy: Taxonomy, batch: dict):
    """A closure running one herbens training step on ``batch``."""
    accelerator = build_accelerator(cfg)
    model = build_model(cfg, taxonomy)
    criterion = build_criterion(cfg["levels"], taxonomy)
    optimizer = build_optimizer(model, list(criterion.parameters()), cfg["optimizer"], float(cfg["optimizer"]["lr"]))
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = build_schedule(optimizer, cfg["scheduler"], 1000, 1000, float(cfg["optimizer"]["lr"]))
    ema = build_ema(cfg, accelerator.unwrap_model(model))
    parts = TrainParts(accelerator, model, criterion, optimizer, schedule, tuple(cfg["levels"]), ema=ema)
    state = TrainState()
    model.train()

    def step() -> float:
        return train_step(parts, batch, state)["loss"]

    return step


def bare_step(cfg: dict, num_classes: int, batch: dict):
    """A closure running one step of the plain timm loop on the same data."""
    model = timm.create_model(cfg["model"]["backbone"], num_classes=num_classes)
    opt = cfg["optimizer"]
    optimizer = create_optimizer_v2(model, opt=opt["name"], lr=float(opt["lr"]),
                                    weight_decay=float(opt["weight_decay"]))
    model.train()
    images, labels = batch["image"], batch["species"]

    def step() -> float:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_block(step, steps: int) -> float:
    """Seconds per step over a block of ``steps`` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--size", type=int, default=128, help="square input size")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--species", type=int, default=SPECIES)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=15, help="timed blocks per side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-ema", action="store_true", help="herbens without EMA weights")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    genera = min(GENERA, max(2, args.species // 6))
    families = min(FAMILIES, max(2, genera // 9))
    taxonomy = make_taxonomy(args.species, genera, families)
    cfg = load_config(ROOT / "recipes" / "_base.yaml", [
        f"model.backbone={args.backbone}", f"input.size=[{args.size},{args.size}]",
        f"train.batch_size={args.batch}", f"train.ema={'false' if args.no_ema else 'true'}",
        "train.ema_decay=0.999"])
    species = torch.randint(0, args.species, (args.batch,))
    batch = {"image": torch.randn(args.batch, 3, args.size, args.size), "species": species,
             "genus": torch.as_tensor(taxonomy.species_to_genus)[species],
             "family": torch.as_tensor(taxonomy.species_to_family)[species],
             "index": torch.arange(args.batch)}
    steps = {"bare timm": bare_step(cfg, args.species, batch), "herbens": herbens_step(cfg, taxonomy, batch)}

    for step in steps.values():  # warm-up: allocator, oneDNN kernels, optimizer state
        time_block(step, 2)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(args.repeats):
        order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
        for name in order:
            times[name].append(time_block(steps[name], args.steps))
    median = {name: statistics.median(values) for name, values in times.items()}

    print(f"backbone {args.backbone}, input {args.size}x{args.size}, batch {args.batch}, "
          f"{args.species} species / {genera} genera / {families} families, CPU, {args.threads} thread(s), "
          f"EMA {'off' if args.no_ema else 'on'} (herbens)")
    print(f"median of {args.repeats} interleaved blocks of {args.steps} steps")
    for name, seconds in median.items():
        spread = f"{min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f}"
        print(f"{name:<10} {seconds * 1e3:9.1f} ms/step  ({args.batch / seconds:6.1f} img/s; blocks {spread} ms)")
    print(f"ratio bare / herbens time (herbens throughput vs bare): {median['bare timm'] / median['herbens']:.3f} "
          f"(fastest blocks: {min(times['bare timm']) / min(times['herbens']):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
