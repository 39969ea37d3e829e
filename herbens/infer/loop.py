"""The one prediction loop: over a loader of test-time views (a run's validation and test
splits, new images for a bundle, enrolment shots, a teacher's training images, the preflight's
first images), with autocast, views combined per image and, where asked, every process
gathering once per batch.

``herbens infer`` and the end of training (:mod:`herbens.infer.splits`), ``herbens predict``,
``herbens enrol`` and ``herbens teach`` (:func:`herbens.bundle.predict.member_logits`) and the
preflight (:func:`herbens.training.preflight.check_prediction`) all predict through
:func:`predict_batches`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager

import numpy as np
import torch

from herbens.core.errors import HerbensError
from herbens.core.progress import progress_bar


@dataclass(frozen=True)
class Engine:
    """Where the loop runs: the device, the autocast region of a forward pass, and the gather
    that brings a batch's rows to every process (None: this process keeps its own rows)."""

    device: torch.device
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    gather: Callable[[dict], dict] | None = None
    progress: bool = False

    @classmethod
    def of_accelerator(cls, accelerator, gather: bool = True, progress: bool = True,
                       autocast: bool = False) -> "Engine":
        """An Accelerate run on its device; with ``gather``, rows of every process
        (``gather_for_metrics`` drops the padding of the last distributed batch).

        ``autocast``: the accelerator's mixed precision around each forward, for a model that
        was not prepared (a prepared model already autocasts in its own forward).
        """
        return cls(accelerator.device, accelerator.autocast if autocast else contextlib.nullcontext,
                   accelerator.gather_for_metrics if gather else None, progress and accelerator.is_main_process)

    @classmethod
    def local(cls, device: str | torch.device, precision: str = "no", progress: bool = False) -> "Engine":
        """One process on ``device``; a run's fp16/bf16 precision applies on CUDA only (as trained)."""
        device = torch.device(device)
        if device.type == "cuda" and precision in ("fp16", "bf16"):
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            return cls(device, lambda: torch.autocast("cuda", dtype=dtype), None, progress)
        return cls(device, contextlib.nullcontext, None, progress)


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


def _forward(engine: Engine, model, images: torch.Tensor) -> dict:
    """The model's outputs for a batch of views flattened to ``[B * V, C, H, W]``."""
    with engine.autocast():
        return model(images.to(engine.device, non_blocking=True))


def _batch_record(engine: Engine, model, batch: dict, levels, space: str, keep_views: bool,
                  embedding: bool) -> dict:
    """Views combined per image for one batch, as tensors (before any gather)."""
    images = batch["image"]
    record = {"index": torch.as_tensor(batch["index"])}
    if "species" in batch:
        record["labels"] = batch["species"]
    if "unreadable" in batch:  # int64: every backend gathers it (gloo has no bool all_gather)
        record["unreadable"] = torch.as_tensor(batch["unreadable"]).to(torch.int64)
    if images is None:  # every image of the batch failed to decode (reported in "errors")
        return record
    views = images.shape[1] if images.ndim == 5 else 1
    outputs = _forward(engine, model, images.flatten(0, 1) if images.ndim == 5 else images)
    for level in levels:
        logits = outputs[level].float()
        per_view = logits.view(-1, views, logits.shape[-1])
        record[level] = combine_views(per_view, space)
        if keep_views:
            record[f"{level}.views"] = per_view
    if embedding:
        emb = outputs["embedding"].float()
        record["embedding"] = combine_embedding_views(emb.view(-1, views, emb.shape[-1]))
    return record


@torch.no_grad()
def predict_batches(engine: Engine, model, loader, levels, desc: str = "predict", space: str = "logit",
                    keep_views: bool = False, embedding: bool = False):
    """Yield ``(index, record)`` per batch (gathered when the engine gathers).

    Test-time views arrive as images of shape [B, V, C, H, W]; their logits are combined per
    image (:func:`combine_views` with ``space``). The dataset index travels with the logits
    through the gather, so rows land where they belong whatever the process count.

    ``record`` holds float32 numpy arrays: ``{level: [n, C]}``, ``"labels"`` (species index, -1
    unknown; when the loader gives them), ``"unreadable"`` (1 where the dataset could not decode
    the row's own image and returned another one: those scores belong to no row), with
    ``keep_views`` ``"<level>.views": [n, V, C]`` and, with ``embedding``, ``"embedding": [n, D]``
    (:func:`combine_embedding_views`). A loader that reports unreadable images instead
    (:func:`herbens.data.loaders.paths_loader`) adds ``"errors"``: ``[(index, message)]``, rows
    absent from ``index``.
    """
    model.eval()
    bar = progress_bar(total=len(loader), desc=desc, unit="batch", enabled=engine.progress)
    for batch in loader:
        record = _batch_record(engine, model, batch, levels, space, keep_views, embedding)
        if engine.gather is not None:
            record = engine.gather(record)
        record = {key: value.cpu().numpy() for key, value in record.items()}
        if "errors" in batch:
            record["errors"] = list(batch["errors"])
        bar.update(1)
        yield record.pop("index"), record
    bar.close()


def predict(engine: Engine, model, loader, levels, desc: str = "predict", space: str = "logit") -> dict[str, np.ndarray]:
    """Per-level logits for every row of the loader's dataset, in dataset order (in memory).

    Returns:
        ``{level: float16 array [N, C]}`` (float16 as in the logits store: half the memory)
        plus ``"labels"``, on every process. For whole test splits, stream
        :func:`predict_batches` into the logits store instead.
    """
    n = len(loader.dataset)
    out: dict[str, np.ndarray] = {}
    seen = np.zeros(n, dtype=bool)
    for index, record in predict_batches(engine, model, loader, levels, desc, space):
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
