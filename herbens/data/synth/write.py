"""Writing a synthetic dataset: images in worker processes, then the metadata files."""

from __future__ import annotations

import csv
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

from herbens.data.synth.plan import LICENSES, Plan, make_plan
from herbens.data.synth.sheet import render_sheet
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write, write_json
from herbens.core.progress import progress_bar

JPEG_QUALITY = 90

METADATA_FILES = ("train_metadata.json", "test_metadata.json", "sample_submission.csv",
                  "test_solution.csv")


def _render_job(job: tuple) -> None:
    """Worker: draw one sheet and save it as JPEG (top-level so that it pickles)."""
    path, look, inst, key, long_edge, difficulty = job
    rng = np.random.default_rng(np.random.SeedSequence(list(key)))
    image = render_sheet(look, inst, rng, long_edge, difficulty)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=JPEG_QUALITY)


def _pool_context():
    """fork on Linux, the platform default elsewhere.

    spawn would re-run the caller's ``__main__`` in every worker, which breaks plain scripts
    that call synthesize() without an ``if __name__ == "__main__"`` guard. fork is safe here
    even after torch was imported: the workers only use numpy and PIL, never torch's threads.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _render_all(jobs: list[tuple], workers: int, progress: bool) -> None:
    bar = progress_bar(total=len(jobs), desc="synth", unit="img", enabled=progress, leave=True)
    try:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                _render_job(job)
                bar.update()
            return
        with _pool_context().Pool(workers) as pool:
            chunk = max(1, len(jobs) // (workers * 16))
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=chunk):
                bar.update()
    finally:
        bar.close()


def _train_metadata(plan: Plan, seed: int) -> dict:
    taxa = plan.taxa
    images = [{"image_id": image_id, "file_name": file_name, "license": plan.inst_licenses[inst]}
              for image_id, file_name, _, inst, _ in plan.train]
    annotations = [{"image_id": image_id, "category_id": taxa[t_i].category_id,
                    "genus_id": taxa[t_i].genus_id, "institution_id": inst}
                   for image_id, _, t_i, inst, _ in plan.train]
    # Annotations are listed in another order than images: readers must join on image_id.
    order = np.random.default_rng([seed, 7002]).permutation(len(annotations))
    categories = [{"category_id": t.category_id, "scientificName": f"{t.genus} {t.epithet}",
                   "authors": t.authors, "family": t.family, "genus": t.genus,
                   "species": t.epithet} for t in taxa]
    return {"annotations": [annotations[i] for i in order], "categories": categories,
            "genera": plan.genera, "images": images, "distances": plan.distances,
            "institutions": plan.institutions, "license": list(LICENSES)}


def _write_csv(path: Path, rows: list[tuple]) -> None:
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("Id", "Predicted"))
        writer.writerows(rows)


def _write_metadata(out: Path, plan: Plan, seed: int) -> None:
    """Write the CSVs and JSON files; train_metadata.json, the dataset's marker, goes last."""
    test_rows = [(image_id, plan.taxa[t_i].category_id) for image_id, _, t_i, _, _ in plan.test]
    _write_csv(out / "test_solution.csv", test_rows)
    default = plan.taxa[0].category_id
    _write_csv(out / "sample_submission.csv", [(image_id, default) for image_id, _ in test_rows])
    write_json(out / "test_metadata.json",
               [{"image_id": image_id, "file_name": file_name, "license": plan.inst_licenses[inst]}
                for image_id, file_name, _, inst, _ in plan.test])
    write_json(out / "train_metadata.json", _train_metadata(plan, seed))


def _check_arguments(species, seed, long_edge, min_images, max_images, test_per_species, institutions,
                     difficulty) -> None:
    problems = []
    if seed < 0:
        problems.append(f"--seed must be >= 0 (got {seed})")
    if species < 1:
        problems.append(f"--species must be at least 1 (got {species})")
    if long_edge < 32:
        problems.append(f"--long-edge must be at least 32 pixels (got {long_edge})")
    if not 1 <= min_images <= max_images <= 999:
        problems.append(f"need 1 <= --min-images <= --max-images <= 999 "
                        f"(got {min_images} and {max_images})")
    if test_per_species < 0:
        problems.append(f"--test-per-species must be >= 0 (got {test_per_species})")
    if institutions < 1:
        problems.append(f"--institutions must be at least 1 (got {institutions})")
    if not difficulty >= 0:
        problems.append(f"--difficulty must be >= 0 (got {difficulty})")
    if problems:
        raise HerbensError("synth: " + "; ".join(problems))


def synthesize(out_dir, species: int = 40, seed: int = 0, long_edge: int = 1000,
               min_images: int = 3, max_images: int = 80, test_per_species: int = 2,
               institutions: int = 5, progress: bool = True, difficulty: float = 1.0,
               workers: int | None = None) -> dict:
    """Write a synthetic herbarium dataset in the Kaggle Herbarium 2022 layout.

    Images are written first and the metadata last (atomically), and metadata left by an
    earlier run in ``out_dir`` is removed before drawing, so an interrupted run never leaves
    metadata that parses.

    Args:
        out_dir: dataset directory (created if needed).
        species: number of species (category_ids are not contiguous).
        seed: the same seed gives byte-identical metadata and images.
        long_edge: image height in pixels (portrait sheets, width = 0.68 x height).
        min_images: training images of the rarest species.
        max_images: training images of the most common species (a power law in between).
        test_per_species: test images per species.
        institutions: number of contributing herbaria (paper, colour cast, layout).
        progress: show progress (herbens.core.progress).
        difficulty: scale of intra-class variation and noise (0 = none, 1 = default).
        workers: drawing processes; default ``os.cpu_count()``. The output does not depend on it.

    Returns:
        A summary: ``out_dir``, ``species``, ``genera``, ``families``, ``institutions``,
        ``train_images``, ``test_images``, ``min_per_species``, ``max_per_species``,
        ``long_edge``, ``seed``, ``seconds``.

    Raises:
        HerbensError: an argument is out of range or the directory cannot be written.
    """
    _check_arguments(species, seed, long_edge, min_images, max_images, test_per_species, institutions,
                     difficulty)
    started = time.perf_counter()
    out = Path(out_dir)
    plan = make_plan(species, seed, min_images, max_images, test_per_species, institutions)
    for name in METADATA_FILES:
        (out / name).unlink(missing_ok=True)
    jobs = []
    for folder, records in (("train_images", plan.train), ("test_images", plan.test)):
        for _, file_name, t_i, inst, key in records:
            jobs.append((str(out / folder / file_name), plan.taxa[t_i].look,
                         plan.inst_looks[inst], key, int(long_edge), float(difficulty)))
    try:
        out.mkdir(parents=True, exist_ok=True)
        _render_all(jobs, workers or os.cpu_count() or 1, progress)
    except OSError as exc:
        raise HerbensError(f"synth: cannot write images under {out}: {exc}") from exc
    _write_metadata(out, plan, seed)
    counts = np.bincount([t_i for _, _, t_i, _, _ in plan.train], minlength=len(plan.taxa))
    return {
        "out_dir": str(out), "species": len(plan.taxa), "genera": len(plan.genera),
        "families": len({t.family for t in plan.taxa}), "institutions": institutions,
        "train_images": len(plan.train), "test_images": len(plan.test),
        "min_per_species": int(counts.min()), "max_per_species": int(counts.max()),
        "long_edge": int(long_edge), "seed": int(seed),
        "seconds": round(time.perf_counter() - started, 2),
    }
