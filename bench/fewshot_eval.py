"""Few-shot enrolment, evaluated honestly: 10 % of the species never reach training.

1. ``herbens synth``-style synthetic herbarium (:func:`herbens.data.synth.synthesize`);
2. a random 10 % of its species are held out: a filtered copy of the metadata (train images of
   the other species only; the held-out species' images become the test split, so the normal
   inference path embeds them) is written beside it, images linked, not copied;
3. a tiny run is trained on the rest through the normal training code (``herbens.train.main``,
   ``infer.embeddings=true`` so train/val/test embeddings land in the run);
4. known prototypes from the run's training embeddings, temperature fitted on its validation
   rows; each held-out species is enrolled from k = 1, 3, 5 of its images and scored
   (:func:`herbens.retrieval.fewshot.evaluate_fewshot`), averaged over several shot draws.

    python bench/fewshot_eval.py                       # ~3 minutes on 2 CPU cores (40 species)
    python bench/fewshot_eval.py --species 20 --epochs 2   # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from herbens.data.synth import synthesize  # noqa: E402
from herbens.data.taxonomy import Taxonomy  # noqa: E402
from herbens.core.errors import HerbensError  # noqa: E402
from herbens.core.fileio import read_json, write_json  # noqa: E402
from herbens.retrieval.fit import fit_prototypes  # noqa: E402
from herbens.retrieval.fewshot import evaluate_fewshot  # noqa: E402
from herbens.stores.embeddings import read_embeddings  # noqa: E402
from herbens.stores.logits import read_logits  # noqa: E402


def hold_out(full: Path, known: Path, fraction: float, seed: int) -> dict[str, int]:
    """Write ``known/``: metadata without the held-out species, their images as the test split.

    Returns:
        held-out image id (test image_id) -> held-out species rank 0..H-1.
    """
    meta = read_json(full / "train_metadata.json")
    ids = sorted(c["category_id"] for c in meta["categories"])
    rng = np.random.default_rng(seed)
    held = sorted(int(c) for c in rng.choice(ids, max(2, round(fraction * len(ids))), replace=False))
    category_of = {a["image_id"]: a["category_id"] for a in meta["annotations"]}
    kept = [im for im in meta["images"] if category_of[im["image_id"]] not in held]
    out = {**meta, "categories": [c for c in meta["categories"] if c["category_id"] not in held],
           "annotations": [a for a in meta["annotations"] if a["category_id"] not in held],
           "images": kept}
    known.mkdir(parents=True, exist_ok=True)
    write_json(known / "train_metadata.json", out)
    test = [{"image_id": str(i), "file_name": im["file_name"], "license": im.get("license", 0)}
            for i, im in enumerate(im for im in meta["images"] if category_of[im["image_id"]] in held)]
    held_rank = {c: r for r, c in enumerate(held)}
    ranks = [held_rank[category_of[im["image_id"]]] for im in meta["images"] if category_of[im["image_id"]] in held]
    write_json(known / "test_metadata.json", test)
    for link in ("train_images", "test_images"):  # held-out sheets are read from the original train images
        if not (known / link).exists():
            os.symlink((full / "train_images").resolve(), known / link)
    return {t["image_id"]: r for t, r in zip(test, ranks)}


def train_run(known: Path, runs: Path, args) -> Path:
    from herbens.train import main

    argv = [args.recipe, f"data.root={known}", f"output_dir={runs}", "name=fewshot", f"train.epochs={args.epochs}",
            "infer.embeddings=true", "data.num_workers=0", "--overwrite"]
    if main(argv) != 0:
        raise SystemExit("training failed")
    return runs / "fewshot"


def aligned(run: Path, split: str):
    """Head logits and embeddings of one split, checked to share the row order."""
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    logits = read_logits(run, split, taxonomy=taxonomy)
    emb = read_embeddings(run, split, taxonomy_hash=taxonomy.hash)
    if logits.image_ids != emb.image_ids:
        raise HerbensError(f"run '{run}': logits and embeddings of {split} are in different row orders")
    return np.asarray(logits.level("species"), np.float32), np.asarray(emb.matrix, np.float32), emb


def evaluate(run: Path, held: dict[str, int], draws: int, seed: int) -> dict:
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    train = read_embeddings(run, "train", taxonomy_hash=taxonomy.hash)
    val_head, val_emb, val = aligned(run, "val")
    fit = fit_prototypes(train, val, taxonomy, 1, None, seed)
    clf, proto_val_pred = fit.full, fit.predictions["in_sample"]  # argmax: the same for any temperature
    new_head, new_emb, test = aligned(run, "test")
    new_labels = np.array([held[i] for i in test.image_ids])
    from herbens.metrics import macro_f1

    rows = evaluate_fewshot(clf.prototypes, clf.temperature, val_head, val_emb, val.labels, new_head, new_emb,
                            new_labels, draws=draws, seed=seed)
    return {"known_species": taxonomy.num_classes("species"), "held_out_species": int(new_labels.max() + 1),
            "held_out_images": len(new_labels), "known_val_images": len(val), "temperature": clf.temperature,
            "known_f1_prototypes_only": macro_f1(val.labels, proto_val_pred), "draws": draws, "rows": rows}


def print_table(result: dict) -> None:
    print(f"\n{result['held_out_species']} held-out species ({result['held_out_images']} images), "
          f"{result['known_species']} known ({result['known_val_images']} validation images); "
          f"prototype temperature {result['temperature']:.4g}, head temperature "
          f"{result['rows'][0]['head_temperature']:.4g}; {result['draws']} shot draws")
    head = f"{'k':>2}  {'eval imgs':>9}  {'top-1':>6}  {'top-5':>6}  {'proto top-1':>11}  {'proto top-5':>11}  " \
           f"{'known F1 head':>13}  {'+ enrolled':>10}  {'change':>7}"
    print(head)
    for r in result["rows"]:
        print(f"{r['k']:>2}  {r['eval_images']:>9}  {r['enrolled_top1']:>6.3f}  {r['enrolled_top5']:>6.3f}  "
              f"{r['prototype_top1']:>11.3f}  {r['prototype_top5']:>11.3f}  {r['known_f1_head']:>13.3f}  "
              f"{r['known_f1_enrolled']:>10.3f}  {r['known_f1_change']:>+7.3f}")
    print(f"known species, prototypes alone (no enrolment): macro-F1 {result['known_f1_prototypes_only']:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--species", type=int, default=40)
    parser.add_argument("--min-images", type=int, default=10, help="per species (> 5: k = 5 shots plus evaluation)")
    parser.add_argument("--max-images", type=int, default=20)
    parser.add_argument("--long-edge", type=int, default=128)
    parser.add_argument("--recipe", default="demo_arcface")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of species held out")
    parser.add_argument("--draws", type=int, default=10, help="shot selections averaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep data and run here (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        full, known = work / "full", work / "known"
        synthesize(full, species=args.species, seed=args.seed, long_edge=args.long_edge, min_images=args.min_images,
                   max_images=args.max_images, test_per_species=1, difficulty=0.7, progress=False)
        held = hold_out(full, known, args.fraction, args.seed)
        run = train_run(known, work / "runs", args)
        result = evaluate(run, held, args.draws, args.seed)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["args"] = vars(args)
    print_table(result)
    print(f"({result['seconds']} s in all)")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
