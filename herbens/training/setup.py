"""A run's parts built from the recipe and prepared by Accelerate, before any training step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DistributedDataParallelKwargs,
    LoggerType,
    ProjectConfiguration,
)
from timm.data import Mixup
from timm.utils import ModelEmaV3

from herbens.core.errors import HerbensError
from herbens.core.runtime import check_precision, launched_on_cpus_only
from herbens.data.loaders import predict_loader, train_loader
from herbens.data.run_data import RunData
from herbens.data.transforms import (
    build_train_transform,
    build_tta_views,
    model_data_config,
)
from herbens.losses import build_criterion
from herbens.models.clip import init_text_heads, with_text_head_scales
from herbens.models.compiling import compile_model
from herbens.models.net import build_model
from herbens.optim.optimizers import build_optimizer, scaled_lr
from herbens.optim.schedules import build_training_schedule, epoch_updates
from herbens.stores.targets import teacher_for_training
from herbens.training.teacher import online_teacher


def tracker_names(cfg: dict) -> list[str]:
    """``train.trackers`` (names checked by the schema at load), each one installed here."""

    names = list(cfg["train"]["trackers"])
    for name in names:
        if LoggerType(name) not in get_available_trackers():
            raise HerbensError(f"train.trackers: {name} is not installed (pip install {name})")
    return names


def build_accelerator(cfg: dict, run_dir: Path | None = None) -> Accelerator:
    """Accelerator for the recipe's precision, accumulation and trackers (logging into
    ``run_dir/trackers``; ``run_dir`` defaults to ``output_dir/name``)."""

    run_dir = Path(run_dir or Path(cfg["output_dir"]) / str(cfg["name"]))
    trackers = tracker_names(cfg)
    cpu = launched_on_cpus_only()
    check_precision(cfg["train"]["precision"], cpu)
    handlers = []
    if cfg["train"]["freeze_trunk_epochs"]:
        # The frozen trunk gets no gradients during the probe: DDP must expect unused parameters.
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(mixed_precision=cfg["train"]["precision"], cpu=cpu,
                       gradient_accumulation_steps=int(cfg["train"]["grad_accum"]),
                       log_with=trackers or None, kwargs_handlers=handlers,
                       project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                           logging_dir=str(run_dir / "trackers")))


def build_mixup(cfg: dict, num_classes: int):
    aug = cfg["augment"]
    if not (aug["mixup"] or aug["cutmix"]):
        return None

    # The losses smooth soft targets themselves (every level alike), so Mixup must not.
    return Mixup(mixup_alpha=aug["mixup"], cutmix_alpha=aug["cutmix"], label_smoothing=0.0,
                 num_classes=num_classes)


def build_ema(cfg: dict, model):
    if not cfg["train"]["ema"]:
        return None

    return ModelEmaV3(model, decay=float(cfg["train"]["ema_decay"]))


@dataclass
class TrainingSetup:
    """A run's built parts, prepared by Accelerate, before any training step."""

    accelerator: Accelerator
    data: RunData
    model: torch.nn.Module        # prepared (and compiled, with model.compile)
    plain_model: torch.nn.Module  # the same weights, unwrapped and uncompiled: saved and averaged
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object
    ema: object
    loader: object
    sampler: object
    val_loader: object
    data_config: dict
    mixup: object
    batch: int                    # images per process and micro-batch
    global_batch: int
    lr: float
    updates_per_epoch: int
    compiled_modules: int         # modules compiled in place (model.compile)
    config: dict                  # the recipe as config.yaml records it (text heads' scales filled in)
    teacher: object = None        # the online teacher (distill.online), herbens.training.teacher


def build_setup(cfg: dict, accelerator: Accelerator, data: RunData,
                resumed_scales: dict[str, float] | None = None) -> TrainingSetup:
    """Model, loaders, loss, optimizer, schedule and EMA, prepared by Accelerate.

    ``resumed_scales``: the text heads' scales a resumed run recorded; its checkpoint holds their
    weights, so the CLIP text tower is not run again.
    """
    teacher, distill = teacher_for_training(cfg["distill"], data.train, data.taxonomy, tuple(cfg["levels"]))
    if resumed_scales is None:
        model = build_model(cfg, data.taxonomy)
        # Text-initialised heads take CLIP's logit scale, a head argument: the saved config keeps it.
        config = with_text_head_scales(cfg, init_text_heads(model, cfg, data.taxonomy))
    else:
        config = with_text_head_scales(cfg, resumed_scales)
        model = build_model(config, data.taxonomy)
    data_config = model_data_config(model.data_config, cfg["input"])
    loader, sampler = train_loader(data.train, data.images_dir, data.taxonomy,
                                   build_train_transform(data_config, cfg["augment"]), cfg, teacher=teacher)
    val_loader = predict_loader(data.val, data.images_dir, data.taxonomy,
                                build_tta_views(["center"], data_config), cfg, data_config=data_config)
    criterion = build_criterion(cfg["levels"], data.taxonomy, distill).to(accelerator.device)
    # A P x K batch sampler sets the batch size itself (P classes x K images).
    batch = sampler.batch_size if getattr(sampler, "is_batch_sampler", False) else int(cfg["train"]["batch_size"])
    global_batch = batch * int(cfg["train"]["grad_accum"]) * accelerator.num_processes
    lr = scaled_lr(cfg["optimizer"], global_batch)
    optimizer = build_optimizer(model, list(criterion.parameters()), cfg["optimizer"], lr)
    # Compiled in place (nn.Module.compile): the module saved and averaged keeps plain state-dict
    # keys (no `_orig_mod.` prefix, which a freshly built model in herbens infer would not know).
    plain_model = model
    compiled = compile_model(model, cfg["model"]["compile"], cfg["model"]["backbone"])
    model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
    updates = epoch_updates(len(loader), int(cfg["train"]["grad_accum"]))
    schedule = build_training_schedule(optimizer, cfg["scheduler"], cfg["train"], updates, lr)
    teacher_model = online_teacher(cfg["distill"], data.taxonomy, distill["levels"] if distill else (), data_config,
                                   accelerator)
    return TrainingSetup(accelerator, data, model, plain_model, criterion, optimizer, schedule,
                         build_ema(cfg, plain_model), loader, sampler, val_loader, data_config,
                         build_mixup(cfg, data.taxonomy.num_classes("species")), batch, global_batch, lr, updates,
                         compiled, config, teacher_model)
