"""The learning-rate schedule from the recipe, stepped once per optimizer update (timm and torch
schedulers behind one interface)."""

from __future__ import annotations

import math
import warnings

import torch
from timm.scheduler import create_scheduler_v2

from herbens.core.errors import HerbensError


# The schedules build_schedule knows (the recipe schema checks scheduler.name against them).
SCHEDULERS = ("cosine", "onecycle", "none")


def epoch_updates(batches: int, grad_accum: int) -> int:
    """Optimizer updates in an epoch of ``batches`` micro-batches.

    Accelerate (``sync_with_dataloader``, its default) also steps at the end of the loader when
    the last window is partial, so an epoch has ceil(batches / grad_accum) updates.
    """
    return max(1, math.ceil(batches / grad_accum))


def group_lr_scales(optimizer) -> list[float]:
    """Each group's ``lr_scale`` (timm's layer decay stores it there; 1.0 elsewhere)."""
    return [float(group.get("lr_scale", 1.0)) for group in optimizer.param_groups]


class StepSchedule:
    """Per-optimizer-step LR schedule with one interface for timm and torch schedulers.

    timm's schedulers are driven by ``step_update(num_updates)``; the paper's one-cycle
    schedule is torch's ``OneCycleLR`` (stepped once per update). A schedule is a function of
    the update count alone, its length fixed by the recipe it was built for, so it holds no
    state of its own: the update count is the trainer's (checkpointed with the run), and a
    resumed run builds the schedule for its own, possibly longer, ``train.epochs`` and
    seeks (:meth:`seek`) to the restored count. Restoring the old scheduler object instead would
    bring back the old length (OneCycleLR's ``total_steps``, timm's ``t_initial``).
    """

    def __init__(self, scheduler, kind: str):
        self.scheduler = scheduler
        self.kind = kind

    def step(self, num_updates: int) -> None:
        if self.kind == "timm":
            self.scheduler.step_update(num_updates)
        elif self.kind == "torch":
            self.scheduler.step()

    def seek(self, num_updates: int) -> None:
        """Set the optimizer's learning rates to their values after ``num_updates`` updates."""
        if self.kind == "timm":
            self.scheduler.step_update(num_updates)
        elif self.kind == "torch":
            # A run resumed with fewer epochs than it has trained takes no more steps: stop at the end.
            self.scheduler.last_epoch = min(num_updates, self.scheduler.total_steps - 1) - 1
            with warnings.catch_warnings():  # torch's "scheduler stepped before optimizer" note
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()

    def state_dict(self) -> dict:
        # Registered for checkpointing only so that checkpoints keep their layout (custom object 0).
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (see the class docstring); checkpoints written before this held the
        scheduler's own state, whose old length must not come back either."""


def build_schedule(optimizer, sched_cfg: dict, epochs: int, updates_per_epoch: int, lr: float) -> StepSchedule:
    """LR schedule from the recipe: cosine with warm-up (timm), one-cycle (torch) or none.

    Every schedule honours the groups' ``lr_scale`` (layer decay): timm's schedulers apply it
    themselves; for one-cycle it scales each group's peak, for none the constant rate.
    """
    name = sched_cfg["name"]
    total = max(1, epochs * updates_per_epoch)
    if name == "none":
        for group, scale in zip(optimizer.param_groups, group_lr_scales(optimizer)):
            group["lr"] = lr * scale
        return StepSchedule(None, "none")
    if name == "onecycle":
        # The NAFlora-1M baseline: cosine rise from peak/div_factor over pct_start of the
        # steps, cosine fall to peak/div_factor^2 (0.007 -> 0.7 -> 7e-5 in the paper).
        div = float(sched_cfg["div_factor"])
        sched = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[lr * scale for scale in group_lr_scales(optimizer)], total_steps=total + 1,
            pct_start=float(sched_cfg["pct_start"]), anneal_strategy="cos", div_factor=div,
            final_div_factor=div, cycle_momentum=False)
        return StepSchedule(sched, "torch")
    if name == "cosine":
        sched, _ = create_scheduler_v2(
            optimizer, sched="cosine", num_epochs=epochs, updates_per_epoch=updates_per_epoch,
            warmup_epochs=float(sched_cfg["warmup_epochs"]), warmup_lr=float(sched_cfg["warmup_lr"]),
            min_lr=float(sched_cfg["min_lr"]), step_on_epochs=False, cooldown_epochs=0)
        return StepSchedule(sched, "timm")
    raise HerbensError(f"scheduler.name={name!r} is unknown; choose cosine, onecycle or none")


class ProbeThenFinetuneSchedule:
    """Linear probe, then fine-tuning: two schedules back to back on one optimizer.

    The first runs over the ``freeze_trunk_epochs`` (heads only, the trunk frozen), the second
    over the remaining epochs with its own warm-up (``train.unfreeze_warmup_epochs``), so the
    newly trainable trunk starts at ``scheduler.warmup_lr`` rather than at the heads' LR (which
    would wreck pre-trained features). Steps ``< switch_step`` belong to the first.
    """

    def __init__(self, probe: StepSchedule, finetune: StepSchedule, switch_step: int):
        self.probe = probe
        self.finetune = finetune
        self.switch_step = int(switch_step)
        # Both constructors wrote the groups' starting LR; the probe's start is the one that holds.
        probe.step(0)

    def step(self, num_updates: int) -> None:
        if num_updates < self.switch_step:
            self.probe.step(num_updates)
        else:
            self.finetune.step(num_updates - self.switch_step)

    def seek(self, num_updates: int) -> None:
        """The learning rates after ``num_updates`` updates (a resumed run), in whichever phase."""
        if num_updates < self.switch_step:
            self.probe.seek(num_updates)
        else:
            self.finetune.seek(num_updates - self.switch_step)

    # Stateless like StepSchedule: both phases and the switch follow from the recipe (whose
    # freeze_trunk_epochs a resume may not change) and the restored update count.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (see :class:`StepSchedule`)."""


def build_training_schedule(optimizer, sched_cfg: dict, train_cfg: dict, updates_per_epoch: int, lr: float):
    """:func:`build_schedule` over ``train.epochs``, split in two when the trunk starts frozen.

    The recipe's rules (:mod:`herbens.config.rules`) keep ``train.freeze_trunk_epochs`` within
    ``train.epochs`` and refuse the one-cycle schedule for a probe then fine-tuning (two
    one-cycle schedules cannot share an optimizer).
    """
    epochs = int(train_cfg["epochs"])
    frozen = int(train_cfg["freeze_trunk_epochs"])
    if frozen == 0 or frozen == epochs:  # no switch: plain fine-tuning, or a linear probe only
        return build_schedule(optimizer, sched_cfg, epochs, updates_per_epoch, lr)
    probe = build_schedule(optimizer, sched_cfg, frozen, updates_per_epoch, lr)
    finetune_cfg = dict(sched_cfg, warmup_epochs=float(train_cfg["unfreeze_warmup_epochs"]))
    finetune = build_schedule(optimizer, finetune_cfg, epochs - frozen, updates_per_epoch, lr)
    return ProbeThenFinetuneSchedule(probe, finetune, frozen * updates_per_epoch)
