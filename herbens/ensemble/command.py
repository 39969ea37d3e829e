"""``herbens ensemble``: combine runs' stored logits into a validated Kaggle submission."""

from __future__ import annotations

import argparse

from herbens.ensemble.pipeline import ensemble_runs
from herbens.errors import HerbensError

__all__ = ["ensemble_runs", "register", "run"]


def _weights(text: str):
    if text in ("equal", "fit"):
        return text
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected equal, fit or W1,W2,... (numbers), not {text!r}") from None


def _tau(text: str):
    if text in ("fit", "none"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fit, none or a number, not {text!r}") from None


def _hierarchy(text: str):
    if text in ("fit", "none"):
        return text
    try:
        alpha, beta = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fit, none or ALPHA,BETA, not {text!r}") from None
    return alpha, beta


def register(subparsers) -> None:
    """Add the ``ensemble`` verb."""
    p = subparsers.add_parser(
        "ensemble", help="combine runs' logits into a Kaggle submission (fitted on validation)",
        description="Stream runs' stored logits in row chunks, aligned by image id; fit run weights, "
                    "temperatures per run and level, the inverse-frequency tau and the hierarchy "
                    "alpha/beta on the labelled validation logits, cross-fitted over 5 stratified "
                    "folds (each kept only if it raises OUT-OF-FOLD macro-F1 consistently); write a "
                    "validated Kaggle CSV (Id,Predicted) and a JSON summary beside it.")
    p.add_argument("runs", nargs="+", help="run directories (runs/NAME), e.g. runs/*")
    p.add_argument("-o", "--output", default="submissions/ensemble.csv",
                   help="submission CSV; NAME.json (and NAME.topk.csv) go beside it (default: %(default)s)")
    p.add_argument("--weights", type=_weights, default="fit", metavar="equal|fit|W1,W2,...",
                   help="run weights: fitted on validation (default), equal, or one number per run")
    p.add_argument("--weight-objective", choices=("f1", "nll"), default="f1",
                   help="what fitted weights optimise on validation: macro-F1 (coordinate search) or "
                        "log-loss (scipy L-BFGS) (default: %(default)s)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="fit a temperature per run and level by validation NLL (default: on)")
    p.add_argument("--tau", type=_tau, default="fit", metavar="fit|none|VALUE",
                   help="inverse-frequency adjustment scores - tau*log(prior), prior from the first "
                        "run's training split (default: fit, on [-1, 3])")
    p.add_argument("--hierarchy", type=_hierarchy, default="fit", metavar="fit|none|ALPHA,BETA",
                   help="add alpha*log p(genus) + beta*log p(family) of each species (default: fit)")
    p.add_argument("--mode", choices=("mean", "vote"), default="mean",
                   help="average scores (default) or sum per-run/per-view top-k votes")
    p.add_argument("--vote-k", type=int, default=5, help="classes each run/view votes for (default: 5)")
    p.add_argument("--space", choices=("logit", "prob"), default="logit",
                   help="average logits (default) or probabilities")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="also write NAME.topk.csv with the K best category_ids and scores per image")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per streamed chunk; memory ~ a few x runs x rows x classes x 4 bytes "
                        "(default: about 16 MB of float32 per run, 270 rows at 15,501 classes)")
    p.add_argument("--align-by-category", action="store_true",
                   help="match class columns by category_id when runs' taxonomies differ "
                        "(keeps the species all runs share)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args) -> int:
    """Handler of ``herbens ensemble``; returns the exit status."""
    if (args.chunk_rows is not None and args.chunk_rows < 1) or args.vote_k < 1 or args.top_k < 0:
        raise HerbensError("--chunk-rows and --vote-k must be >= 1, --top-k >= 0")
    ensemble_runs(args.runs, args.output, weights=args.weights, weight_objective=args.weight_objective,
                  calibrate=args.calibrate, tau=args.tau, hierarchy=args.hierarchy, mode=args.mode,
                  vote_k=args.vote_k, space=args.space, top_k=args.top_k, chunk_rows=args.chunk_rows,
                  align_by_category=args.align_by_category, progress=not args.quiet)
    return 0
