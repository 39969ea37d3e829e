"""One training run from a resolved recipe to a complete run directory.

Order of work: data and taxonomy -> split -> model -> loaders -> loss -> optimizer and
schedule -> Accelerate -> (resume) -> epochs with validation and checkpoints -> final
weights -> logits for val/test -> metrics.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed

from herbens.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from herbens.config import save_config
from herbens.data.dataset import BadImageWarning
from herbens.data.loaders import predict_loader, train_loader
from herbens.data.run_data import RunData, load_run_data
from herbens.data.splits import save_split
from herbens.data.taxonomy import Taxonomy
from herbens.data.transforms import build_train_transform, build_tta_views, model_data_config
from herbens.engine import TrainParts, TrainState, current_lr, predict, train_one_epoch
from herbens.errors import HerbensError
from herbens.fileio import atomic_write, write_json
from herbens.infer import write_split_logits
from herbens.losses import build_criterion
from herbens.losses.hierarchical import check_mixup_compatible
from herbens.metrics import macro_f1
from herbens.models.clip import init_text_heads, with_text_head_scales
from herbens.models.net import build_model
from herbens.optim import build_optimizer, build_training_schedule, scaled_lr


def prepare_run_dir(cfg: dict, resume: bool, overwrite: bool) -> Path:
    """The run's folder: refuse to silently mix a new run into an old one."""
    run_dir = Path(cfg["output_dir"]) / cfg["name"]
    if run_dir.exists() and not resume:
        if overwrite:
            shutil.rmtree(run_dir)
        elif any(run_dir.iterdir()):
            raise HerbensError(f"run directory {run_dir} already exists: pass --resume to continue it, "
                               f"--overwrite to start again, or choose another name=...")
    if resume and latest_checkpoint(run_dir) is None:
        raise HerbensError(f"--resume: {run_dir} has no checkpoint to resume from")
    return run_dir


def launched_on_cpus_only() -> bool:
    """Whether this process is one of several started without any GPU (torchrun on CPUs).

    Accelerate forms a multi-CPU (gloo) process group only when it is told ``cpu=True``;
    ``accelerate launch --cpu`` says so through ACCELERATE_USE_CPU, but plain ``torchrun`` does
    not, and every rank would then train alone, all writing the same run directory.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world_size > 1 and not torch.cuda.is_available()


def build_accelerator(cfg: dict) -> Accelerator:
    precision = str(cfg["train"]["precision"])
    if precision not in ("no", "fp16", "bf16"):
        raise HerbensError(f"train.precision must be no, fp16 or bf16, got {precision!r}")
    handlers = []
    if int(cfg["train"].get("freeze_trunk_epochs") or 0):
        # The frozen trunk gets no gradients during the probe: DDP must expect unused parameters.
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(mixed_precision=precision, cpu=launched_on_cpus_only(),
                       gradient_accumulation_steps=int(cfg["train"]["grad_accum"]), kwargs_handlers=handlers)


def git_revision() -> str | None:
    """The source revision, recorded so a run folder says what code produced it."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_header(run_dir: Path, cfg: dict, data: RunData) -> None:
    """Config, taxonomy and split: what makes the run reproducible."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HerbensError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from exc
    save_config({**cfg, "git_revision": git_revision()}, run_dir / "config.yaml")
    data.taxonomy.save(run_dir / "taxonomy.json")
    save_split(run_dir / "split.csv", data.val["image_id"].tolist())


def build_mixup(cfg: dict, num_classes: int):
    aug = cfg["augment"]
    if not (aug["mixup"] or aug["cutmix"]):
        return None
    from timm.data import Mixup

    # The losses smooth soft targets themselves (every level alike), so Mixup must not.
    return Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], label_smoothing=0.0,
                 num_classes=num_classes)


def build_ema(cfg: dict, model):
    if not cfg["train"]["ema"]:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=float(cfg["train"]["ema_decay"]))


def validate(accelerator, model, loader, levels, taxonomy: Taxonomy) -> dict:
    """Per-level macro-F1 of each head's own prediction on the validation split."""
    scores = predict(accelerator, model, loader, levels, desc="validate")
    out = {}
    for level in levels:
        true = taxonomy.level_indices(level, scores["labels"])
        out[f"val_{level}_macro_f1"] = macro_f1(true, scores[level].argmax(axis=1))
    return out


