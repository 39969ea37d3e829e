"""Fitting a retrieval scorer on labelled validation embeddings, cross-fitted.

The prototype temperature, and kNN's ``k`` and temperature, are chosen from a grid by log-loss
on the validation rows. Each choice is cross-fitted (:func:`herbens.core.numerics.cross_fit`): made on
every row (the value applied to test) and on each stratified fold's complement. The log-loss and
the top species are reported in sample (the full choice on the rows it was made on: optimistic)
and out of fold (each row under the choice made without its fold). The validation logits a
pseudo-run stores are out of fold as well (:meth:`FittedRetrieval.scores`), so the ensembler,
which fits its own values on them, never sees a row scored with values fitted on its own label.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from herbens.data.taxonomy import Taxonomy
from herbens.core.numerics import CrossFitted, Folds, cross_fit, mean_or_none, stratified_folds
from herbens.retrieval.knn import K_CANDIDATES, T_CANDIDATES, KnnClassifier, knn_logits, knn_row_losses
from herbens.retrieval.prototypes import (PrototypeClassifier, class_prototypes, cosine_scores,
                                          temperature_row_losses)
from herbens.stores.embeddings import iter_chunks

PROTOTYPE_TEMPERATURES = tuple(np.geomspace(0.001, 1.0, 31).round(6).tolist())
PREDICT_ROWS = 2048  # rows per dense [rows, C] block when predicting from stored neighbours


@dataclass
class FittedRetrieval:
    """A retrieval scorer fitted on validation rows.

    Attributes:
        full: the classifier with the values chosen on every validation row (applied to test).
        by_fold: fold i's classifier, chosen without fold i (None for an empty fold; empty list
            when there are fewer than two folds).
        folds: the validation rows' folds.
        fitted: the record: chosen values, ``log_loss: {in_sample, out_of_fold}``, ``folds``,
            each fold's choice.
        predictions: ``{"in_sample", "out_of_fold"}`` top species per validation row (the latter
            None without folds).
    """

    full: object
    by_fold: list
    folds: Folds
    fitted: dict
    predictions: dict

    def scores(self, split: str, start: int, block: np.ndarray) -> np.ndarray:
        """Species logits of a block of ``split``'s rows from ``start``: validation rows under
        their own fold's classifier (out of fold), any other split under the full fit."""
        if split != "val" or not self.by_fold:
            return self.full.scores(block)
        fold = self.folds.fold[start:start + len(block)]
        out = np.empty((len(block), self.full.num_classes), dtype=np.float32)
        for i, clf in enumerate(self.by_fold):
            rows = np.flatnonzero(fold == i)
            if len(rows):
                out[rows] = clf.scores(block[rows])
        return out


def cross_fit_log_loss(row_losses: np.ndarray, labels: np.ndarray,
                       predict: Callable[[int, np.ndarray], np.ndarray] | None = None
                       ) -> tuple[Folds, CrossFitted[int]]:
    """The grid candidate of lowest summed log-loss, cross-fitted over folds stratified by
    ``labels``; per-row outcomes: ``log_loss`` (and ``prediction``, the species ``predict`` gives)."""
    folds = stratified_folds(labels)

    def evaluate(g, rows):
        return {"log_loss": row_losses[rows, g], **({} if predict is None else {"prediction": predict(g, rows)})}

    return folds, cross_fit(folds, lambda rows: int(np.argmin(row_losses[rows].sum(axis=0))), evaluate)


def fit_record(folds: Folds, cf: CrossFitted[int], describe: Callable[[int], dict]) -> dict:
    """The chosen values, their mean log-loss in sample and out of fold, and each fold's choice."""
    oof = cf.out_of_fold
    return {**describe(cf.value),
            "log_loss": {"in_sample": mean_or_none(cf.in_sample["log_loss"]),
                         "out_of_fold": None if oof is None else mean_or_none(oof["log_loss"])},
            "folds": folds.k if oof is not None else 0,
            "fold_choices": [None if g is None else describe(g) for g in cf.fold_values]}


def fit_temperature(row_losses: np.ndarray, labels: np.ndarray, temperatures) -> dict:
    """:func:`fit_record` of the temperature of lowest log-loss (``row_losses`` ``[N, G]``)."""
    folds, cf = cross_fit_log_loss(np.asarray(row_losses, dtype=np.float64), np.asarray(labels))
    return fit_record(folds, cf, lambda g: {"temperature": float(temperatures[g])})


