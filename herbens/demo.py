"""``herbens demo``: the whole pipeline on the embedded synthetic herbarium, on a CPU.

Synthesises a small herbarium, trains the demo recipes (different backbones and loss
families), ensembles them into ``submissions/demo.csv``, scores everything against the
synthetic test solution, writes a report, exports the ensemble into ``bundles/demo`` and
names a few test sheets from it, measures the open-set flag, and prints one table.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from herbens.analysis.evaluate import load_solution, submission_predictions
from herbens.analysis.openset import run_open_set
from herbens.analysis.report import write_report
from herbens.bundle.export import export_bundle
from herbens.bundle.predict import predict_command
from herbens.config import load_config
from herbens.config.catalogue import loss_names
from herbens.core.fileio import atomic_write, read_json, write_json
from herbens.data.metadata import load_test_metadata
from herbens.data.synth import synthesize
from herbens.data.taxonomy import Taxonomy
from herbens.ensemble.pipeline import ensemble_runs
from herbens.metrics import level_scores
from herbens.stores.logits import read_logits
from herbens.training.fit import fit

DEMO_RECIPES = ("demo_balanced", "demo_arcface", "demo_seesaw")
# A fifth of each species held out for validation (81 images for 30 species): at the default
# tenth (45 images, 1.5 per species) a step changes too few rows for the keep rule to judge it,
# so the ensemble could only be the mean, whatever validation said.
DEMO_SPLIT = ["data.val_fraction=0.2"]
DEMO_DATA = {"species": 30, "seed": 0, "long_edge": 256, "min_images": 6, "max_images": 60,
             "test_per_species": 4, "difficulty": 0.7}


def synthesize_once(root: Path, params: dict, progress: bool = True) -> None:
    """Build the demo herbarium unless ``root`` already holds one made with ``params``."""

    stamp = root / "herbens_demo.json"
    if stamp.exists() and read_json(stamp) == params:
        print(f"using the synthetic herbarium in {root}")
        return
    print(f"synthesising a herbarium of {params['species']} species into {root} ...")
    synthesize(root, **params, progress=progress)
    write_json(stamp, params)


def solution_labels(root: Path, taxonomy: Taxonomy) -> pd.Series:
    """True species index per test image id, from the synthetic ``test_solution.csv``."""

    solution = load_solution(root / "test_solution.csv")
    return pd.Series(taxonomy.index_of(solution["category_id"].to_numpy()), index=solution["Id"])


def score_run(run_dir: Path, truth: pd.Series, taxonomy: Taxonomy) -> dict:
    """Test scores of one run's own argmax predictions."""

    test = read_logits(run_dir, "test")
    predicted = np.asarray(test.level("species")).argmax(axis=1)
    return level_scores(truth.loc[test.image_ids].to_numpy(), predicted, taxonomy)


def score_submission(csv: Path, root: Path, taxonomy: Taxonomy) -> dict:
    """Test scores of a submission CSV, after the checks Kaggle applies to it."""

    true, predicted = submission_predictions(csv, load_solution(root / "test_solution.csv"), taxonomy)
    return level_scores(true, predicted, taxonomy)


def chance_scores(truth: pd.Series, taxonomy: Taxonomy, seed: int = 0) -> dict:
    """Scores of uniform random guessing, the floor every model must clear."""
    rng = np.random.default_rng(seed)
    guesses = rng.integers(0, taxonomy.num_classes("species"), size=len(truth))
    return level_scores(truth.to_numpy(), guesses, taxonomy)


def print_table(rows: list[tuple[str, dict, float | None]]) -> None:
    header = f"{'':<22}{'species F1':>11}{'genus F1':>10}{'family F1':>11}{'time (s)':>10}"
    print("\n" + header)
    print("-" * len(header))
    for name, scores, seconds in rows:
        wall = f"{seconds:>10.1f}" if seconds is not None else f"{'':>10}"
        print(f"{name:<22}{scores['species_macro_f1']:>11.3f}{scores['genus_macro_f1']:>10.3f}"
              f"{scores['family_macro_f1']:>11.3f}{wall}")


def _print_validation(summary: dict) -> None:
    """The ensemble's validation species F1: in-sample, out-of-fold and honest (nested, the estimate)."""
    if summary["val"]:
        val = summary["val"]
        honest = f", honest (nested) {val['honest']['species_macro_f1']:.3f}" if "honest" in val else ""
        print(f"ensemble on validation ({val['images']} images, {val['folds']}-fold): species F1 "
              f"in-sample {val['in_sample']['species_macro_f1']:.3f}, "
              f"out-of-fold {val['out_of_fold']['species_macro_f1']:.3f}{honest} (steps: table above)")


