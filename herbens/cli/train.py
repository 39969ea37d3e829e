"""``herbens train RECIPE [key=value ...]``: train one recipe, or only run its preflight."""

from __future__ import annotations

import argparse

from herbens.config import load_config
from herbens.training.fit import check, fit


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.recipe, args.overrides)
    if args.check:
        plan = check(cfg, resume=args.resume, overwrite=args.overwrite)
        print(plan.summary())
        print(f"preflight passed: {cfg['name']} is ready to train")
        return 0
    run_dir = fit(cfg, resume=args.resume, overwrite=args.overwrite, progress=args.progress)
    print(f"run written to {run_dir}")
    return 0
