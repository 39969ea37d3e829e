"""``herbens openset RECIPE [key=value ...]``: measure the "unknown species" flag honestly.

A random share of the species (default 10 %) is removed from the training metadata; the
recipe is trained on the rest through the normal training code, and the held-out species'
images become that run's test split. Known-species images are its validation split. The OOD
score of :mod:`herbens.bundle.thresholds` should then be lower on the held-out species:
reported as AUROC, and as flag rates at the threshold chosen on known validation images
(cross-fitted: each fold's threshold judged on the known images it was not fitted on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from herbens.bundle import thresholds as th
from herbens.bundle.export import split_rows, validation_rows
from herbens.bundle.scoring import single_run_params
from herbens.config import load_config
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write, write_json
from herbens.data.metadata import find_dataset, load_train_metadata
from herbens.data.taxonomy import Taxonomy
from herbens.training.fit import fit


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve of scores that should be higher for ``positive`` (Mann-Whitney U)."""
    if not len(positive) or not len(negative):
        raise HerbensError("AUROC needs both known and held-out images")
    ranks = rankdata(np.concatenate([positive, negative]))
    u = ranks[:len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def held_out_species(category_ids: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A seeded random ``share`` of the category ids (at least one; at least two stay known)."""
    ids = np.sort(np.unique(category_ids))
    if len(ids) < 3:
        raise HerbensError(f"open-set evaluation needs at least 3 species, the metadata has {len(ids)}")
    count = int(np.clip(round(share * len(ids)), 1, len(ids) - 2))
    return np.sort(np.random.default_rng(seed).choice(ids, size=count, replace=False))


def write_open_set_data(cfg: dict, out: Path, share: float, seed: int) -> dict:
    """The training metadata without the held-out species (CSV, absolute image paths), and
    their images as the test split. Returns a description of the split."""

    train_file, _ = find_dataset(Path(cfg["data"]["root"]))
    meta = load_train_metadata(train_file, cfg["data"]["format"])
    held = held_out_species(meta.images["category_id"].to_numpy(), share, seed)
    images = meta.images.merge(meta.categories, on="category_id", how="left")
    images["file_name"] = [str((Path(meta.images_dir) / f).resolve()) for f in images["file_name"]]
    is_held = images["category_id"].isin(held)
    out.mkdir(parents=True, exist_ok=True)
    columns = ["image_id", "file_name", "category_id", "scientific_name", "family", "genus"]
    with atomic_write(out / "train_metadata.csv", newline="") as handle:
        images.loc[~is_held, columns].to_csv(handle, index=False)
    with atomic_write(out / "test_metadata.csv", newline="") as handle:
        images.loc[is_held, ["image_id", "file_name", "category_id"]].to_csv(handle, index=False)
    return {"held_out_category_ids": held.tolist(), "held_out_images": int(is_held.sum()),
            "known_species": int(meta.categories["category_id"].nunique() - len(held)),
            "known_metadata_images": int((~is_held).sum())}


def open_set_report(known, known_truth: dict, unknown, target: float, keep: float, folds: int = 2,
                    seed: int = 0) -> dict:
    """AUROC of the OOD score, and flag rates of known and held-out images, cross-fitted.

    Each fold's thresholds are fitted on the other known folds (:func:`herbens.bundle.thresholds.
    cross_fitted`); known rates pool every known image under its own fold's thresholds, held-out
    rates average every held-out image's flags over the folds' thresholds. A flag is the
    OOD test alone (``ood_flagged``) or the whole decision being ``unknown`` (``decided_unknown``).
    """
    fitted = th.cross_fitted(known, known_truth, target, keep, folds, seed)
    if fitted.out_of_fold is None:
        raise HerbensError(f"open-set report: {len(known)} known validation images cannot be split into {folds} folds")
    fits = [thr for thr in fitted.fold_values if thr is not None]
    rates = {"known_ood_flagged": fitted.out_of_fold["ood_flagged"].mean(),
             "known_decided_unknown": (fitted.out_of_fold["decision"] == "unknown").mean(),
             "held_out_ood_flagged": np.mean([(unknown.ood < thr["ood"]).mean() for thr in fits]),
             "held_out_decided_unknown": np.mean([(th.decide(unknown, thr) == "unknown").mean() for thr in fits])}
    return {"auroc": auroc(known.ood, unknown.ood), "known_images": len(known), "held_out_images": len(unknown),
            "folds": folds, "ood_keep": keep, "target_precision": target,
            **{k: float(v) for k, v in rates.items()}}


def format_open_set(report: dict, score: str) -> str:
    """The printed summary."""
    return "\n".join([
        f"open set ({report['held_out_images']} images of held-out species vs {report['known_images']} known "
        f"validation images; OOD score {score}, threshold keeping {report['ood_keep']:.0%} of known images, "
        f"{report['folds']}-fold cross-fit)",
        f"{'AUROC (known vs held-out)':<38}{report['auroc']:.3f}",
        f"{'held-out species flagged (OOD)':<38}{100 * report['held_out_ood_flagged']:.1f} %",
        f"{'known species flagged (OOD)':<38}{100 * report['known_ood_flagged']:.1f} %",
        f"{'held-out decided unknown (back-off)':<38}{100 * report['held_out_decided_unknown']:.1f} %",
        f"{'known decided unknown (back-off)':<38}{100 * report['known_decided_unknown']:.1f} %"])


def run_open_set(recipe: str, overrides: list[str], workdir: Path, *, share: float = 0.1, seed: int = 0,
                 ood_score: str = "msp", target: float = 0.95, keep: float = 0.95, progress: bool = True,
                 log=print) -> dict:
    """Hold species out, train, score; writes ``<run>/openset.json`` and returns the report."""

    if not 0 < share < 1:
        raise HerbensError(f"--holdout must be between 0 and 1, got {share}")
    cfg = load_config(recipe, list(overrides))
    data_dir = workdir / "data"
    split = write_open_set_data(cfg, data_dir, share, seed)
    log(f"open set: holding out {len(split['held_out_category_ids'])} species ({split['held_out_images']} images); "
        f"training on {split['known_species']} species")
    cfg = load_config(recipe, list(overrides) + [f"data.root={data_dir}", "data.format=csv",
                                                 f"output_dir={workdir / 'runs'}"])
    run_dir = fit(cfg, overwrite=True, progress=progress)
    taxonomy = Taxonomy.load(run_dir / "taxonomy.json")
    params = single_run_params()
    known, truth, _ = validation_rows([run_dir], params, taxonomy, ood_score)
    unknown, _ = split_rows([run_dir], params, ood_score, "test", labelled_only=False)
    report = {**open_set_report(known, truth, unknown, target, keep, seed=seed), "ood_score": ood_score,
              "run": str(run_dir), **split}
    write_json(run_dir / "openset.json", report)
    log(format_open_set(report, ood_score))
    return report
