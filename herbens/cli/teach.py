"""``herbens teach ENSEMBLE.json -o DIR``: an ensemble's soft targets for its training images."""

from __future__ import annotations

import argparse

from herbens.bundle.teach import write_teacher


def run(args: argparse.Namespace) -> int:
    write_teacher(args.source, args.output, k=args.k, batch_size=args.batch_size, device=args.device,
                  workers=args.workers, progress=args.progress)
    return 0
