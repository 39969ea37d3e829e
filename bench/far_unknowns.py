"""Far unknowns against known sheets, per OOD score, on an exported bundle.

    python bench/far_unknowns.py BUNDLE KNOWN [--per-kind 10] [--seed 0] [--workdir DIR] [--name far_unknowns]

KNOWN is a folder or list of known-species sheets (e.g. ``data/demo/test_images``). Draws
``--per-kind`` images of each far kind (blank, noise, text page, colour chart, ruler; seeded)
under ``--workdir`` and adds the sample images installed packages ship (matplotlib's, skimage's
when installed; no download); scores everything with the bundle and prints, per OOD score
(msp, energy, and knn when the bundle has embedding banks), the AUROC (known vs far) and the
share of far and known images flagged at the bundle's threshold for that score. Writes
``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from herbens.analysis.far import far_report, format_far, package_samples, write_far_images
from herbens.bundle.inputs import collect_inputs
from herbens.bundle.load import load_bundle

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("known", help="folder or list of known-species sheets")
    parser.add_argument("--per-kind", type=int, default=10, help="far images drawn per kind (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the far images go (default: a temp dir)")
    parser.add_argument("--name", default="far_unknowns", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.bundle)
    known, _ = collect_inputs(args.known)
    with tempfile.TemporaryDirectory() as tmp:
        far = write_far_images(args.workdir or Path(tmp), args.per_kind, args.seed) + package_samples()
        report = far_report(bundle, known, far)
    print(format_far(report))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
