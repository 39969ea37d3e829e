"""``herbens report INPUT ... -o DIR``: figures and an HTML report for runs and submissions."""

from __future__ import annotations

import argparse

from herbens.analysis.report import write_report
from herbens.core.errors import HerbensError


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise HerbensError("--top-k must be at least 1")
    index = write_report(args.inputs, args.out, args.solution, args.metadata, args.split, args.top_k,
                         args.exclude_split)
    print((index.parent / "summary.txt").read_text(encoding="utf-8"), end="")
    return 0
