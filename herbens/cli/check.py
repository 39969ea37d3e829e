"""``herbens check DATA_DIR``: a dataset's metadata and image files; exit 1 on problems."""

from __future__ import annotations

import argparse

from herbens.data.check import check_dataset, format_report
from herbens.core.fileio import write_json


def run(args: argparse.Namespace) -> int:
    report = check_dataset(args.data_dir, workers=args.workers, progress=args.progress,
                           max_pixels=args.max_image_pixels)
    print(format_report(report, limit=args.show))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0 if report["ok"] else 1
