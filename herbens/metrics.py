"""Scores: Kaggle's macro-F1 (sklearn's definition), per-level summaries and the paper's analyses.

The post-hoc analyses follow the NAFlora-1M paper: species accuracy per family (fig. 3a) with
binomial standard errors, mean per-species accuracy by training-set size (fig. 3b), a one-way
ANOVA of correctness across families/genera, and macro-F1 on head and tail species.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from herbens.data.taxonomy import LEVELS, Taxonomy


def macro_f1(y_true, y_pred) -> float:
    """Macro-averaged F1 over the union of true and predicted labels.

    Identical to ``sklearn.metrics.f1_score(y_true, y_pred, average="macro")``: a label that is
    predicted but never true scores 0 and still counts, so invalid predictions cost score.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred {y_pred.shape}")
    if y_true.size == 0:
        return 0.0
    labels, inverse = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    t, p = inverse[: len(y_true)], inverse[len(y_true):]
    n = len(labels)
    tp = np.bincount(t[t == p], minlength=n).astype(np.float64)
    true_count = np.bincount(t, minlength=n)
    pred_count = np.bincount(p, minlength=n)
    denom = true_count + pred_count
    f1 = np.divide(2 * tp, denom, out=np.zeros(n), where=denom > 0)
    return float(f1.mean())


def level_scores(true_species, pred_species, taxonomy: Taxonomy) -> dict[str, float]:
    """Macro-F1 and accuracy at each level; genus/family are derived from species indices."""
    true_species = np.asarray(true_species, dtype=np.int64)
    pred_species = np.asarray(pred_species, dtype=np.int64)
    out = {}
    for level in LEVELS:
        t = taxonomy.level_indices(level, true_species)
        p = taxonomy.level_indices(level, pred_species)
        out[f"{level}_macro_f1"] = macro_f1(t, p)
        out[f"{level}_accuracy"] = float((t == p).mean()) if len(t) else 0.0
    return out


# ----- per-image accuracy and its uncertainty ------------------------------------------------

