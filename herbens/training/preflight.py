"""Preflight: before epoch 1, run everything a training run needs at its end on a few images.

A real run costs many GPU-hours; what it does after its last epoch (the whole schedule, test-time
views, prediction on test images, writing checkpoints and logits) is exercised here first, in
seconds, so that a mistake surfaces before training instead of after it. Nothing here changes
the state of the real run: the forward/backward pass runs on copies, the schedule is rebuilt on
a stand-in optimizer, and the random generators are restored.
"""

from __future__ import annotations

import contextlib
import copy
import random
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from herbens.data.file_sample import check_split_files
from herbens.data.loaders import predict_loader
from herbens.data.views import Views
from herbens.core.errors import HerbensError
from herbens.infer.loop import Engine, predict_batches
from herbens.optim.optimizers import SGD_FAMILY, build_optimizer
from herbens.optim.schedules import build_training_schedule
from herbens.training.engine import step_inputs

# Bytes per element of a stored logit (the logits store keeps float16).
LOGIT_BYTES = 2
# Images run through the model per check: a handful is enough to exercise the code paths.
FEW = 2


@dataclass
class Plan:
    """What a run will do, as the preflight found it (printed by ``herbens train --check``)."""

    images: dict            # {"train": n, "val": n, "test": n}
    batches_per_epoch: int  # micro-batches per process
    updates_per_epoch: int
    epochs: int
    global_batch: int
    lr: float               # peak learning rate after batch scaling
    checkpoint_bytes: int   # one checkpoint folder
    weights_bytes: int      # model.pt (+ model_ema.pt)
    logits_bytes: dict      # {split: bytes}
    free_bytes: int         # free space on the run directory's disk

    @property
    def total_updates(self) -> int:
        return self.epochs * self.updates_per_epoch

    def summary(self) -> str:
        """A few lines a person reads before starting a long run."""
        images = ", ".join(f"{split} {n:,}" for split, n in self.images.items())
        logits = ", ".join(f"{split} {_size(n)}" for split, n in self.logits_bytes.items()) or "none"
        return "\n".join([
            f"images: {images}",
            f"steps: {self.batches_per_epoch:,} batches and {self.updates_per_epoch:,} optimizer updates "
            f"per epoch, {self.total_updates:,} updates in {self.epochs} epochs",
            f"global batch: {self.global_batch}  peak lr after scaling: {self.lr:.4g}",
            f"sizes: checkpoint {_size(self.checkpoint_bytes)} each, final weights {_size(self.weights_bytes)}, "
            f"logits {logits}; {_size(self.free_bytes)} free",
        ])


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----- data ------------------------------------------------------------------------------------

def check_splits_present(cfg: dict, data) -> None:
    """Every split named in ``infer.splits`` has images (test metadata exists)."""
    if "test" in cfg["infer"]["splits"] and data.test is None:
        raise HerbensError(f"infer.splits includes test, but {cfg['data']['root']} has no test metadata "
                           f"(test_metadata.json, test/metadata.json or test_metadata.csv); "
                           f"add it or set infer.splits=[val]")
    if "val" in cfg["infer"]["splits"] and len(data.val) == 0:
        raise HerbensError("infer.splits includes val, but the validation split is empty "
                           "(data.val_fraction / data.val_min_images)")


def check_listed_files(cfg: dict, data) -> None:
    """Stat every file of the splits the run reads and decode a sample of each
    (:mod:`herbens.data.file_sample`): train always, val (validation every epoch), test only when
    ``infer.splits`` names it. A split's problems stop the run under its bad-image policy
    (``data.bad_images: error``, or ``infer.bad_images: fail`` for val/test), else warn."""
    stop_eval = cfg["data"]["bad_images"] == "error" or cfg["infer"]["bad_images"] == "fail"
    splits = [("train", data.train, data.images_dir, cfg["data"]["bad_images"] == "error"),
              ("val", data.val, data.images_dir, stop_eval)]
    if data.test is not None and "test" in cfg["infer"]["splits"]:
        splits.append(("test", data.test, data.test_images_dir, stop_eval))
    for split, frame, images_dir, stop in splits:
        check_split_files(frame, images_dir, split, stop, cfg["data"]["max_image_pixels"],
                          cfg["data"]["min_image_size"], seed=int(cfg["seed"]))


