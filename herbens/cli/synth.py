"""``herbens synth OUT``: write a synthetic herbarium in the Kaggle 2022 layout."""

from __future__ import annotations

import argparse

from herbens.data.synth import synthesize


def run(args: argparse.Namespace) -> int:
    summary = synthesize(
        args.out, species=args.species, seed=args.seed, long_edge=args.long_edge,
        min_images=args.min_images, max_images=args.max_images,
        test_per_species=args.test_per_species, institutions=args.institutions,
        progress=args.progress, difficulty=args.difficulty, workers=args.workers)
    print(f"wrote {summary['train_images']} training and {summary['test_images']} test images of "
          f"{summary['species']} species ({summary['genera']} genera, {summary['families']} "
          f"families; {summary['min_per_species']}-{summary['max_per_species']} images per "
          f"species) to {summary['out_dir']} in {summary['seconds']} s")
    return 0
