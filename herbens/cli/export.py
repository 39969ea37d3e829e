"""``herbens export SOURCE -o BUNDLE``: a self-contained bundle from a run or an ensemble."""

from __future__ import annotations

import argparse

from herbens.bundle.export import export_bundle
from herbens.core.errors import HerbensError


def run(args: argparse.Namespace) -> int:
    if args.folds < 2:
        raise HerbensError("--folds must be at least 2")
    export_bundle(args.source, args.output, onnx=args.onnx, target_precision=args.target_precision,
                  ood_score=args.ood_score, ood_keep=args.ood_keep, folds=args.folds,
                  overwrite=args.overwrite)
    return 0
