"""Honest few-shot evaluation: species never seen in training, enrolled from k images each.

Given a run trained without some species, its known-species prototypes (training embeddings),
its validation rows (known species: head logits + embeddings) and the held-out species' images
(head logits + embeddings), :func:`evaluate_fewshot` enrols every held-out species at once from
``k`` of its images (:func:`~herbens.retrieval.prototypes.species_prototype`), scores with the
head fused with the prototypes (:func:`~herbens.retrieval.prototypes.fuse_with_head`, what
enrolment into a predict bundle does; the head's logits first divided by a temperature fitted on
the known validation rows, since an over-confident head would otherwise never yield to a new
species), and reports:

- top-1 / top-5 accuracy on the held-out species' other images (the same images for every k:
  those after the largest k in each species' shuffled order), fused and prototypes alone;
- the known species' validation macro-F1 with the head alone and with the enrolled species
  added (the change is what enrolment costs the species the model was trained on).

Shot selections are drawn ``draws`` times (seeded) and averaged.
"""

from __future__ import annotations

import numpy as np

from herbens.core.errors import HerbensError
from herbens.metrics import macro_f1
from herbens.retrieval.prototypes import (Prototypes, cosine_scores, fuse_with_head, species_prototype,
                                          temperature_row_losses)

HEAD_TEMPERATURES = np.geomspace(0.05, 20.0, 31)


def topk_hits(scores: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's true column is among its ``k`` best (ties counted against it)."""
    true_score = scores[np.arange(len(truth)), truth]
    return (scores > true_score[:, None]).sum(axis=1) < k


def shot_orders(labels: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """A shuffled order of each species' rows (the first k are its shots)."""
    return {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}


def enrol_all(known: Prototypes, embeddings: np.ndarray, orders: dict[int, np.ndarray], k: int) -> Prototypes:
    """``known`` plus one prototype per new species (new index = num known + its rank)."""
    protos = known
    for rank, species in enumerate(sorted(orders)):
        shots = embeddings[orders[species][:k]]
        protos = protos.with_species(species_prototype(shots), known.num_classes + rank)
    return protos


def evaluate_fewshot(known: Prototypes, temperature: float, val_head: np.ndarray, val_emb: np.ndarray,
                     val_labels: np.ndarray, new_head: np.ndarray, new_emb: np.ndarray, new_labels: np.ndarray,
                     ks=(1, 3, 5), draws: int = 5, seed: int = 0) -> list[dict]:
    """Few-shot scores per k, averaged over ``draws`` shot selections.

    Args:
        known: prototypes of the trained species (``num_classes`` = the head's classes).
        temperature: prototype temperature (fitted on the known validation rows).
        val_head, val_emb, val_labels: known species' validation logits, embeddings, species.
        new_head, new_emb: the held-out species' images: head logits (trained classes only) and
            embeddings.
        new_labels: their held-out species, 0..H-1 (becoming classes C..C+H-1).
        ks: shots per species.

    Returns:
        One dict per k: ``k``, ``eval_images``, ``enrolled_top1``/``top5`` (fused),
        ``prototype_top1``/``top5`` (prototypes alone), ``known_f1_head``,
        ``known_f1_enrolled``, their difference ``known_f1_change`` and ``head_temperature``.
    """
    num_known = known.num_classes
    counts = np.bincount(new_labels)
    if counts.min() <= max(ks):
        raise HerbensError(f"few-shot: every held-out species needs more than {max(ks)} images "
                           f"(the fewest has {counts.min()})")
    head_pred = val_head.argmax(axis=1)
    known_f1_head = macro_f1(val_labels, head_pred)
    losses = temperature_row_losses(val_head, val_labels, HEAD_TEMPERATURES).sum(axis=0)
    head_t = float(HEAD_TEMPERATURES[int(np.argmin(losses))])
    val_head, new_head = val_head / np.float32(head_t), new_head / np.float32(head_t)
    rng = np.random.default_rng(seed)
    sums: dict[int, dict[str, float]] = {k: {} for k in ks}
    for _ in range(draws):
        orders = shot_orders(new_labels, rng)
        eval_rows = np.concatenate([order[max(ks):] for order in orders.values()])
        truth = num_known + new_labels[eval_rows]
        for k in ks:
            protos = enrol_all(known, new_emb, orders, k)
            proto_new = cosine_scores(new_emb[eval_rows], protos) / np.float32(temperature)
            fused_new = fuse_with_head(new_head[eval_rows], proto_new, num_known)
            fused_val = fuse_with_head(val_head, cosine_scores(val_emb, protos) / np.float32(temperature), num_known)
            row = {"enrolled_top1": topk_hits(fused_new, truth, 1).mean(),
                   "enrolled_top5": topk_hits(fused_new, truth, 5).mean(),
                   "prototype_top1": topk_hits(proto_new, truth, 1).mean(),
                   "prototype_top5": topk_hits(proto_new, truth, 5).mean(),
                   "known_f1_enrolled": macro_f1(val_labels, fused_val.argmax(axis=1))}
            for key, value in row.items():
                sums[k][key] = sums[k].get(key, 0.0) + float(value) / draws
            sums[k]["eval_images"] = len(eval_rows)
    return [{"k": k, **sums[k], "known_f1_head": known_f1_head, "head_temperature": head_t,
             "known_f1_change": sums[k]["known_f1_enrolled"] - known_f1_head} for k in ks]
