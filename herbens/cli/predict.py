"""``herbens predict BUNDLE INPUT``: name specimen images with a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from herbens.bundle.predict import predict_command
from herbens.bundle.sheet_embeddings import embeddings_folder


def run(args: argparse.Namespace) -> int:
    """Exit status 1 when some image could not be read (the others are still written)."""
    html = None
    if args.html is not None:
        html = Path(args.output).with_suffix(".html") if args.html is True else Path(args.html)
    embeddings = None
    if args.embeddings is not None:
        embeddings = embeddings_folder(Path(args.output)) if args.embeddings is True else Path(args.embeddings)
    return predict_command(args.bundle, args.input, args.output, fmt=args.fmt, html=html, top_k=args.top_k,
                           batch_size=args.batch_size, device=args.device, workers=args.workers,
                           max_pixels=args.max_image_pixels, min_side=args.min_image_size, block=args.block,
                           page_cap=args.page_cap, embeddings=embeddings, progress=args.progress)
