"""``herbens unenrol BUNDLE --name "Genus species"``: remove a species ``herbens enrol`` added.

Unenrolling every enrolled species leaves the bundle byte for byte as ``herbens export`` wrote it.
"""

from __future__ import annotations

import argparse

from herbens.bundle.enrolment import unenrol_species


def register(subparsers) -> None:
    """Add the ``unenrol`` verb."""
    p = subparsers.add_parser(
        "unenrol", help="remove an enrolled species from a bundle",
        description="Remove a species added by herbens enrol (trained species cannot be removed).")
    p.add_argument("bundle", help="bundle folder (rewritten atomically)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", default=None, help="scientific name of the enrolled species")
    which.add_argument("--category-id", type=int, default=None, help="its category_id")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``herbens unenrol``."""
    unenrol_species(args.bundle, name=args.name, category_id=args.category_id)
    return 0