def check_full_batch(batches: int, train_images: int, batch: int, key: str = "train.batch_size") -> None:
    """Training needs at least one full batch per process (the loader drops a partial one).

    Args:
        key: the recipe key that sets the batch (a P x K sampler sets it itself).
    """
    if batches < 1:
        raise HerbensError(f"{key}={batch}: the training split has only {train_images} image(s) "
                           f"per process, less than one batch (data.limit_train, data.val_fraction)")


# ----- model, loss, optimizer, schedule --------------------------------------------------------

@contextlib.contextmanager
def preserved_rngs():
    """Run a block, then restore python, numpy and torch (CPU and CUDA) random states."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def check_schedule(optimizer, sched_cfg: dict, train_cfg: dict, updates_per_epoch: int, lr: float) -> None:
    """Step the run's schedule through its whole length, on a stand-in optimizer.

    The schedule is the one training builds (:func:`herbens.optim.schedules.build_training_schedule`:
    with ``train.freeze_trunk_epochs``, the probe's and then the fine-tuning's). The stand-in
    has the real optimizer's groups (learning rates and ``lr_scale``) over one dummy parameter
    each, so the real optimizer and schedule are left untouched.
    """
    stand_in = torch.optim.SGD([{**{k: v for k, v in group.items() if k not in ("params", "initial_lr")},
                                 "params": [torch.zeros(1)]} for group in optimizer.param_groups], lr=lr)
    schedule = build_training_schedule(stand_in, sched_cfg, train_cfg, updates_per_epoch, lr)
    epochs = int(train_cfg["epochs"])
    with warnings.catch_warnings():  # torch's "scheduler stepped before optimizer" note
        warnings.simplefilter("ignore", UserWarning)
        for step in range(1, epochs * updates_per_epoch + 1):
            schedule.step(step)
    rates = [group["lr"] for group in stand_in.param_groups]
    if not all(np.isfinite(rates)):
        raise HerbensError(f"scheduler.name={sched_cfg['name']!r}: the learning rate ends at {rates}")


def few_train_images(dataset, levels) -> dict:
    """A tiny batch of real, augmented training images (the first ones of the split)."""
    return default_collate([dataset[i] for i in range(min(FEW, len(dataset)))])


def check_train_step(model, criterion, batch: dict, levels, opt_cfg: dict, lr: float, accelerator,
                     mixup=None, teacher=None) -> None:
    """One forward, backward and optimizer step on copies of the model and the loss (and the
    online teacher's targets of the batch)."""
    model, criterion = copy.deepcopy(model).train(), copy.deepcopy(criterion)
    optimizer = build_optimizer(model, list(criterion.parameters()), opt_cfg, lr)
    on_device = {key: value.to(accelerator.device) for key, value in batch.items() if torch.is_tensor(value)}
    images, hard, targets = step_inputs(on_device, levels, mixup, teacher)
    with accelerator.autocast():
        losses = criterion(model(images, targets=hard), targets)
    if not torch.isfinite(losses["loss"]):
        raise HerbensError(f"the loss of a first training batch is {float(losses['loss'])} (levels, optimizer.lr)")
    losses["loss"].backward()
    optimizer.step()


def check_prediction(model, cfg: dict, frame, images_dir: Path, taxonomy, classes: dict, data_config: dict,
                     accelerator, split: str, views: Views | None = None) -> None:
    """Predict the split's first images with the run's test-time views, as the end of a run will.

    Args:
        taxonomy: the run's taxonomy for a labelled split, None for test images.
        classes: ``{level: number of classes}``.
        views: the run's test-time views (default: the recipe's ``infer``).
    """
    if len(frame) == 0:
        return
    views = views or Views.of_recipe(cfg)
    in_process = {**cfg, "data": {**cfg["data"], "num_workers": 0}}  # two images: no worker processes
    loader = predict_loader(frame.head(FEW), images_dir, taxonomy, views, in_process, batch_size=FEW,
                            data_config=data_config)
    # This process's own images, the model not prepared: the accelerator's autocast, no gather.
    engine = Engine.of_accelerator(accelerator, gather=False, progress=False, autocast=True)
    _, record = next(predict_batches(engine, model, loader, tuple(cfg["levels"]), space=views.space))
    for level in cfg["levels"]:
        combined = record[level]
        expected = (min(FEW, len(frame)), classes[level])
        if combined.shape != expected or not np.isfinite(combined).all():
            raise HerbensError(f"{split} prediction of level {level}: logits of shape {tuple(combined.shape)}, "
                               f"expected {expected} and finite")


# ----- output folder ---------------------------------------------------------------------------

def optimizer_slots(name: str) -> int:
    """Per-parameter state tensors an optimizer keeps (momentum; Adam-like moments)."""
    return 1 if name.lower() in SGD_FAMILY else 2


def estimate_sizes(params: list[torch.nn.Parameter], cfg: dict, split_rows: dict, classes: dict,
                   views: Views | None = None) -> tuple[int, int, dict]:
    """Bytes of one checkpoint, of the final weights and of each split's logits.

    A checkpoint holds the weights, the optimizer state and the EMA copy; logits are
    ``rows x classes`` float16 per level (times the views with ``infer.keep_views``).
    """
    weights = sum(p.numel() * p.element_size() for p in params)
    ema = 1 if cfg["train"]["ema"] else 0
    checkpoint = weights * (1 + ema + optimizer_slots(cfg["optimizer"]["name"]))
    rows_per_image = (views or Views.of_recipe(cfg)).num_views if cfg["infer"]["keep_views"] else 0
    per_row = sum(classes.values()) * LOGIT_BYTES * (1 + rows_per_image)
    logits = {split: rows * per_row for split, rows in split_rows.items()}
    return checkpoint, weights * (1 + ema), logits


def check_output_dir(run_dir: Path, needed: int) -> int:
    """The run directory can be created and written, with ``needed`` bytes free; returns the free bytes.

    Creates the run directory (as training will); the probe file is removed again.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir, prefix=".preflight-"):
            pass
    except OSError as exc:
        raise HerbensError(f"cannot create run directory {run_dir}: {exc.strerror or exc}") from exc
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise HerbensError(f"output_dir: {run_dir} has {_size(free)} free, but the run needs about "
                           f"{_size(needed)} for checkpoints, weights and logits")
    return free


# ----- the whole preflight ---------------------------------------------------------------------

def run_preflight(cfg: dict, setup, run_dir: Path) -> Plan:
    """Every check above, in the order of cheapest first; returns the run's :class:`Plan`.

    Args:
        setup: the built run (:class:`herbens.training.setup.TrainingSetup`), before any training.
        run_dir: the run directory (created here when missing).
    Raises:
        HerbensError: naming the key or file at fault.
    """
    data, acc = setup.data, setup.accelerator
    levels = tuple(cfg["levels"])
    batches = len(setup.loader)
    key = "sampler.classes_per_batch x images_per_class" if cfg["sampler"]["name"] == "pk" else "train.batch_size"
    check_full_batch(batches, len(setup.loader.dataset) // acc.num_processes, setup.batch, key)
    check_splits_present(cfg, data)
    splits = {"val": (data.val, data.images_dir, data.taxonomy)}
    if data.test is not None:
        splits["test"] = (data.test, data.test_images_dir, None)
    check_listed_files(cfg, data)
    check_schedule(setup.optimizer, cfg["scheduler"], cfg["train"], setup.updates_per_epoch, setup.lr)
    classes = {level: data.taxonomy.num_classes(level) for level in levels}
    views = Views.of_recipe(cfg)
    with preserved_rngs():
        check_train_step(setup.plain_model, setup.criterion, few_train_images(setup.loader.dataset, levels),
                         levels, cfg["optimizer"], setup.lr, acc, setup.mixup, setup.teacher)
        for split, (frame, images_dir, taxonomy) in splits.items():
            if split in cfg["infer"]["splits"]:  # eval mode only: training sets train mode again
                check_prediction(setup.plain_model, cfg, frame, images_dir, taxonomy, classes, setup.data_config, acc,
                                 split, views)
    params = list(setup.plain_model.parameters()) + list(setup.criterion.parameters())
    rows = {split: len(frame) for split, (frame, _, _) in splits.items() if split in cfg["infer"]["splits"]}
    checkpoint, weights, logits = estimate_sizes(params, cfg, rows, classes, views)
    keep = int(cfg["train"]["keep_checkpoints"])
    # A new checkpoint is written before the oldest is pruned: keep + 1 exist for a moment.
    free = check_output_dir(run_dir, checkpoint * (keep + 1) + weights + sum(logits.values()))
    images = {"train": len(data.train), "val": len(data.val), "test": 0 if data.test is None else len(data.test)}
    return Plan(images, batches, setup.updates_per_epoch, int(cfg["train"]["epochs"]), setup.global_batch,
                setup.lr, checkpoint, weights, logits, free)