def _fitted(folds: Folds, cf: CrossFitted[int], describe: Callable[[int], dict],
            make: Callable[[int], object], extra: dict) -> FittedRetrieval:
    oof = cf.out_of_fold
    return FittedRetrieval(make(cf.value), [None if g is None else make(g) for g in cf.fold_values], folds,
                           {**fit_record(folds, cf, describe), **extra},
                           {"in_sample": cf.in_sample["prediction"],
                            "out_of_fold": None if oof is None else oof["prediction"]})


def fit_prototypes(train, val, taxonomy: Taxonomy, sub_centers: int, temperature: float | None, seed: int,
                   chunk_rows: int = 2048) -> FittedRetrieval:
    """Prototypes of ``train``'s species; temperature chosen on ``val`` by log-loss, cross-fitted
    (``temperature`` given: that one only, nothing fitted)."""
    protos = class_prototypes(train, train.labels, taxonomy.num_classes("species"), sub_centers, seed)
    temps = PROTOTYPE_TEMPERATURES if temperature is None else (float(temperature),)
    losses, preds = [], []
    for start, stop, block in iter_chunks(val, chunk_rows):
        cos = cosine_scores(block, protos)
        losses.append(temperature_row_losses(cos, val.labels[start:stop], temps))
        preds.append(cos.argmax(axis=1))  # argmax does not depend on the temperature
    losses, preds = np.concatenate(losses), np.concatenate(preds)
    folds, cf = cross_fit_log_loss(losses, val.labels, lambda g, rows: preds[rows])
    return _fitted(folds, cf, lambda g: {"temperature": temps[g]},
                   lambda g: PrototypeClassifier(protos, temps[g]),
                   {"prototypes": int(len(protos.owners)), "sub_centers": sub_centers})


def fit_knn(train, val, taxonomy: Taxonomy, k: int | None, temperature: float | None,
            backend: str) -> FittedRetrieval:
    """kNN over ``train``; ``k`` and temperature chosen on ``val`` by log-loss, cross-fitted, from
    one search for the largest candidate ``k`` (a value given: that one only)."""
    clf = KnnClassifier(train, train.labels, taxonomy.num_classes("species"), backend=backend)
    ks = sorted({min(int(c), len(clf.index_labels)) for c in (K_CANDIDATES if k is None else (k,))})
    temps = [float(t) for t in (T_CANDIDATES if temperature is None else (temperature,))]
    grid = [(kk, t) for kk in ks for t in temps]
    labels = np.asarray(val.labels, dtype=np.int64)
    sims, nlab = clf.neighbours(np.asarray(val.matrix, dtype=np.float32), max(ks))
    losses = np.stack([knn_row_losses(sims, nlab, labels, clf.num_classes, kk, t) for kk, t in grid], axis=1)

    def predict(g, rows):
        kk, t = grid[g]
        return np.concatenate([knn_logits(sims[part], nlab[part], clf.num_classes, kk, t).argmax(axis=1)
                               for part in np.array_split(rows, max(1, -(-len(rows) // PREDICT_ROWS)))])

    folds, cf = cross_fit_log_loss(losses, labels, predict)
    in_sample = losses.mean(axis=0)
    return _fitted(folds, cf, lambda g: {"k": grid[g][0], "temperature": grid[g][1]},
                   lambda g: dataclasses.replace(clf, k=grid[g][0], temperature=grid[g][1]),
                   {"grid": [{"k": kk, "temperature": t, "log_loss_in_sample": float(v)}
                             for (kk, t), v in zip(grid, in_sample)]})


def describe_fit(fitted: dict) -> str:
    """One line: the chosen values and the validation log-loss in sample and out of fold."""
    values = ", ".join(f"{key} {fitted[key]:g}" for key in ("k", "temperature") if key in fitted)
    loss = fitted["log_loss"]
    oof = ("n/a (fewer than 2 folds)" if loss["out_of_fold"] is None
           else f"{loss['out_of_fold']:.4f} ({fitted['folds']}-fold cross-fit)")
    return f"{values}; validation log-loss in-sample {loss['in_sample']:.4f}, out-of-fold {oof}"
