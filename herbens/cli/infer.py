"""``herbens infer RUN``: rewrite a finished run's stores (logits, embeddings)."""

from __future__ import annotations

import argparse

from herbens.core.errors import HerbensError
from herbens.infer.run import infer_run


def run(args: argparse.Namespace) -> int:
    if args.no_logits and not args.embeddings:
        raise HerbensError("--no-logits leaves nothing to do without --embeddings")
    written = infer_run(args.run, [] if args.no_logits else args.split, args.tta, args.data_root, args.batch_size,
                        args.tta_space, args.keep_views, embeddings=args.embeddings, bad_images=args.bad_images,
                        progress=args.progress)
    print("wrote " + ", ".join(f"{folder} ({rows} rows)" for folder, rows in written), flush=True)
    return 0
