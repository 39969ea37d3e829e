"""Parsers of the bundle verbs: ``export``, ``predict``, ``enrol``, ``unenrol``, ``teach``."""

from __future__ import annotations

from herbens.cli.options import (add_batch_size, add_device, add_max_image_pixels, add_min_image_size, add_progress,
                                 add_workers)

# herbens.bundle.thresholds.OOD_SCORES and herbens.bundle.export.AUTO_OOD, herbens.bundle.teach.DEFAULT_K,
# herbens.bundle.merge.OUTPUT_FORMATS
# and DEFAULT_PAGE_CAP, herbens.bundle.collection.DEFAULT_BLOCK
OOD_SCORES = ("msp", "energy", "knn")
AUTO_OOD = "auto"
TEACHER_K = 64
OUTPUT_FORMATS = ("csv", "json", "parquet")
PAGE_CAP = 1000
BLOCK = 1024


def add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a self-contained model bundle from a run or an ensemble",
        description="Export a run directory or an ensemble's JSON record into a folder that alone "
                    "predicts: safetensors weights per member, data configs, recipes, taxonomy with "
                    "names and authors, fitted ensemble values, back-off and open-set thresholds "
                    "(fitted on validation), provenance, a model card and a manifest of file hashes.")
    p.add_argument("source", help="run directory, or the .json written by herbens ensemble")
    p.add_argument("-o", "--output", required=True, help="bundle folder, e.g. bundles/NAME")
    p.add_argument("--onnx", action="store_true", help="also write one ONNX graph per member (checked)")
    p.add_argument("--target-precision", type=float, default=0.95,
                   help="precision each back-off level must reach on validation (default: %(default)s)")
    p.add_argument("--ood-score", choices=(AUTO_OOD, *OOD_SCORES), default=AUTO_OOD,
                   help="open-set score: max softmax probability, energy, or knn (distance to the nearest "
                        "species' k-th nearest training embedding; needs the runs' embeddings); auto: knn "
                        "when every run has embeddings, else msp (default: %(default)s)")
    p.add_argument("--ood-keep", type=float, default=0.95,
                   help="share of known validation images the OOD threshold keeps (default: %(default)s)")
    p.add_argument("--folds", type=int, default=2, help="cross-fitting folds of the report (default: 2)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing bundle at -o (atomically; a folder that is not a bundle is "
                        "never replaced)")


def add_predict(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="name new specimen images with a bundle (species / genus / family / unknown)",
        description="Predict images (a file, a folder searched recursively, or a CSV/text list of "
                    "paths) with an exported bundle: top-k species with authors and probabilities, "
                    "the most probable genus and family, and a back-off decision.")
    p.add_argument("bundle", help="bundle folder written by herbens export")
    p.add_argument("input", help="image, folder, or .csv/.txt list of paths")
    p.add_argument("-o", "--output", default="predictions.csv", help="output file (default: %(default)s)")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default="csv", dest="fmt")
    p.add_argument("--html", nargs="?", const=True, default=None, metavar="PAGE",
                   help="also write a self-contained HTML page (default: OUTPUT with .html)")
    p.add_argument("--top-k", type=int, default=5)
    add_batch_size(p)
    add_workers(p)
    add_max_image_pixels(p, "refuse images with more pixels, from their header (decompression bombs)")
    add_min_image_size(p)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present, else cpu; "
                                                   "under torchrun / accelerate launch each process's own)")
    p.add_argument("--block", type=int, default=BLOCK,
                   help="paths per shard: the unit of resume and of work per process (default: %(default)s)")
    p.add_argument("--embeddings", nargs="?", const=True, default=None, metavar="DIR",
                   help="also write every member's embeddings of the predicted sheets, one embeddings store "
                        "per member (default DIR: OUTPUT with .embeddings), for enrolment, search or re-scoring")
    p.add_argument("--page-cap", type=int, default=PAGE_CAP, metavar="N",
                   help="most sheets on the HTML page: all unknown ones first, then a random sample "
                        "(default: %(default)s)")
    add_progress(p)


def add_enrol(subparsers) -> None:
    p = subparsers.add_parser(
        "enrol", help="add a species to a bundle from one or a few images (a prototype, no retraining)",
        description="Enrol a new species into an exported bundle: every member embeds the images and "
                    "the species gets a prototype beside the trained classes; herbens predict then names "
                    "it. Needs a bundle exported from runs with embeddings (herbens infer RUN --embeddings).")
    p.add_argument("bundle", help="bundle folder written by herbens export (rewritten atomically)")
    p.add_argument("--images", required=True, help="image, folder (recursive) or .csv/.txt list of the species")
    p.add_argument("--name", required=True, help='scientific name, e.g. "Carex nova"')
    p.add_argument("--authors", default="", help="authors of the name")
    p.add_argument("--genus", default=None,
                   help="genus (default: first word of --name); existing genera keep their family")
    p.add_argument("--family", default=None, help="family (needed when the genus is new to the bundle)")
    p.add_argument("--category-id", type=int, default=None,
                   help="category_id to give it (default: one more than the bundle's largest)")
    add_batch_size(p)
    add_device(p)


def add_unenrol(subparsers) -> None:
    p = subparsers.add_parser(
        "unenrol", help="remove an enrolled species from a bundle",
        description="Remove a species added by herbens enrol (trained species cannot be removed).")
    p.add_argument("bundle", help="bundle folder (rewritten atomically)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--name", default=None, help="scientific name of the enrolled species")
    which.add_argument("--category-id", type=int, default=None, help="its category_id")


def add_teach(subparsers) -> None:
    p = subparsers.add_parser(
        "teach", help="write an ensemble's sparse soft targets for its training images (distillation)",
        description="Export an ensemble (its JSON record) into OUT/bundle and write the top-K classes, "
                    "log-probabilities and remaining mass of every training image into OUT/targets/train/, "
                    "for recipes with distill.teacher=OUT.")
    p.add_argument("source", help="ensemble JSON written by herbens ensemble (or a run directory)")
    p.add_argument("-o", "--output", required=True, help="teacher folder, e.g. teachers/final_teacher")
    p.add_argument("--k", type=int, default=TEACHER_K, help="classes kept per image and level (default: %(default)s)")
    add_batch_size(p)
    add_workers(p)
    add_device(p)
    add_progress(p)


PARSERS = {"export": add_export, "predict": add_predict, "enrol": add_enrol, "unenrol": add_unenrol,
           "teach": add_teach}
