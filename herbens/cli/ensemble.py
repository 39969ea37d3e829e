"""``herbens ensemble RUN ...``: combine runs' stored logits into a validated Kaggle submission."""

from __future__ import annotations

import argparse

from herbens.ensemble.pipeline import ensemble_runs
from herbens.core.errors import HerbensError


def run(args: argparse.Namespace) -> int:
    if (args.chunk_rows is not None and args.chunk_rows < 1) or args.vote_k < 1 or args.top_k < 0:
        raise HerbensError("--chunk-rows and --vote-k must be >= 1, --top-k >= 0")
    ensemble_runs(args.runs, args.output, weights=args.weights, weight_objective=args.weight_objective,
                  calibrate=args.calibrate, tau=args.tau, hierarchy=args.hierarchy, mode=args.mode,
                  vote_k=args.vote_k, space=args.space, top_k=args.top_k, chunk_rows=args.chunk_rows,
                  align_by_category=args.align_by_category, progress=args.progress)
    return 0