def top1_accuracy(y_true, y_pred) -> float:
    """Fraction of images whose predicted label equals the true one (0.0 for no images)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred {y_pred.shape}")
    return float((y_true == y_pred).mean()) if y_true.size else 0.0


def binomial_se(p, n):
    """Standard error sqrt(p(1-p)/n) of an accuracy ``p`` measured on ``n`` images.

    Works elementwise on arrays; NaN where ``n`` is 0 (no estimate, not a zero error).
    """
    p = np.asarray(p, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(p * (1.0 - p) / n)
    return np.where(n > 0, se, np.nan)


def group_accuracy(correct, groups, names) -> pd.DataFrame:
    """Accuracy, binomial standard error and image count per group.

    Args:
        correct: per-image correctness (bool or 0/1), shape [N].
        groups: per-image group index into ``names``, shape [N].
        names: group names; groups without images are left out of the table.

    Returns:
        DataFrame with columns ``name, n_images, n_correct, accuracy, se``, in group index order.
    """
    correct = np.asarray(correct, dtype=np.float64)
    groups = np.asarray(groups, dtype=np.int64)
    k = len(names)
    n = np.bincount(groups, minlength=k)
    hits = np.bincount(groups, weights=correct, minlength=k)
    present = np.flatnonzero(n)
    acc = hits[present] / n[present]
    return pd.DataFrame({
        "name": [names[i] for i in present],
        "n_images": n[present].astype(np.int64),
        "n_correct": hits[present].round().astype(np.int64),
        "accuracy": acc,
        "se": binomial_se(acc, n[present]),
    })


def per_level_accuracy(true_species, pred_species, taxonomy: Taxonomy,
                       level: str = "family") -> pd.DataFrame:
    """Species top-1 accuracy of the test images grouped by their TRUE genus or family.

    This is the paper's per-family analysis (fig. 3a): a sheet counts as correct only when its
    species is right, and it belongs to the family it really is in (not the predicted one).
    Adds ``train_images`` (the group's labelled training images) to :func:`group_accuracy`.
    """
    true_species = np.asarray(true_species, dtype=np.int64)
    correct = true_species == np.asarray(pred_species, dtype=np.int64)
    groups = taxonomy.level_indices(level, true_species)
    table = group_accuracy(correct, groups, taxonomy.level_names(level))
    index_of = {name: i for i, name in enumerate(taxonomy.level_names(level))}
    train = taxonomy.level_counts(level)
    table["train_images"] = [int(train[index_of[name]]) for name in table["name"]]
    return table


def best_worst(table: pd.DataFrame, k: int = 10, min_images: int = 1
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``k`` most and least accurate rows of a :func:`group_accuracy` table, never sharing
    a group: with fewer than ``2 k`` groups the better half (the middle one included) is best
    and the rest worst, so no family is listed as both.

    Ties are broken by image count (more images first: the better-measured group wins a tie)
    and then by name, so the tables are reproducible. Groups with fewer than ``min_images``
    test images are left out, because one lucky image makes a 100 % family.
    """
    table = table[table["n_images"] >= min_images]
    best = table.sort_values(["accuracy", "n_images", "name"], ascending=[False, False, True])
    best = best.head(min(k, (len(table) + 1) // 2))
    worst = table[~table["name"].isin(best["name"])]
    worst = worst.sort_values(["accuracy", "n_images", "name"], ascending=[True, False, True])
    return best.reset_index(drop=True), worst.head(k).reset_index(drop=True)


# ----- accuracy by training-set size (the paper's fig. 3b) -----------------------------------

#: Left edges of the training-image bins: below 5, then [5,10), [10,20), ..., [80,90), >= 90.
TRAINING_BIN_EDGES = (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90)


def training_bin_labels(edges=TRAINING_BIN_EDGES) -> list[str]:
    """Human labels of the bins: ``<5``, ``5-9``, ..., ``80-89``, ``>=90``."""
    labels = [f"<{edges[1]}"]
    labels += [f"{lo}-{hi - 1}" for lo, hi in zip(edges[1:-1], edges[2:])]
    return labels + [f">={edges[-1]}"]


def training_bin_of(counts, edges=TRAINING_BIN_EDGES) -> np.ndarray:
    """Bin index of each training count (0 = ``<5`` ... len(edges)-1 = ``>=90``)."""
    return np.searchsorted(np.asarray(edges[1:]), np.asarray(counts), side="right")


def per_species_accuracy(true_species, pred_species, num_species: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Per-species accuracy (NaN for species without test images) and test-image counts."""
    true_species = np.asarray(true_species, dtype=np.int64)
    correct = (true_species == np.asarray(pred_species, dtype=np.int64)).astype(np.float64)
    n = np.bincount(true_species, minlength=num_species)
    hits = np.bincount(true_species, weights=correct, minlength=num_species)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = np.where(n > 0, hits / np.maximum(n, 1), np.nan)
    return acc, n


def accuracy_by_training_count(true_species, pred_species, taxonomy: Taxonomy,
                               edges=TRAINING_BIN_EDGES) -> pd.DataFrame:
    """Mean per-species accuracy in bins of training images per species (fig. 3b).

    Like the paper, each species with at least one test image contributes its own accuracy,
    and a bin's value is the plain mean over its species (so a species with many test images
    does not dominate). ``se`` is the standard error of that mean, std(ddof=1)/sqrt(species);
    NaN for a bin holding a single species. Empty bins are omitted. ``image_accuracy`` (pooled
    over the bin's images) is given alongside for comparison.

    Returns:
        DataFrame ``bin, lo, hi, n_species, n_images, accuracy, se, image_accuracy``
        (``hi`` is exclusive; None for the open last bin).
    """
    acc, n = per_species_accuracy(true_species, pred_species, taxonomy.num_classes("species"))
    tested = n > 0
    bins = training_bin_of(taxonomy.counts, edges)
    labels = training_bin_labels(edges)
    rows = []
    for b, label in enumerate(labels):
        members = tested & (bins == b)
        if not members.any():
            continue
        a = acc[members]
        se = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
        rows.append({
            "bin": label, "lo": int(edges[b]), "hi": int(edges[b + 1]) if b + 1 < len(edges) else None,
            "n_species": int(members.sum()), "n_images": int(n[members].sum()),
            "accuracy": float(a.mean()), "se": se,
            "image_accuracy": float((a * n[members]).sum() / n[members].sum()),
        })
    return pd.DataFrame(rows, columns=["bin", "lo", "hi", "n_species", "n_images", "accuracy",
                                       "se", "image_accuracy"])


# ----- one-way ANOVA across groups --------------------------------------------------------------

def split_by_group(values, groups) -> list[np.ndarray]:
    """Split ``values`` into one array per distinct group label (sorted label order)."""
    values = np.asarray(values, dtype=np.float64)
    groups = np.asarray(groups)
    if values.shape != groups.shape:
        raise ValueError(f"values has shape {values.shape} but groups {groups.shape}")
    labels, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(labels)))[:-1]
    return np.split(values[order], bounds)


def one_way_anova(values, groups) -> dict:
    """One-way ANOVA (``scipy.stats.f_oneway``) of ``values`` across ``groups``.

    Used on per-image correctness (0/1) across families or genera: does the group a sheet
    belongs to explain whether it is classified correctly? F and p are NaN (with a ``note``)
    when the test is undefined: fewer than two groups, no within-group degrees of freedom,
    or no variance at all (e.g. every image correct).
    """
    parts = split_by_group(values, groups)
    n = int(sum(len(p) for p in parts))
    out = {"F": float("nan"), "p": float("nan"), "groups": len(parts), "n": n,
           "df_between": len(parts) - 1, "df_within": n - len(parts)}
    if len(parts) < 2 or n <= len(parts):
        out["note"] = "undefined: needs at least two groups and more images than groups"
        return out
    pooled = np.concatenate(parts)
    if np.all(pooled == pooled[0]):
        out["note"] = "undefined: all values are identical"
        return out

    with warnings.catch_warnings():
        # Zero variance inside every group gives F = inf, which scipy warns about; keep it.
        warnings.simplefilter("ignore")
        result = stats.f_oneway(*parts)
    out["F"], out["p"] = float(result.statistic), float(result.pvalue)
    return out


def correctness_anova(true_species, pred_species, taxonomy: Taxonomy, level: str) -> dict:
    """ANOVA of species correctness across the images' true genera or families."""
    true_species = np.asarray(true_species, dtype=np.int64)
    correct = (true_species == np.asarray(pred_species, dtype=np.int64)).astype(np.float64)
    return one_way_anova(correct, taxonomy.level_indices(level, true_species))


# ----- head and tail classes ---------------------------------------------------------------------

def head_tail_split(counts, fraction: float = 1 / 3) -> tuple[np.ndarray, np.ndarray]:
    """Species indices of the tail and head by training images.

    Species are ranked by training count (ties broken by species index, so the split is
    deterministic); the tail is the ``floor(C * fraction)`` species with the fewest training
    images and the head the same number with the most. The middle is in neither.

    Returns:
        ``(tail, head)`` sorted index arrays.
    """
    counts = np.asarray(counts)
    order = np.argsort(counts, kind="stable")
    k = int(len(counts) * fraction)
    if k == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.sort(order[:k]), np.sort(order[-k:])


def group_macro_f1(y_true, y_pred, classes) -> float:
    """Macro-F1 on the images whose TRUE class is in ``classes``.

    Exactly ``sklearn.metrics.f1_score(y_true[m], y_pred[m], labels=L, average="macro")`` with
    ``m = isin(y_true, classes)`` and ``L`` = the classes of ``classes`` that occur in
    ``y_true[m]`` (all of them on the Kaggle test set, which has test images of every species).
    A wrong prediction counts against the true class (recall) and against the predicted class
    only if that is in ``L`` (precision); images of other classes are left out, so they cannot
    be false positives. Classes absent from the evaluated images are not averaged in: on a
    validation split they have no images and would otherwise count as F1 = 0.
    Returns NaN when no image belongs to the group.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    mask = np.isin(y_true, np.asarray(classes))
    if not mask.any():
        return float("nan")
    t, p = y_true[mask], y_pred[mask]
    labels = np.unique(t)
    idx_t = np.searchsorted(labels, t)
    tp = np.bincount(idx_t[t == p], minlength=len(labels)).astype(np.float64)
    true_count = np.bincount(idx_t, minlength=len(labels))
    in_labels = np.isin(p, labels)
    pred_count = np.bincount(np.searchsorted(labels, p[in_labels]), minlength=len(labels))
    return float(np.mean(2 * tp / (true_count + pred_count)))


def head_tail_scores(true_species, pred_species, taxonomy: Taxonomy,
                     fraction: float = 1 / 3) -> dict:
    """Species macro-F1 on tail and head species (see :func:`head_tail_split`)."""
    tail, head = head_tail_split(taxonomy.counts, fraction)
    counts = taxonomy.counts
    return {
        "tail_macro_f1": group_macro_f1(true_species, pred_species, tail),
        "head_macro_f1": group_macro_f1(true_species, pred_species, head),
        "tail_species": int(len(tail)), "head_species": int(len(head)),
        "tail_max_train_images": int(counts[tail].max()) if len(tail) else None,
        "head_min_train_images": int(counts[head].min()) if len(head) else None,
        "fraction": float(fraction),
    }
