"""The training loop: one optimizer step and one epoch over prepared Accelerate objects.

No rank logic beyond "main process shows the bar".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from herbens.core.progress import progress_bar


@dataclass
class TrainState:
    """Where training is: checkpointed so a resumed run continues exactly here."""

    epoch: int = 0            # current epoch (0-based)
    step: int = 0             # optimizer updates done in total
    batch_in_epoch: int = 0   # micro-batches of the current epoch already consumed
    history: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.history = list(state.get("history", []))


@dataclass
class TrainParts:
    """Everything one optimizer step needs, prepared by Accelerate where that applies."""

    accelerator: object
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: object
    levels: tuple
    mixup: object = None
    ema: object = None
    clip_grad: float | None = None
    progress: bool = True  # progress bars of this process (shown on the main process only)
    teacher: object = None  # herbens.training.teacher.OnlineTeacher (distill.online)


def batch_targets(batch: dict, levels) -> dict:
    """Each level's labels, and the teacher's sparse targets when distilling."""
    return {key: value for key, value in batch.items() if key in levels or key.startswith("teacher.")}


def step_inputs(batch: dict, levels, mixup=None, teacher=None) -> tuple:
    """The images a step trains on, the hard labels (margin heads read them) and the loss targets.

    Mixup/CutMix mixes the images and the species target; an online teacher then scores exactly
    those mixed images, so its targets describe what the student sees.
    """
    images = batch["image"]
    hard = batch_targets(batch, levels)
    targets = dict(hard)
    if mixup is not None:
        images, targets["species"] = mixup(images, hard["species"])
    if teacher is not None:
        targets.update(teacher(images))
    return images, hard, targets


def window_loss_scale(position: int, total_batches: int, grad_accum: int) -> float:
    """Factor on a micro-batch's loss so that each accumulation window averages its own batches.

    Accelerate divides every micro-batch's loss by ``grad_accum``, and also steps at the end of
    an epoch whose length is not a multiple of it; that last, partial window holds only
    ``total_batches % grad_accum`` micro-batches, whose gradients would otherwise be too small.

    Args:
        position: the micro-batch's 0-based position in its epoch.
    """
    full = total_batches - total_batches % grad_accum
    return 1.0 if position < full else grad_accum / (total_batches - full)


def train_step(parts: TrainParts, batch: dict, state: TrainState, loss_scale: float = 1.0) -> dict:
    """Forward, loss, backward and (on a sync step) optimizer update; returns loss parts.

    ``loss_scale`` multiplies the loss before backward (:func:`window_loss_scale`).
    """
    acc = parts.accelerator
    with acc.accumulate(parts.model):
        images, hard, targets = step_inputs(batch, parts.levels, parts.mixup, parts.teacher)
        outputs = parts.model(images, targets=hard)
        losses = parts.criterion(outputs, targets)
        acc.backward(losses["loss"] * loss_scale)
        if acc.sync_gradients and parts.clip_grad:
            acc.clip_grad_norm_(parts.model.parameters(), parts.clip_grad)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            state.step += 1
            parts.schedule.step(state.step)
            if parts.ema is not None:
                parts.ema.update(acc.unwrap_model(parts.model, keep_torch_compile=False), step=state.step)
    # Detached device tensors, not floats: reading a value back would stall the host on every
    # step until the GPU finishes it (see DeviceTotals).
    return {k: v.detach() for k, v in losses.items()}


class DeviceTotals:
    """Per-step loss parts and unreadable-image flags, kept on the device until read back.

    ``add`` queues device work only; ``read`` copies everything to the host at once (one
    sync), which the epoch does every ``log_every`` steps and at its end. Loss parts are
    summed in float64, as Python floats were: each float32 value converts exactly and is
    added in the same order, so the means equal a per-step ``float()`` read-back bit for bit.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.unreadable: set[int] = set()
        self._flagged: list[torch.Tensor] = []

    def add(self, losses: dict[str, torch.Tensor], batch: dict) -> None:
        for key, value in losses.items():
            if key not in self.sums:
                # MPS has no float64; float32 sums there.
                dtype = torch.float32 if value.device.type == "mps" else torch.float64
                self.sums[key] = torch.zeros((), dtype=dtype, device=value.device)
            self.sums[key].add_(value)
        if "unreadable" in batch:
            self._flagged.append(torch.where(batch["unreadable"], batch["index"], -1))
        self.count += 1

    def read(self) -> dict[str, float]:
        """Mean loss parts over the steps added so far; also moves the flags into ``unreadable``."""
        if self._flagged:
            flags = torch.cat(self._flagged).cpu()
            self.unreadable.update(flags[flags >= 0].tolist())
            self._flagged = []
        if not self.sums:
            return {}
        values = torch.stack(list(self.sums.values())).cpu().tolist()
        return {key: value / max(self.count, 1) for key, value in zip(self.sums, values)}


def train_one_epoch(parts: TrainParts, loader, state: TrainState, total_batches: int,
                    on_step=None, log_every: int = 10) -> dict:
    """Run the rest of the current epoch; ``loader`` already skips consumed batches.

    Args:
        on_step: called after every optimizer update (for step checkpoints); may be None.
    Returns:
        Mean loss parts over the batches run, images per second, the epoch's time and
        ``"unreadable"``: the dataset indices of this process's unreadable images that were
        replaced (``data.bad_images: skip``), as a sorted list.
    """
    acc = parts.accelerator
    parts.model.train()
    totals = DeviceTotals()
    images = 0
    start = time.perf_counter()
    bar = progress_bar(total=total_batches, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}",
                       unit="batch", enabled=parts.progress and acc.is_main_process)
    for batch in loader:
        scale = window_loss_scale(state.batch_in_epoch, total_batches, acc.gradient_accumulation_steps)
        totals.add(train_step(parts, batch, state, scale), batch)
        state.batch_in_epoch += 1
        images += len(batch["image"]) * acc.num_processes
        bar.update(1)
        if totals.count % log_every == 0:
            bar.set_postfix(loss=f"{totals.read()['loss']:.3f}", lr=f"{current_lr(parts.optimizer):.2e}")
        if acc.sync_gradients and on_step is not None:
            on_step()
    out = totals.read()
    if parts.teacher is not None:
        out.update(parts.teacher.cost())
    bar.close()
    elapsed = time.perf_counter() - start
    out.update(images_per_second=images / max(elapsed, 1e-9), epoch_time_s=elapsed,
               unreadable=sorted(totals.unreadable))
    return out


def current_lr(optimizer) -> float:
    """The largest learning rate of any group (the heads' full LR under layer decay)."""
    return max(group["lr"] for group in optimizer.param_groups)