def run_demo(workdir: Path, recipes=DEMO_RECIPES, overrides: list[str] | None = None, openset: bool = True,
             progress: bool = True) -> dict:
    """Run the whole demo under ``workdir``; returns the scores table as a dict.

    With ``openset``, the first recipe is also trained without 10 % of the species and the
    open-set evaluation (AUROC, flag rates) is printed and returned under ``"openset"``.
    """

    start = time.perf_counter()
    root = workdir / "data" / "demo"
    synthesize_once(root, DEMO_DATA, progress)
    run_dirs, times = [], {}
    for recipe in recipes:
        # infer.embeddings: the runs' train/val embeddings make the exported bundle enrol-ready.
        cfg = load_config(recipe, [f"data.root={root}", f"output_dir={workdir / 'runs'}", "infer.embeddings=true",
                                   *DEMO_SPLIT, *(overrides or [])])
        print(f"\n== training {cfg['name']} ({cfg['model']['backbone']}, species loss "
              f"{loss_names(cfg['levels']['species'])}) ==")
        t0 = time.perf_counter()
        run_dirs.append(fit(cfg, overwrite=True, progress=progress))
        times[cfg["name"]] = time.perf_counter() - t0

    print("\n== ensembling ==")
    submission = workdir / "submissions" / "demo.csv"
    t0 = time.perf_counter()
    fitted = ensemble_runs(run_dirs, submission, progress=progress)
    ensemble_time = time.perf_counter() - t0

    taxonomy = Taxonomy.load(run_dirs[0] / "taxonomy.json")
    truth = solution_labels(root, taxonomy)
    rows = [("chance (uniform)", chance_scores(truth, taxonomy), None)]
    for run_dir in run_dirs:
        rows.append((run_dir.name, score_run(run_dir, truth, taxonomy), times[run_dir.name]))
    rows.append(("ensemble", score_submission(submission, root, taxonomy), ensemble_time))

    _write_report(workdir, run_dirs, submission, root)
    _bundle_and_predict(workdir, submission, root)
    extra = {}
    if openset:

        print(f"\n== open set: {recipes[0]} trained without 10 % of the species ==")
        extra["openset"] = run_open_set(recipes[0], [f"data.root={root}", *DEMO_SPLIT, *(overrides or [])],
                                        workdir / "openset", share=0.1, seed=0,  # runs/ holds runs only
                                        progress=progress)
    print_table(rows)
    _print_validation(fitted)
    total = time.perf_counter() - start
    print(f"\nsubmission: {submission}    total wall time: {total:.0f} s")
    return {name: scores for name, scores, _ in rows} | extra | {"wall_time_s": total}


def _write_report(workdir: Path, run_dirs: list[Path], submission: Path, root: Path) -> None:
    out = write_report(run_dirs + [submission], workdir / "reports" / "demo",
                       solution=root / "test_solution.csv", metadata=root / "train_metadata.json",
                       exclude_split=run_dirs[0] / "split.csv")
    print(f"report: {out}")


def _bundle_and_predict(workdir: Path, submission: Path, root: Path, sheets: int = 6) -> None:
    """Export the ensemble into ``bundles/demo`` and name a few test sheets from the bundle alone."""

    print("\n== exporting the ensemble into a bundle and predicting from it ==")
    # knn: the runs' embeddings let it flag sheets that are not specimens (softmax scores do not).
    bundle = export_bundle(submission.with_suffix(".json"), workdir / "bundles" / "demo", ood_score="knn",
                           overwrite=True)
    test = load_test_metadata(root / "test_metadata.json").head(sheets)
    listing = workdir / "bundles" / "demo_sheets.txt"
    with atomic_write(listing) as handle:
        handle.writelines(f"{Path(test.attrs['images_dir']).resolve() / f}\n" for f in test["file_name"])
    out = workdir / "submissions" / "demo_bundle_predictions.csv"
    predict_command(bundle, listing, out, html=out.with_suffix(".html"), top_k=3, progress=False)
    frame = pd.read_csv(out)
    print(frame[["path", "decision", "scientific_name_1", "probability_1"]]
          .assign(path=frame["path"].map(lambda p: Path(p).name)).to_string(index=False))
