"""Test helper: ``herbens predict`` over a list of any length, with the models' work done once.

    python tests/predict_standin.py IMAGES.txt predict BUNDLE LIST -o OUT ...

Everything of ``herbens predict`` runs as usual (the bundle loaded, LIST streamed in blocks,
records made by ``records``, Parquet shards, the merge, the page) except the members' forward
pass: the first block predicts the real images of IMAGES.txt once, and every block takes those
predictions, repeated, for its own paths. The forward pass holds one batch whatever the
number of images, so what is left is exactly what could grow with the list. Prints the
process's peak RSS (KiB) as ``RSS <n>`` on exit.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import herbens.bundle.predict as predict_module  # noqa: E402
from herbens.cli.main import main  # noqa: E402

REAL_IMAGES = Path(sys.argv[1]).read_text().splitlines()
real_predict_paths = predict_module.predict_paths
predicted = []


def standin_predict_paths(bundle, paths, **options):
    if not predicted:
        predicted.append(real_predict_paths(bundle, REAL_IMAGES, **options))
    real = predicted[0]
    rows = np.arange(len(paths)) % len(real.paths)  # the real predictions, repeated
    return dataclasses.replace(real, paths=list(paths), top_species=real.top_species[rows],
                               top_probs=real.top_probs[rows], rows=real.rows.take(rows),
                               decisions=real.decisions[rows], failures=[])


predict_module.predict_paths = standin_predict_paths
status = main(sys.argv[2:])
print("RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(status)
