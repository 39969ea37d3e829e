"""``herbens demo``: the whole pipeline on the embedded synthetic herbarium."""

from __future__ import annotations

import argparse

from herbens.demo import run_demo


def run(args: argparse.Namespace) -> int:
    run_demo(args.workdir, args.recipes, args.overrides, args.openset, args.progress)
    return 0
