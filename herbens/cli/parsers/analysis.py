"""Parsers of the verbs that score and describe results: ``evaluate`` and ``report``."""

from __future__ import annotations

from pathlib import Path


def add_scoring_inputs(p, inputs_metavar: str, solution_help: str, metadata_help: str, exclude_help: str) -> None:
    """What ``evaluate`` and ``report`` both read: inputs, the solution and metadata, the split."""
    p.add_argument("inputs", nargs="+", type=Path, metavar=inputs_metavar)
    p.add_argument("--solution", type=Path, help=solution_help)
    p.add_argument("--metadata", type=Path, help=metadata_help)
    p.add_argument("--split", default="val", help="logits split of runs (default: val)")
    p.add_argument("--exclude-split", type=Path, metavar="SPLIT.csv", help=exclude_help)


def add_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score submissions or runs (macro-F1, per-family, head/tail, ANOVA)",
        description="Score Kaggle submission CSVs against a solution, or runs on their "
                    "validation logits, side by side.")
    add_scoring_inputs(p, "SUBMISSION.csv|RUN_DIR", "solution CSV (Id + true category_id)",
                       "train_metadata.json (taxonomy and counts)",
                       "a run's split.csv: left out of the metadata's training counts (submissions' "
                       "training-count bins and head/tail; runs use their own training-split counts)")
    p.add_argument("--top-k", type=int, default=10, help="rows in best/worst tables (default 10)")
    p.add_argument("--min-images", type=int, default=1,
                   help="leave groups with fewer test images out of best/worst tables")
    p.add_argument("--detail", action="store_true",
                   help="print per-family tables and ANOVA for every input, not only the first")
    p.add_argument("--json", type=Path, metavar="OUT", help="write every score to this JSON file")


def add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="figures and an HTML report for runs and submissions",
        description="Write PNG figures, index.html, report.json and summary.txt for runs "
                    "(validation logits, history.jsonl, metrics.json) and scored submissions.")
    add_scoring_inputs(p, "RUN_DIR|SUBMISSION.csv", "solution CSV, to score submissions",
                       "train_metadata.json, to score submissions",
                       "a run's split.csv, left out of the metadata's training counts for submissions")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder, e.g. reports/NAME/")
    p.add_argument("--top-k", type=int, default=10, help="families in best/worst figures (default 10)")


PARSERS = {"evaluate": add_evaluate, "report": add_report}
