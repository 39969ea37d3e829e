"""The loops: one training epoch, and prediction over a loader (validation or test).

Short functions over prepared Accelerate objects; no rank logic beyond "main process shows
the bar" and "gather once per batch".
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from herbens.errors import HerbensError


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


def batch_targets(batch: dict, levels) -> dict:
    """Each level's labels, and the teacher's sparse targets when distilling."""
    return {key: value for key, value in batch.items() if key in levels or key.startswith("teacher.")}


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
        images = batch["image"]
        hard = batch_targets(batch, parts.levels)
        targets = dict(hard)
        if parts.mixup is not None:
            images, targets["species"] = parts.mixup(images, hard["species"])
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
    return {k: float(v.detach()) for k, v in losses.items()}


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
    sums: dict[str, float] = {}
    unreadable: set[int] = set()
    count = images = 0
    start = time.perf_counter()
    bar = tqdm(total=total_batches, initial=state.batch_in_epoch, desc=f"epoch {state.epoch + 1}",
               disable=not acc.is_main_process, leave=False, dynamic_ncols=True)
    for batch in loader:
        scale = window_loss_scale(state.batch_in_epoch, total_batches, acc.gradient_accumulation_steps)
        losses = train_step(parts, batch, state, scale)
        if "unreadable" in batch and batch["unreadable"].any():
            unreadable.update(batch["index"][batch["unreadable"]].tolist())
        state.batch_in_epoch += 1
        count += 1
        images += len(batch["image"]) * acc.num_processes
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + value
        bar.update(1)
        if count % log_every == 0:
            bar.set_postfix(loss=f"{sums['loss'] / count:.3f}", lr=f"{current_lr(parts.optimizer):.2e}")
        if acc.sync_gradients and on_step is not None:
            on_step()
    bar.close()
    elapsed = time.perf_counter() - start
    out = {key: value / max(count, 1) for key, value in sums.items()}
    out.update(images_per_second=images / max(elapsed, 1e-9), epoch_time_s=elapsed,
               unreadable=sorted(unreadable))
    return out


def current_lr(optimizer) -> float:
    """The largest learning rate of any group (the heads' full LR under layer decay)."""
    return max(group["lr"] for group in optimizer.param_groups)


def combine_views(logits: torch.Tensor, space: str) -> torch.Tensor:
    """Average per-view logits ``[B, V, C]`` over views.

    ``logit``: the mean logit (the default; what the ensembler expects). ``prob``: the log of
    the mean probability, so a softmax downstream gives the averaged probabilities. ``none``:
    keep every view.
    """
    if space == "logit":
        return logits.mean(dim=1)
    if space == "prob":
        return torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=1) - math.log(logits.shape[1])
    if space == "none":
        return logits
    raise HerbensError(f"infer.tta_space must be logit or prob, got {space!r}")


def combine_embedding_views(embeddings: torch.Tensor) -> torch.Tensor:
    """Unit embedding per image from per-view embeddings ``[B, V, D]``.

    Each view is L2-normalised before the mean (views' norms differ; cosine retrieval only sees
    directions), and the mean is normalised again.
    """
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    return torch.nn.functional.normalize(unit.mean(dim=1), dim=-1)


@torch.no_grad()
def predict_batches(accelerator, model, loader, levels, desc: str = "predict", space: str = "logit",
                    keep_views: bool = False, embedding: bool = False):
    """Yield ``(index, record)`` per gathered batch, on every process.

    Test-time views arrive as images of shape [B, V, C, H, W]; their logits are combined per
    image (:func:`combine_views` with ``space``). The dataset index travels with the logits
    through ``gather_for_metrics`` (which drops the padding duplicates of the last distributed
    batch), so rows land where they belong whatever the process count.

    ``record`` holds float32 numpy arrays: ``{level: [n, C]}``, ``"labels"`` (species index, -1
    unknown), ``"unreadable"`` (1 where the dataset could not decode the row's own image and
    returned another one: those scores belong to no row), with ``keep_views``
    ``"<level>.views": [n, V, C]`` and, with ``embedding``, ``"embedding": [n, D]``
    (:func:`combine_embedding_views`).
    """
    model.eval()
    bar = tqdm(total=len(loader), desc=desc, disable=not accelerator.is_main_process, leave=False)
    for batch in loader:
        images = batch["image"]
        views = images.shape[1] if images.ndim == 5 else 1
        if images.ndim == 5:
            images = images.flatten(0, 1)
        outputs = model(images)
        record = {"index": batch["index"], "labels": batch["species"]}
        if "unreadable" in batch:  # int64: every backend gathers it (gloo has no bool all_gather)
            record["unreadable"] = torch.as_tensor(batch["unreadable"]).to(torch.int64)
        for level in levels:
            logits = outputs[level].float()
            per_view = logits.view(-1, views, logits.shape[-1])
            record[level] = combine_views(per_view, space)
            if keep_views:
                record[f"{level}.views"] = per_view
        if embedding:
            emb = outputs["embedding"].float()
            record["embedding"] = combine_embedding_views(emb.view(-1, views, emb.shape[-1]))
        record = {key: value.cpu().numpy() for key, value in accelerator.gather_for_metrics(record).items()}
        bar.update(1)
        yield record.pop("index"), record
    bar.close()


def predict(accelerator, model, loader, levels, desc: str = "predict", space: str = "logit") -> dict[str, np.ndarray]:
    """Per-level logits for every row of the loader's dataset, in dataset order (in memory).

    Returns:
        ``{level: float16 array [N, C]}`` (float16 as in the logits store: half the memory)
        plus ``"labels"``, on every process. For whole test splits, stream
        :func:`predict_batches` into the logits store instead.
    """
    n = len(loader.dataset)
    out: dict[str, np.ndarray] = {}
    seen = np.zeros(n, dtype=bool)
    for index, record in predict_batches(accelerator, model, loader, levels, desc, space):
        for key, value in record.items():
            if key not in out:
                dtype = np.float16 if np.issubdtype(value.dtype, np.floating) else value.dtype
                out[key] = np.zeros((n,) + value.shape[1:], dtype=dtype)
            out[key][index] = value
        seen[index] = True
    if not seen.all():
        missing = np.flatnonzero(~seen)[:5].tolist()
        raise RuntimeError(f"prediction missed {int((~seen).sum())} rows (first: {missing})")
    return out
