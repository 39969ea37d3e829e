"""``herbens evaluate INPUT ...``: score submissions or runs side by side."""

from __future__ import annotations

import argparse

from herbens.analysis.evaluate import evaluate_inputs
from herbens.analysis.tables import format_detail, format_summary
from herbens.core.errors import HerbensError
from herbens.core.fileio import write_json


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.min_images < 1:
        raise HerbensError("--top-k and --min-images must be at least 1")
    results = evaluate_inputs(args.inputs, args.solution, args.metadata, args.split,
                              args.top_k, args.min_images, args.exclude_split)
    print(format_summary([(r["name"], r["metrics"]) for r in results]))
    for r in results if args.detail else results[:1]:
        print()
        print(format_detail(r["name"], r["metrics"]))
    if args.json:
        write_json(args.json, {"inputs": results})
        print(f"\nwrote {args.json}")
    return 0
