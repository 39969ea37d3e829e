"""``herbens enrol BUNDLE --images DIR --name "Genus species"``: add a species from a few images."""

from __future__ import annotations

import argparse

from herbens.bundle.enrolment import enrol_species


def run(args: argparse.Namespace) -> int:
    enrol_species(args.bundle, args.images, args.name, authors=args.authors, genus=args.genus, family=args.family,
                  category_id=args.category_id, device=args.device, batch_size=args.batch_size)
    return 0
