"""``herbens openset RECIPE [key=value ...]``: hold species out, train, measure the unknown flag."""

from __future__ import annotations

import argparse
from pathlib import Path

from herbens.analysis.openset import run_open_set


def run(args: argparse.Namespace) -> int:
    report = run_open_set(args.recipe, args.overrides, args.workdir, share=args.holdout, seed=args.seed,
                          ood_score=args.ood_score, target=args.target_precision, keep=args.ood_keep,
                          progress=args.progress)
    print(f"wrote {Path(report['run']) / 'openset.json'}")
    return 0
