"""Export side of few-shot enrolment: each member's known-species prototypes and the
temperatures fusion needs, cross-fitted on the validation rows (see :mod:`herbens.bundle.enrolment`
for the design and the files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from herbens.bundle.enrolled import OWNERS, PROTOTYPES
from herbens.core.errors import HerbensError
from herbens.core.fileio import save_npy
from herbens.retrieval.fewshot import HEAD_TEMPERATURES
from herbens.retrieval.fit import describe_fit, fit_prototypes, fit_temperature
from herbens.retrieval.prototypes import temperature_row_losses
from herbens.stores.embeddings import embeddings_dir, read_embeddings


def export_prototypes(run_dirs: list[Path], folders: list[Path], val_chunks: Iterable, taxonomy, log: Callable,
                      seed: int = 0) -> dict | None:
    """Write each member's known-species prototypes; returns ``bundle.json``'s ``enrolment``
    record, or None (with a note) when some member run has no train/val embeddings.

    ``val_chunks`` yields ``(LevelProbabilities, labels)`` of the bundle's combined validation
    rows (``export.combined_chunks``): the head temperature is fitted on them. Every temperature
    is cross-fitted; the record's ``fit`` holds each one's log-loss in sample and out of fold.
    """
    lacking = [run for run in run_dirs if not all(embeddings_dir(run, s).is_dir() for s in ("train", "val"))]
    if lacking:
        log(f"note: run '{lacking[0]}' has no embeddings/train and embeddings/val; the bundle cannot enrol "
            "species (herbens infer RUN --embeddings, then export again)")
        return None
    temperatures, fits = {}, {}
    for run, folder in zip(run_dirs, folders):
        splits = [read_embeddings(run, s, taxonomy=taxonomy)
                  for s in ("train", "val")]
        for split in splits:
            if split.labels is None or (split.labels < 0).any():
                raise HerbensError(f"{split.where}: every row needs a species label to build the bundle's prototypes")
        fit = fit_prototypes(splits[0], splits[1], taxonomy, 1, None, seed)
        save_npy(folder / PROTOTYPES, fit.full.prototypes.vectors.astype(np.float32))
        save_npy(folder / OWNERS, fit.full.prototypes.owners.astype(np.int64))
        temperatures[folder.name] = float(fit.fitted["temperature"])
        fits[folder.name] = fit.fitted
        log(f"enrolment: member {folder.name} prototype {describe_fit(fit.fitted)}")
    head = fit_head_temperature(val_chunks)
    log(f"enrolment: head {describe_fit(head)}")
    return {"head_temperature": head["temperature"], "prototype_temperatures": temperatures,
            "fit": {"head_temperature": head, "prototype_temperatures": fits}}


def fit_head_temperature(val_chunks: Iterable) -> dict:
    """Temperature of the bundle's combined species scores by log-loss on the validation rows,
    cross-fitted (:func:`herbens.retrieval.fit.fit_temperature`)."""
    losses, labels = [], []
    for probs, chunk_labels in val_chunks:
        losses.append(temperature_row_losses(probs.scores, chunk_labels, HEAD_TEMPERATURES))
        labels.append(chunk_labels)
    return fit_temperature(np.concatenate(losses), np.concatenate(labels), HEAD_TEMPERATURES)
