"""The prediction loop over a loader (validation, test, new images): views combined, every
process gathering once per batch."""

from __future__ import annotations

import math

import numpy as np
import torch

from herbens.errors import HerbensError
from herbens.progress import progress_bar




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
    bar = progress_bar(total=len(loader), desc=desc, unit="batch", enabled=accelerator.is_main_process)
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
