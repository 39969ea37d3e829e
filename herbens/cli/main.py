"""The ``herbens`` console script: one subcommand per verb.

Every verb's parser is built from :mod:`herbens.cli.parsers`, which imports neither torch nor the
library, so ``herbens --help`` and ``herbens VERB --help`` are fast. Only the chosen verb's
handler module, ``herbens.cli.<verb>`` (its ``run(args)`` returns the exit status), is imported,
at dispatch: that import is what loads the library. HerbensError becomes a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from herbens import __version__
from herbens.cli.parsers import PARSERS
from herbens.core.errors import HerbensError


def handler_module(verb: str) -> str:
    """The module whose ``run(args)`` handles ``verb``."""
    return f"herbens.cli.{verb}"


def load_handler(verb: str):
    """``run`` of the verb's handler module; importing it loads the library."""
    try:
        return importlib.import_module(handler_module(verb)).run
    except ModuleNotFoundError as exc:
        if (exc.name or "herbens").split(".")[0] == "herbens":
            raise
        raise HerbensError(f"herbens {verb} needs the Python package {exc.name!r}, which is not "
                           "installed here") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herbens", description="Train, ensemble and evaluate herbarium specimen classifiers.")
    parser.add_argument("--version", action="version", version=f"herbens {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSERS.values():
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``herbens`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0 if not argv else 2
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # each line reaches a log as it is printed
    try:
        return int(load_handler(args.command)(args) or 0)
    except HerbensError as exc:
        print(f"herbens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("herbens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
