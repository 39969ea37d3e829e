"""``herbens openset RECIPE [key=value ...]``: hold species out, train, measure the unknown flag on
the held-out species (near unknowns) and on generated non-specimen images (far unknowns)."""

from __future__ import annotations

import argparse
from pathlib import Path

from herbens.analysis.far import open_set_far
from herbens.analysis.openset import run_open_set


def run(args: argparse.Namespace) -> int:
    report = run_open_set(args.recipe, args.overrides, args.workdir, share=args.holdout, seed=args.seed,
                          ood_score=args.ood_score, target=args.target_precision, keep=args.ood_keep,
                          progress=args.progress)
    report = open_set_far(report, args.workdir, seed=args.seed)  # far unknowns beside the near ones
    print(f"wrote {Path(report['run']) / 'openset.json'}")
    return 0
