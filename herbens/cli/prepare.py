"""``herbens prepare DATA_DIR --size N``: a resized copy of a dataset, written once."""

from __future__ import annotations

import argparse
import sys

from herbens.data.prepare import prepare_dataset


def run(args: argparse.Namespace) -> int:
    summary = prepare_dataset(args.data_dir, args.size, args.out, args.workers, args.quality,
                              progress=args.progress)
    problems = summary["unreadable"] + summary["missing"]
    if problems:
        print(f"warning: {summary['unreadable']} unreadable image(s) copied unchanged and "
              f"{summary['missing']} missing; `herbens check {args.data_dir}` lists them",
              file=sys.stderr)
    print(f"wrote {summary['images']} images into {summary['out']} in {summary['seconds']} s "
          f"({summary['resized']} resized, {summary['copied']} copied as already small, "
          f"{summary['done']} already done); train on it with data.root={summary['out']}")
    return 0
