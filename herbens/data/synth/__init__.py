"""Synthetic herbarium sheets in the exact Kaggle Herbarium 2022 layout (the embedded demo data).

``synthesize`` writes ``train_metadata.json``, ``test_metadata.json``, ``train_images/``,
``test_images/``, ``sample_submission.csv`` and ``test_solution.csv`` (the true category_id of
every test image, which Kaggle keeps secret), so that the whole pipeline can be run and scored
without the real 150 GB dataset.

The sheets imitate NAFlora-1M: portrait cream paper, one pressed plant, a blurred grey label
(NAFlora obfuscates label text), a barcode, a colour chart and a scale bar, and a colour cast and
paper tone per institution. The taxonomy is visible as nested cues, so that mistakes fall where
they fall on real data (between related species before unrelated ones):

- family: leaf arrangement (alternate, opposite, whorled, rosette), venation (pinnate, palmate,
  parallel, arcuate), base hue, stem colour and thickness, flower colour;
- genus: leaf shape (ovate, lanceolate, cordate, palmately lobed, linear, round, ...), its
  width/length ratio, leaf length, petiole and leaf angle, a small hue offset;
- species: leaf size, tint (hue/value shift), number of nodes (leaf count) and margin
  (teeth or lobe count). Species of one genus differ in at least one of size, tint and leaf
  count (the cues that survive downscaling to ~112 px) while there are few enough of them.

``difficulty`` (default 1.0) scales every source of intra-class variation: pose (rotation,
offset, scale, stem curvature), per-leaf size/angle/width jitter, colour jitter, the chance of
a missing or flipped leaf or of one node more or less, and the amplitude of the per-image noise.
0 gives near-identical images per species; 2 roughly doubles the variation.

Every image is drawn with its own ``numpy.random.Generator`` seeded from (seed, split, species,
index), so the output is byte-identical for a seed whatever the order or the number of worker
processes.

The package, by job: ``names`` (Latin names), ``looks`` (taxon and herbarium cues), ``plan``
(every id, count and file name from the seed), ``leaves`` (leaf geometry), ``canvas`` and
``plant`` (drawing), ``sheet`` (one sheet), ``write`` (the dataset on disk and the verb).
"""

from __future__ import annotations

from herbens.data.synth.plan import make_plan
from herbens.data.synth.sheet import SHEET_ASPECT, render_sheet
from herbens.data.synth.write import METADATA_FILES, synthesize

__all__ = ["METADATA_FILES", "SHEET_ASPECT", "make_plan", "render_sheet", "synthesize"]
