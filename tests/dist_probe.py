"""Test helper: a few training steps per recipe under Accelerate, dumping each rank's state.

Launched by ``tests/test_distributed.py`` as
``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_probe.py OUT RECIPE... -- key=value...``.
For every recipe it builds herbens' own components (data, model, loader, criterion, optimizer,
schedule, :func:`herbens.training.engine.train_step`, :func:`herbens.training.checkpoint.save_checkpoint`) the way
:func:`herbens.training.fit.fit` does, runs ``--epochs`` epochs, saves a checkpoint under
``OUT/<recipe>/`` and writes ``OUT/<recipe>/rank<r>.pt`` with what this rank saw and holds:
per-step losses, the labels of its own batches, the criterion's state (Seesaw counts), the
model's parameters (sub-center ArcFace ``W`` included), before and after training, and (with
``distill.teacher``) the image id and teacher targets of every sample it trained on; with
``distill.online`` also, per step, the image ids, the (mixed) images the online teacher scored
and its species log-probabilities.

The test compares the ranks' files: DDP and the Seesaw all-reduce must leave them identical.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from herbens.config import load_config  # noqa: E402
from herbens.data.loaders import train_loader  # noqa: E402
from herbens.data.run_data import load_run_data  # noqa: E402
from herbens.data.transforms import build_train_transform, model_data_config  # noqa: E402
from herbens.losses import build_criterion  # noqa: E402
from herbens.models.net import build_model  # noqa: E402
from herbens.optim.optimizers import build_optimizer, scaled_lr  # noqa: E402
from herbens.optim.schedules import build_schedule
from herbens.stores.targets import teacher_for_training  # noqa: E402
from herbens.training.checkpoint import save_checkpoint  # noqa: E402
from herbens.training.engine import TrainParts, TrainState, train_step  # noqa: E402
from herbens.training.setup import build_accelerator, build_mixup  # noqa: E402
from herbens.training.teacher import online_teacher  # noqa: E402


def parameters(model) -> dict[str, torch.Tensor]:
    """A detached CPU copy of every trainable parameter (buffers such as BN stats are per rank)."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}


def probe(accelerator, recipe: str, out: Path, overrides: list[str], epochs: int) -> None:
    cfg = load_config(recipe, [*overrides, f"output_dir={out}", f"name={recipe}"])
    run_dir = out / recipe
    set_seed(int(cfg["seed"]))
    data = load_run_data(cfg, run_dir, reuse_split=False)
    model = build_model(cfg, data.taxonomy)
    initial = parameters(model)
    data_config = model_data_config(model.data_config, cfg["input"])
    teacher, distill = teacher_for_training(cfg["distill"], data.train, data.taxonomy, tuple(cfg["levels"]))
    loader, sampler = train_loader(data.train, data.images_dir, data.taxonomy,
                                   build_train_transform(data_config, cfg["augment"]), cfg, teacher=teacher)
    criterion = build_criterion(cfg["levels"], data.taxonomy, distill).to(accelerator.device)
    lr = scaled_lr(cfg["optimizer"], int(cfg["train"]["batch_size"]) * accelerator.num_processes)
    optimizer = build_optimizer(model, list(criterion.parameters()), cfg["optimizer"], lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    schedule = build_schedule(optimizer, cfg["scheduler"], epochs, len(loader), lr)
    state = TrainState()
    for obj in (schedule, state, criterion):
        accelerator.register_for_checkpointing(obj)
    scored = []  # per online teacher call: (image ids, images, species logp); ids: the batch's, set below
    live = online_teacher(cfg["distill"], data.taxonomy, distill["levels"] if distill else (), data_config, accelerator)

    def recording_teacher(images):
        targets = live(images)
        scored.append((ids, images.cpu().clone(), targets["teacher.species.logp"].cpu().clone()))
        return targets

    parts = TrainParts(accelerator, model, criterion, optimizer, schedule, tuple(cfg["levels"]),
                       mixup=build_mixup(cfg, data.taxonomy.num_classes("species")),
                       teacher=recording_teacher if live is not None else None)
    losses, labels, taught = [], {level: [] for level in cfg["levels"]}, []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        model.train()
        for batch in loader:
            for level in labels:
                labels[level].append(batch[level].cpu())
            ids = data.train["image_id"].iloc[batch["index"].cpu().numpy()].astype(str).tolist()
            if teacher is not None:
                taught += zip(ids, batch["teacher.species.rest"].cpu().tolist())
            losses.append(float(train_step(parts, batch, state)["loss"]))
    save_checkpoint(accelerator, run_dir, state, keep=1)
    torch.save({
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "losses": losses,
        "labels": {level: torch.cat(v).tolist() for level, v in labels.items()},
        "criterion": {k: v.cpu() for k, v in criterion.state_dict().items()},
        "taught": taught,
        "scored": scored,
        "initial": initial,
        "final": parameters(accelerator.unwrap_model(model)),
    }, run_dir / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    # The next recipe prepares its own model and optimizer.
    accelerator.free_memory()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--overrides", nargs="*", default=[])
    args = parser.parse_args(argv)
    cfg = load_config(args.recipes[0], args.overrides)
    accelerator = build_accelerator(cfg)
    if accelerator.num_processes < 2:
        print(f"dist_probe: expected several processes, got {accelerator.num_processes} "
              f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')})", file=sys.stderr)
        return 3
    for recipe in args.recipes:
        probe(accelerator, recipe, args.out, args.overrides, args.epochs)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
