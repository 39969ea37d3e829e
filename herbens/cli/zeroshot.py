"""``herbens zeroshot RECIPE|RUN``: macro-F1 of text-initialised heads, no training."""

from __future__ import annotations

import argparse
from pathlib import Path

from herbens.analysis.zeroshot import load_zeroshot_config, zero_shot_scores
from herbens.core.fileio import write_json


def run(args: argparse.Namespace) -> int:
    cfg = load_zeroshot_config(args.recipe, args.overrides)
    scores = zero_shot_scores(cfg, Path(args.recipe) if Path(args.recipe).is_dir() else None, args.progress)
    for level in scores["levels"]:
        print(f"zero-shot {level} macro-F1 {scores[f'val_{level}_macro_f1']:.4f}  "
              f"({scores['val_images']} validation images)")
    if args.json:
        write_json(Path(args.json), scores)
        print(f"wrote {args.json}")
    return 0
