"""Training entry point: ``accelerate launch herbens/train.py RECIPE.yaml key=value ...``.

Also ``herbens train RECIPE.yaml key=value ...`` and ``main(argv)`` from Python.
"""

import os
import sys

if __name__ == "__main__":
    # Run as a script, Python puts herbens/ itself first on sys.path, where our module names
    # (data, metrics, evaluate, ...) would shadow real top-level packages. Use the repo root.
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path[0] = os.path.dirname(_here)

import argparse  # noqa: E402

from herbens.errors import HerbensError  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file or shipped recipe name (see `herbens recipes`)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides, e.g. data.root=/data/h22 train.epochs=2")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its latest checkpoint (exact mid-epoch resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run directory of the same name and start again")
    parser.add_argument("--check", action="store_true",
                        help="only run the preflight (build everything, try every end-of-run step on a few "
                             "images, check files and disk space) and print what the run would do")


def run(args: argparse.Namespace) -> int:
    from herbens.config import load_config
    from herbens.training.fit import check, fit

    cfg = load_config(args.recipe, args.overrides)
    if args.check:
        plan = check(cfg, resume=args.resume, overwrite=args.overwrite)
        print(plan.summary())
        print(f"preflight passed: {cfg['name']} is ready to train")
        return 0
    run_dir = fit(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"run written to {run_dir}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train one recipe (single process; use accelerate launch for several)",
        description="Train a recipe and write runs/<name>/ (config, taxonomy, split, checkpoints, "
                    "weights, logits, metrics).")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), train, and return the exit status."""
    parser = argparse.ArgumentParser(prog="herbens/train.py", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except HerbensError as exc:
        print(f"herbens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
