"""Parsers of the verbs that train or rebuild models: ``demo``, ``train``, ``infer``, ``recipes``,
``openset``, ``zeroshot``."""

from __future__ import annotations

import argparse
from pathlib import Path

from herbens.cli.options import add_batch_size, add_progress, add_recipe, add_seed

# herbens.demo.DEMO_RECIPES, herbens.infer.splits.INFER_BAD_IMAGES, herbens.bundle.thresholds.SOFTMAX_OOD_SCORES
DEMO_RECIPES = ("demo_balanced", "demo_arcface", "demo_seesaw")
INFER_BAD_IMAGES = ("fail", "prior")
SOFTMAX_OOD_SCORES = ("msp", "energy")


def add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="synthesise a herbarium, train, ensemble, score and report (CPU, minutes)",
        description="The whole pipeline on the embedded synthetic herbarium: writes data/demo/, "
                    "runs/demo_*/, submissions/demo.csv and reports/demo/ under --workdir.")
    p.add_argument("--workdir", default=".", type=Path, help="where data/, runs/, submissions/ go")
    p.add_argument("--recipes", nargs="+", default=list(DEMO_RECIPES), help="recipes to train")
    p.add_argument("--no-openset", dest="openset", action="store_false",
                   help="skip the open-set evaluation (one more training run)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every recipe")
    add_progress(p)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``train``'s arguments (also those of ``accelerate launch herbens/train.py``)."""
    add_recipe(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from its latest checkpoint (exact mid-epoch resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run directory of the same name and start again")
    parser.add_argument("--check", action="store_true",
                        help="only run the preflight (build everything, try every end-of-run step on a few "
                             "images, check files and disk space) and print what the run would do")
    add_progress(parser)


def add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train one recipe (single process; use accelerate launch for several)",
        description="Train a recipe and write runs/<name>/ (config, taxonomy, split, checkpoints, "
                    "weights, logits, metrics).")
    add_train_arguments(p)


def add_infer(subparsers) -> None:
    p = subparsers.add_parser(
        "infer", help="write a run's per-level logits for val/test images (with test-time views)",
        description="Predict a finished run's validation and/or test images and store the logits "
                    "in runs/NAME/logits/<split>/ for the ensembler.")
    p.add_argument("run", help="run directory, e.g. runs/convnext_b")
    p.add_argument("--split", nargs="+", default=["val", "test"], choices=["val", "test"])
    p.add_argument("--tta", nargs="+", default=None, metavar="VIEW",
                   help="test-time views to average (default: the recipe's infer.tta)")
    p.add_argument("--data-root", default=None, help="dataset folder, if it moved since training")
    add_batch_size(p, None)
    p.add_argument("--tta-space", choices=["logit", "prob"], default=None,
                   help="average views' logits or probabilities (default: the recipe's)")
    p.add_argument("--keep-views", action=argparse.BooleanOptionalAction, default=None,
                   help="also store per-view logits (default: the recipe's infer.keep_views)")
    p.add_argument("--embeddings", action="store_true",
                   help="also write L2-normalised embeddings of the train, val and test images to "
                        "runs/NAME/embeddings/<split>/ (for herbens retrieval)")
    p.add_argument("--no-logits", action="store_true", help="write no logits (with --embeddings)")
    p.add_argument("--bad-images", choices=INFER_BAD_IMAGES, default=None,
                   help="unreadable images: fail (write nothing, list them all) or prior (store the "
                        "training prior for them and record them as unreadable); default: the recipe's")
    add_progress(p)


def add_recipes(subparsers) -> None:
    p = subparsers.add_parser(
        "recipes", help="list the shipped recipes with model size, cost and losses",
        description="List the shipped recipes (recipes/*.yaml): backbone, input size, the resolution "
                    "the weights were pre-trained at (timm's pretrained config), parameters "
                    "(M), forward GFLOPs per image at the input size (multiply-add = 2 FLOPs), and "
                    "the loss of each level. Models are built on the meta device: no weights are "
                    "downloaded.")
    p.add_argument("names", nargs="*", help="only these recipes (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON (one object per recipe)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")


def add_openset(subparsers) -> None:
    p = subparsers.add_parser(
        "openset", help="hold species out, train, and measure how often they are flagged unknown",
        description="Train a recipe on all but a random share of species (through the normal "
                    "training code) and report AUROC of the OOD score and the flag rates of "
                    "held-out-species and known-species images; then, per OOD score of the run "
                    "exported as a bundle (knn when it has embeddings), the same for generated "
                    "far unknowns (blank, noise, text, colour chart, ruler, package samples).")
    add_recipe(p, "recipe name or YAML file", "data.root=...")
    p.add_argument("--holdout", type=float, default=0.1, help="share of species held out (default: %(default)s)")
    add_seed(p, "seeds the held-out species and the folds")
    p.add_argument("--workdir", type=Path, default=Path("openset"),
                   help="where the filtered metadata and the run go (default: %(default)s)")
    p.add_argument("--ood-score", choices=SOFTMAX_OOD_SCORES, default="msp")
    p.add_argument("--target-precision", type=float, default=0.95)
    p.add_argument("--ood-keep", type=float, default=0.95)
    add_progress(p)


def add_zeroshot(subparsers) -> None:
    p = subparsers.add_parser(
        "zeroshot", help="macro-F1 of a CLIP checkpoint's class-name heads on the validation split (no training)",
        description="Build a CLIP-family recipe's model with its text_heads.levels initialised from the class "
                    "names (CLIP zero-shot) and report each level's macro-F1 on the validation split.")
    add_recipe(p, "recipe YAML file, shipped recipe name, or a run folder (its config.yaml and split)",
               "data.root=/data/h22 model.pretrained_file=bioclip.bin")
    p.add_argument("--json", help="also write the scores to this JSON file")
    add_progress(p)


PARSERS = {"train": add_train, "infer": add_infer, "recipes": add_recipes, "openset": add_openset,
           "zeroshot": add_zeroshot, "demo": add_demo}
