"""Training entry point: ``accelerate launch herbens/train.py RECIPE.yaml key=value ...``.

The same as ``herbens train RECIPE.yaml key=value ...`` (:mod:`herbens.cli.train`); also
``main(argv)`` from Python.
"""

import os
import sys

if __name__ == "__main__":
    # Run as a script, Python puts herbens/ itself first on sys.path, where our module names
    # (data, metrics, evaluate, ...) would shadow real top-level packages. Use the repo root.
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path[0] = os.path.dirname(_here)

from herbens.cli.main import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """``herbens train`` with ``argv`` (default: sys.argv[1:]); returns the exit status."""
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
