"""Parsers of the verbs that combine runs: ``ensemble`` and ``retrieval``."""

from __future__ import annotations

import argparse

from herbens.cli.options import add_progress, add_seed

# herbens.retrieval.command.METHODS, herbens.retrieval.search.BACKENDS
RETRIEVAL_METHODS = ("prototype", "knn")
SEARCH_BACKENDS = ("exact", "faiss")


def parse_weights(text: str):
    if text in ("equal", "fit"):
        return text
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected equal, fit or W1,W2,... (numbers), not {text!r}") from None


def parse_tau(text: str):
    if text in ("fit", "none"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fit, none or a number, not {text!r}") from None


def parse_hierarchy(text: str):
    if text in ("fit", "none"):
        return text
    try:
        alpha, beta = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fit, none or ALPHA,BETA, not {text!r}") from None
    return alpha, beta


def add_ensemble(subparsers) -> None:
    p = subparsers.add_parser(
        "ensemble", help="combine runs' logits into a Kaggle submission (fitted on validation)",
        description="Stream runs' stored logits in row chunks, aligned by image id; fit run weights, "
                    "temperatures per run and level, the inverse-frequency tau and the hierarchy "
                    "alpha/beta on the labelled validation logits, cross-fitted over 5 stratified "
                    "folds (each kept only if it raises OUT-OF-FOLD macro-F1 consistently); write a "
                    "validated Kaggle CSV (Id,Predicted) and a JSON summary beside it.")
    p.add_argument("runs", nargs="+", help="run directories (runs/NAME), e.g. runs/*")
    p.add_argument("-o", "--output", default="submissions/ensemble.csv",
                   help="submission CSV; NAME.json (and NAME.topk.csv) go beside it (default: %(default)s)")
    p.add_argument("--weights", type=parse_weights, default="fit", metavar="equal|fit|W1,W2,...",
                   help="run weights: fitted on validation (default), equal, or one number per run")
    p.add_argument("--weight-objective", choices=("f1", "nll"), default="f1",
                   help="what fitted weights optimise on validation: macro-F1 (coordinate search) or "
                        "log-loss (scipy L-BFGS) (default: %(default)s)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="fit a temperature per run and level by validation NLL (default: on)")
    p.add_argument("--tau", type=parse_tau, default="fit", metavar="fit|none|VALUE",
                   help="inverse-frequency adjustment scores - tau*log(prior), prior from the first "
                        "run's training split (default: fit, on [-1, 3])")
    p.add_argument("--hierarchy", type=parse_hierarchy, default="fit", metavar="fit|none|ALPHA,BETA",
                   help="add alpha*log p(genus) + beta*log p(family) of each species (default: fit)")
    p.add_argument("--mode", choices=("mean", "vote"), default="mean",
                   help="average scores (default) or sum per-run/per-view top-k votes")
    p.add_argument("--vote-k", type=int, default=5, help="classes each run/view votes for (default: 5)")
    p.add_argument("--space", choices=("logit", "prob"), default="logit",
                   help="average logits (default) or probabilities")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="also write NAME.topk.csv with the K best category_ids and scores per image")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="rows per streamed chunk; memory ~ a few x runs x rows x classes x 4 bytes "
                        "(default: about 16 MB of float32 per run, 270 rows at 15,501 classes)")
    p.add_argument("--align-by-category", action="store_true",
                   help="match class columns by category_id when runs' taxonomies differ "
                        "(keeps the species all runs share)")
    add_progress(p)


def add_retrieval(subparsers) -> None:
    p = subparsers.add_parser(
        "retrieval", help="prototype / kNN classifier on a run's embeddings, written as a pseudo-run",
        description="Build a prototype (class-mean, optionally k-means sub-centres) or k-nearest-neighbour "
                    "classifier on a run's training embeddings (herbens infer RUN --embeddings), fit its "
                    "temperature (and k) on the validation embeddings, and write per-level logits for val "
                    "and test into a pseudo-run folder that herbens ensemble accepts like any run.")
    p.add_argument("run", help="source run directory with embeddings/")
    p.add_argument("--method", choices=RETRIEVAL_METHODS, required=True)
    p.add_argument("-o", "--output", default=None, help="pseudo-run folder (default: RUN_<method>)")
    p.add_argument("--sub-centers", type=int, default=1,
                   help="prototype: k-means centres per species (default: 1, the mean)")
    p.add_argument("--k", type=int, default=None, help="knn: neighbours (default: fitted on validation)")
    p.add_argument("--temperature", type=float, default=None, help="default: fitted on validation")
    p.add_argument("--backend", choices=SEARCH_BACKENDS, default="exact",
                   help="knn search: exact (streaming numpy, bounded memory) or faiss (faiss-cpu)")
    add_seed(p, "k-means seed (sub-centres)")
    p.add_argument("--chunk-rows", type=int, default=2048, help="query rows per chunk")
    add_progress(p)


PARSERS = {"ensemble": add_ensemble, "retrieval": add_retrieval}
