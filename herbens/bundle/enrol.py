"""``herbens enrol BUNDLE --images DIR --name "Genus species"``: add a species from a few images.

No retraining: each member embeds the images, and the species becomes a prototype beside the
trained classes (:mod:`herbens.bundle.enrolment` describes the design and the files).
"""

from __future__ import annotations

import argparse

from herbens.bundle.enrolment import enrol_species


def register(subparsers) -> None:
    """Add the ``enrol`` verb."""
    p = subparsers.add_parser(
        "enrol", help="add a species to a bundle from one or a few images (a prototype, no retraining)",
        description="Enrol a new species into an exported bundle: every member embeds the images and "
                    "the species gets a prototype beside the trained classes; herbens predict then names "
                    "it. Needs a bundle exported from runs with embeddings (herbens infer RUN --embeddings).")
    p.add_argument("bundle", help="bundle folder written by herbens export (rewritten atomically)")
    p.add_argument("--images", required=True, help="image, folder (recursive) or .csv/.txt list of the species")
    p.add_argument("--name", required=True, help='scientific name, e.g. "Carex nova"')
    p.add_argument("--authors", default="", help="authors of the name")
    p.add_argument("--genus", default=None, help="genus (default: first word of --name); existing genera keep their family")
    p.add_argument("--family", default=None, help="family (needed when the genus is new to the bundle)")
    p.add_argument("--category-id", type=int, default=None,
                   help="category_id to give it (default: one more than the bundle's largest)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handler of ``herbens enrol``."""
    enrol_species(args.bundle, args.images, args.name, authors=args.authors, genus=args.genus, family=args.family,
                  category_id=args.category_id, device=args.device, batch_size=args.batch_size)
    return 0
