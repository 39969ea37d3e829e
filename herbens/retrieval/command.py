"""``herbens retrieval RUN --method prototype|knn -o runs/NAME``: a retrieval pseudo-run.

Reads the run's stored embeddings (``herbens infer RUN --embeddings``), builds a prototype or
kNN classifier on its training embeddings, fits its temperature (and kNN's ``k``) on the
validation embeddings by log-loss, and writes per-level logits for val and test into a
pseudo-run folder, so that ``herbens ensemble runs/*`` mixes heads and retrieval.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from herbens.data.taxonomy import Taxonomy
from herbens.errors import HerbensError
from herbens.metrics import level_scores
from herbens.retrieval.knn import K_CANDIDATES, T_CANDIDATES, KnnClassifier
from herbens.retrieval.prototypes import (PrototypeClassifier, class_prototypes, cosine_scores,
                                          temperature_log_loss)
from herbens.retrieval.pseudorun import write_pseudo_run
from herbens.retrieval.search import BACKENDS
from herbens.stores.embeddings import embeddings_dir, iter_chunks, read_embeddings

METHODS = ("prototype", "knn")
PROTOTYPE_TEMPERATURES = tuple(np.geomspace(0.001, 1.0, 31).round(6).tolist())


def fit_prototypes(train, val, taxonomy: Taxonomy, sub_centers: int, temperature: float | None, seed: int,
                   chunk_rows: int = 2048) -> tuple[PrototypeClassifier, dict, np.ndarray]:
    """Prototypes of ``train``'s species, temperature fitted on ``val`` by log-loss.

    Returns:
        The classifier, the fitted values, and its top species per validation row.
    """
    protos = class_prototypes(train, train.labels, taxonomy.num_classes("species"), sub_centers, seed)
    temps = PROTOTYPE_TEMPERATURES if temperature is None else (float(temperature),)
    losses, preds = np.zeros(len(temps)), []
    for start, stop, block in iter_chunks(val, chunk_rows):
        cos = cosine_scores(block, protos)
        losses += temperature_log_loss(cos, val.labels[start:stop], temps)
        preds.append(cos.argmax(axis=1))  # argmax does not depend on the temperature
    best = int(np.argmin(losses))
    fitted = {"temperature": temps[best], "log_loss": float(losses[best] / len(val)),
              "prototypes": int(len(protos.owners)), "sub_centers": sub_centers}
    return PrototypeClassifier(protos, temps[best]), fitted, np.concatenate(preds)


def _fit_knn(train, val, taxonomy: Taxonomy, k: int | None, temperature: float | None, backend: str
             ) -> tuple[KnnClassifier, dict, np.ndarray]:
    clf = KnnClassifier(train, train.labels, taxonomy.num_classes("species"), backend=backend)
    fitted = clf.fit(val.matrix, val.labels, K_CANDIDATES if k is None else (k,),
                     T_CANDIDATES if temperature is None else (temperature,))
    return clf, fitted, fitted.pop("predictions")


def retrieval_run(run_dir, output, method: str = "prototype", *, sub_centers: int = 1, k: int | None = None,
                  temperature: float | None = None, backend: str = "exact", seed: int = 0,
                  chunk_rows: int = 2048, progress: bool = True, log=print) -> dict:
    """Build a retrieval classifier from a run's embeddings and write its pseudo-run.

    Args:
        run_dir: source run with ``taxonomy.json`` and ``embeddings/{train,val[,test]}``.
        output: pseudo-run directory to write.
        method: ``prototype`` (class means, or ``sub_centers`` k-means centres per species) or
            ``knn``.
        k, temperature: fixed values instead of fitting them on validation (None: fit).
        backend: kNN search backend, ``exact`` (streaming numpy) or ``faiss``.
        seed: k-means seed for sub-centres.
        chunk_rows: query rows per chunk.

    Returns:
        The record written as ``retrieval.json`` (fitted values; validation scores, in-sample
        for what was fitted).
    """
    run_dir = Path(run_dir)
    if method not in METHODS:
        raise HerbensError(f"unknown retrieval method {method!r}; expected one of {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise HerbensError(f"unknown search backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    taxonomy = Taxonomy.of_run(run_dir)
    opened = {split: read_embeddings(run_dir, split, taxonomy_hash=taxonomy.hash,
                                     num_species=taxonomy.num_classes("species"))
              for split in ("train", "val", "test") if split != "test" or embeddings_dir(run_dir, split).exists()}
    train, val = opened["train"], opened["val"]
    for split in (train, val):
        if split.labels is None or (split.labels < 0).any():
            raise HerbensError(f"{split.where}: every row needs a species label (labels.npy) to build and fit "
                               "the retrieval classifier")
    if method == "prototype":
        clf, fitted, pred = fit_prototypes(train, val, taxonomy, sub_centers, temperature, seed, chunk_rows)
    else:
        clf, fitted, pred = _fit_knn(train, val, taxonomy, k, temperature, backend)
    scores = level_scores(val.labels, pred, taxonomy)
    record = {"method": method, "source_run": str(run_dir), "taxonomy_hash": taxonomy.hash,
              "backend": backend if method == "knn" else None, "embedding_dim": train.dim,
              "train_images": len(train), "fitted": fitted, "fitted_on": "val",
              "val_scores": {k_: float(v) for k_, v in scores.items()},
              "val_scores_are": "in-sample" if method == "knn" else "out-of-sample (temperature does not move argmax)"}
    log(f"{method}: val species macro-F1 {scores['species_macro_f1']:.4f} ({record['val_scores_are']}); "
        + ", ".join(f"{k_} {v}" for k_, v in fitted.items() if k_ != "grid"))
    splits = {name: opened[name] for name in ("val", "test") if name in opened}
    write_pseudo_run(run_dir, Path(output), taxonomy, splits, clf.scores, record, chunk_rows, progress)
    log(f"wrote pseudo-run {output} ({', '.join(f'{n} {len(s)}' for n, s in splits.items())} images)")
    return record
