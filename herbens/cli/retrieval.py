"""``herbens retrieval RUN --method prototype|knn``: a retrieval classifier written as a pseudo-run."""

from __future__ import annotations

import argparse

from herbens.core.errors import HerbensError
from herbens.retrieval.command import retrieval_run


def run(args: argparse.Namespace) -> int:
    if args.sub_centers < 1 or (args.k is not None and args.k < 1) or args.chunk_rows < 1:
        raise HerbensError("--sub-centers, --k and --chunk-rows must be >= 1")
    if args.temperature is not None and not args.temperature > 0:
        raise HerbensError("--temperature must be > 0")
    output = args.output or f"{str(args.run).rstrip('/')}_{args.method}"
    retrieval_run(args.run, output, args.method, sub_centers=args.sub_centers, k=args.k,
                  temperature=args.temperature, backend=args.backend, seed=args.seed,
                  chunk_rows=args.chunk_rows, progress=args.progress)
    return 0