def append_history(run_dir: Path, state: TrainState) -> None:
    with atomic_write(run_dir / "history.jsonl") as handle:
        for record in state.history:
            handle.write(json.dumps(record) + "\n")


def fit(cfg: dict, resume: bool = False, overwrite: bool = False) -> Path:
    """Train one run end to end and return its directory.

    Args:
        cfg: resolved configuration (:func:`herbens.config.load_config`).
        resume: continue from the run's latest checkpoint (same sample order, optimizer,
            schedule, EMA, loss state and step counter).
        overwrite: delete an existing run directory of the same name first.
    """
    wall_start = time.perf_counter()
    accelerator = build_accelerator(cfg)
    run_dir = prepare_run_dir(cfg, resume, overwrite) if accelerator.is_main_process else \
        Path(cfg["output_dir"]) / cfg["name"]
    accelerator.wait_for_everyone()
    set_seed(int(cfg["seed"]))
    if cfg["train"]["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)

    data = load_run_data(cfg, run_dir, reuse_split=resume)
    levels = tuple(cfg["levels"])
    check_mixup_compatible(cfg["levels"], cfg["augment"])

    model = build_model(cfg, data.taxonomy)
    # Text-initialised heads take CLIP's logit scale, a head argument: the saved config keeps it.
    cfg = with_text_head_scales(cfg, init_text_heads(model, cfg, data.taxonomy))
    if accelerator.is_main_process and not resume:
        write_run_header(run_dir, cfg, data)
    accelerator.wait_for_everyone()
    data_config = model_data_config(model.data_config, cfg["input"])
    loader, sampler = train_loader(data.train, data.images_dir, data.taxonomy,
                                   build_train_transform(data_config, cfg["augment"]), cfg)
    val_loader = predict_loader(data.val, data.images_dir, data.taxonomy,
                                build_tta_views(["center"], data_config), cfg, data_config=data_config)
    criterion = build_criterion(cfg["levels"], data.taxonomy).to(accelerator.device)
    # A P x K batch sampler sets the batch size itself (P classes x K images).
    batch = sampler.batch_size if getattr(sampler, "is_batch_sampler", False) else int(cfg["train"]["batch_size"])
    global_batch = batch * int(cfg["train"]["grad_accum"]) * accelerator.num_processes
    lr = scaled_lr(cfg["optimizer"], global_batch)
    optimizer = build_optimizer(model, list(criterion.parameters()), cfg["optimizer"], lr)
    if cfg["model"]["compile"]:
        model = torch.compile(model)
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    updates_per_epoch = max(1, len(loader) // int(cfg["train"]["grad_accum"]))
    schedule = build_training_schedule(optimizer, cfg["scheduler"], cfg["train"], updates_per_epoch, lr)
    ema = build_ema(cfg, accelerator.unwrap_model(model))
    state = TrainState()
    for obj in (schedule, state, criterion) + ((ema,) if ema is not None else ()):
        accelerator.register_for_checkpointing(obj)
    if resume:
        load_checkpoint(accelerator, latest_checkpoint(run_dir))

    parts = TrainParts(accelerator, model, criterion, optimizer, schedule, levels,
                       mixup=build_mixup(cfg, data.taxonomy.num_classes("species")), ema=ema,
                       clip_grad=cfg["train"]["clip_grad"])
    _train_epochs(cfg, parts, loader, sampler, val_loader, state, run_dir, data.taxonomy)

    eval_model = ema.module if ema is not None else accelerator.unwrap_model(model)
    _save_weights(accelerator, run_dir, model, ema)
    for split in cfg["infer"]["splits"]:
        write_split_logits(accelerator, eval_model, cfg, data, data_config, run_dir, split)
    if accelerator.is_main_process:
        _write_metrics(cfg, run_dir, state, data, accelerator, time.perf_counter() - wall_start,
                       sum(p.numel() for p in eval_model.parameters()))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


def _train_epochs(cfg, parts: TrainParts, loader, sampler, val_loader, state: TrainState, run_dir: Path,
                  taxonomy: Taxonomy):
    acc = parts.accelerator
    every = int(cfg["train"]["checkpoint_every_steps"] or 0)
    keep = int(cfg["train"]["keep_checkpoints"])

    def on_step():
        if every and state.step % every == 0:
            save_checkpoint(acc, run_dir, state, keep)

    unreadable: set[int] = set()
    for epoch in range(state.epoch, int(cfg["train"]["epochs"])):
        state.epoch = epoch
        epoch_loader = acc.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        # Accelerate's loaders re-seed the sampler from their own pass counter on every pass; a
        # resumed run's loader starts counting at 0, so the epoch is set on the loader itself.
        epoch_loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        parts.frozen_trunk = epoch < int(cfg["train"]["freeze_trunk_epochs"] or 0)
        stats = train_one_epoch(parts, epoch_loader, state, len(loader), on_step=on_step,
                                log_every=int(cfg["train"]["log_every"]))
        eval_model = parts.ema.module if parts.ema is not None else parts.model
        scores = validate(acc, eval_model, val_loader, parts.levels, taxonomy)
        _report_unreadable(acc, loader.dataset, stats.pop("unreadable"), unreadable, epoch)
        record = {"epoch": epoch + 1, "step": state.step,
                  "train_loss": stats.pop("loss"), "lr": current_lr(parts.optimizer)}
        record.update({f"loss_{k}": v for k, v in stats.items() if k not in ("images_per_second", "epoch_time_s")})
        record.update(images_per_second=stats["images_per_second"], epoch_time_s=stats["epoch_time_s"], **scores)
        state.history.append(record)
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        if acc.is_main_process:
            append_history(run_dir, state)
            acc.print(f"epoch {epoch + 1}/{cfg['train']['epochs']}  loss {record['train_loss']:.4f}  "
                      + "  ".join(f"{k[4:]} {v:.3f}" for k, v in scores.items())
                      + f"  {record['images_per_second']:.1f} img/s")
        save_checkpoint(acc, run_dir, state, keep)


def _report_unreadable(acc, dataset, found: list[int], known: set[int], epoch: int) -> None:
    """Warn once per epoch, with the count, when new unreadable training images were skipped.

    Every rank reports the dataset indices it replaced; their union (``known``, kept across
    epochs) is what the warning counts, so the number does not depend on the process count.
    """
    new = set(gather_object(list(found))) - known
    known.update(new)
    if not new or not acc.is_main_process:
        return
    examples = ", ".join(dataset.paths[i] for i in sorted(new)[:3])
    warnings.warn(f"epoch {epoch + 1}: {len(new)} unreadable training image(s) skipped and replaced by "
                  f"the next readable one ({len(known)} in all; data.bad_images=skip), e.g. {examples}; "
                  f"`herbens check` lists every problem file", BadImageWarning, stacklevel=2)


def _save_weights(accelerator, run_dir: Path, model, ema) -> None:
    """Final weights (and EMA weights), written atomically by the main process."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    weights = {"model.pt": accelerator.unwrap_model(model).state_dict()}
    if ema is not None:
        weights["model_ema.pt"] = ema.module.state_dict()
    for name, state_dict in weights.items():
        with atomic_write(run_dir / name, "wb") as handle:
            torch.save(state_dict, handle)


def _write_metrics(cfg, run_dir: Path, state: TrainState, data: RunData, accelerator, wall: float, params: int):
    from herbens.logits import read_logits
    from herbens.metrics import level_scores

    val = read_logits(run_dir, "val") if "val" in cfg["infer"]["splits"] else None
    val_scores = {}
    if val is not None:
        labels = np.asarray(val.labels)
        val_scores = level_scores(labels, np.asarray(val.level("species")).argmax(axis=1), data.taxonomy)
    train_time = float(sum(r["epoch_time_s"] for r in state.history))
    device = accelerator.device
    write_json(run_dir / "metrics.json", {
        "run": cfg["name"],
        "backbone": cfg["model"]["backbone"],
        "params": int(params),
        "epochs": int(cfg["train"]["epochs"]),
        "val": val_scores,
        "cost": {
            "wall_time_s": wall,
            "train_time_s": train_time,
            "device_type": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "device_count": accelerator.num_processes,
            "images_per_second": float(np.mean([r["images_per_second"] for r in state.history])) if state.history else 0.0,
            "device_hours": train_time * accelerator.num_processes / 3600.0,
        },
    })
