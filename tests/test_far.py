"""Far unknowns: at least 50 generated images of 5 kinds, package samples, and the per-score report."""

from __future__ import annotations

import numpy as np
from PIL import Image

from herbens.analysis.far import FAR_KINDS, far_report, format_far, ood_scores, package_samples, write_far_images
from herbens.analysis.openset import auroc
from herbens.bundle.export import export_bundle
from herbens.bundle.load import load_bundle
from test_enrol import held_out  # noqa: F401 - the module-scoped run with embeddings


def test_far_images_are_varied_readable_and_seeded(tmp_path):
    written = write_far_images(tmp_path / "a", per_kind=10, seed=1)
    assert len(written) == 50 and {k for _, k in written} == set(FAR_KINDS)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p, _ in written]
    assert all(a.shape == (384, 256, 3) for a in arrays)
    assert len({a.tobytes() for a in arrays}) == 50  # no two alike
    again = write_far_images(tmp_path / "b", per_kind=10, seed=1)
    assert all(Image.open(p).tobytes() == Image.open(q).tobytes() for (p, _), (q, _) in zip(written, again))
    assert all(Image.open(p).size for p, _ in package_samples())  # whatever is installed opens


def test_far_report_per_score_matches_its_own_flags(held_out, tmp_path):  # noqa: F811
    run, bundle_dir, held, _ = held_out
    bundle = load_bundle(export_bundle(run, tmp_path / "b", log=lambda _: None))
    assert bundle.ood_banks is not None  # the run has embeddings: banks are stored for every score
    far = write_far_images(tmp_path / "far", per_kind=2, seed=0)
    known = held[:4]
    report = far_report(bundle, known, far)
    assert set(report["scores"]) == {"msp", "energy", "knn"} and report["far_images"] == 10
    thresholds = bundle.record["thresholds"]["ood_thresholds"]
    assert thresholds["knn"] == bundle.thresholds["ood"]  # the run has embeddings: the bundle decides with knn
    known_scores, _ = ood_scores(bundle, known)
    far_scores, _ = ood_scores(bundle, [p for p, _ in far])
    for score, entry in report["scores"].items():
        assert entry["auroc"] == auroc(known_scores[score], far_scores[score])
        assert entry["far_flagged"] == float((far_scores[score] < thresholds[score]).mean())
        assert entry["known_flagged"] == float((known_scores[score] < thresholds[score]).mean())
    assert "knn" in format_far(report)
