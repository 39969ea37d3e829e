"""``herbens unenrol BUNDLE --name "Genus species"``: remove a species ``herbens enrol`` added."""

from __future__ import annotations

import argparse

from herbens.bundle.enrolment import unenrol_species


def run(args: argparse.Namespace) -> int:
    unenrol_species(args.bundle, name=args.name, category_id=args.category_id)
    return 0
