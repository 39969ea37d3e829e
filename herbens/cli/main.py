"""The ``herbens`` console script: one subcommand per verb.

Each verb lives in the module that does the work; that module exposes
``register(subparsers)``, which adds its sub-parser and sets ``handler`` (a function taking the
parsed arguments and returning an exit status). This file only dispatches and turns
HerbensError into a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from herbens import __version__
from herbens.errors import HerbensError

# Imported lazily so that `herbens --help` stays fast and one verb's heavy imports do not
# slow the others.
COMMAND_MODULES = {
    "demo": "herbens.demo",
    "synth": "herbens.data.synth",
    "check": "herbens.data.check",
    "prepare": "herbens.data.prepare",
    "train": "herbens.train",
    "infer": "herbens.infer.run",
    "ensemble": "herbens.ensemble.command",
    "retrieval": "herbens.retrieval.command",
    "evaluate": "herbens.analysis.evaluate",
    "report": "herbens.analysis.report",
    "recipes": "herbens.config.catalogue",
    "export": "herbens.bundle.export",
    "predict": "herbens.bundle.predict",
    "enrol": "herbens.bundle.enrol",
    "unenrol": "herbens.bundle.unenrol",
    "openset": "herbens.analysis.openset",
    "teach": "herbens.bundle.teach",
    "zeroshot": "herbens.analysis.zeroshot",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="herbens", description="Train, ensemble and evaluate herbarium specimen classifiers.")
    parser.add_argument("--version", action="version", version=f"herbens {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = [a for a in argv if not a.startswith("-")][:1]
    for name, module_name in COMMAND_MODULES.items():
        if wanted and wanted[0] != name:
            # Only the chosen verb's module is imported; the rest are listed by name.
            subparsers.add_parser(name, add_help=False)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``herbens`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0 if not argv else 2
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(handler(args) or 0)
    except HerbensError as exc:
        print(f"herbens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("herbens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
