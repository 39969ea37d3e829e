"""``herbens retrieval RUN --method prototype|knn -o runs/NAME``: a retrieval pseudo-run.

Reads the run's stored embeddings (``herbens infer RUN --embeddings``), builds a prototype or
kNN classifier on its training embeddings, fits its temperature (and kNN's ``k``) on the
validation embeddings by log-loss, cross-fitted (:mod:`herbens.retrieval.fit`), and writes
per-level logits for val (out of fold) and test into a pseudo-run folder, so that
``herbens ensemble runs/*`` mixes heads and retrieval.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from herbens.data.taxonomy import Taxonomy
from herbens.core.errors import HerbensError
from herbens.metrics import level_scores
from herbens.retrieval.fit import describe_fit, fit_knn, fit_prototypes
from herbens.retrieval.pseudorun import write_pseudo_run
from herbens.retrieval.search import BACKENDS
from herbens.stores.embeddings import embeddings_dir, read_embeddings

METHODS = ("prototype", "knn")
VAL_LOGITS_ARE = ("out-of-fold: each validation row scored with the values fitted without its fold "
                  "(test: the values fitted on every validation row)")


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
        The record written as ``retrieval.json``: fitted values with their validation log-loss
        in sample and out of fold (:mod:`herbens.retrieval.fit`), ``val_scores`` of both.
    """
    run_dir = Path(run_dir)
    if method not in METHODS:
        raise HerbensError(f"unknown retrieval method {method!r}; expected one of {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise HerbensError(f"unknown search backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    taxonomy = Taxonomy.of_run(run_dir)
    opened = {split: read_embeddings(run_dir, split, taxonomy=taxonomy)
              for split in ("train", "val", "test") if split != "test" or embeddings_dir(run_dir, split).exists()}
    train, val = opened["train"], opened["val"]
    for split in (train, val):
        if split.labels is None or (split.labels < 0).any():
            raise HerbensError(f"{split.where}: every row needs a species label (labels.npy) to build and fit "
                               "the retrieval classifier")
    if method == "prototype":
        fit = fit_prototypes(train, val, taxonomy, sub_centers, temperature, seed, chunk_rows)
    else:
        fit = fit_knn(train, val, taxonomy, k, temperature, backend)
    record = {"method": method, "source_run": str(run_dir), "taxonomy_hash": taxonomy.hash,
              "backend": backend if method == "knn" else None, "embedding_dim": train.dim,
              "train_images": len(train), "fitted": fit.fitted, "fitted_on": "val",
              "val_scores": _val_scores(val.labels, fit.predictions, taxonomy),
              "val_logits": VAL_LOGITS_ARE if fit.by_fold else "in-sample (fewer than 2 folds)"}
    log(f"{method}: {describe_fit(fit.fitted)}")
    log(f"{method}: validation species macro-F1 " + ", ".join(
        f"{part.replace('_', '-')} {s['species_macro_f1']:.4f}" for part, s in record["val_scores"].items()
        if s is not None))
    splits = {name: opened[name] for name in ("val", "test") if name in opened}
    write_pseudo_run(run_dir, Path(output), taxonomy, splits, fit.scores, record, chunk_rows, progress)
    log(f"wrote pseudo-run {output} ({', '.join(f'{n} {len(s)}' for n, s in splits.items())} images)")
    return record


def _val_scores(labels: np.ndarray, predictions: dict, taxonomy: Taxonomy) -> dict:
    """Per-level validation scores of the in-sample and the out-of-fold predictions."""
    return {part: None if pred is None else {k: float(v) for k, v in level_scores(labels, pred, taxonomy).items()}
            for part, pred in predictions.items()}
