"""The demo end to end at a tiny budget: every stage runs and the scores are consistent."""

import pytest

from herbens.demo import DEMO_RECIPES, run_demo
from herbens.ensemble.submission import read_submission


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    scores = run_demo(tmp_path, overrides=["train.epochs=1", "input.size=[48,32]", "data.num_workers=0"])
    assert set(DEMO_RECIPES) | {"chance (uniform)", "ensemble"} <= set(scores)
    for name in (*DEMO_RECIPES, "ensemble"):
        assert 0.0 <= scores[name]["species_macro_f1"] <= 1.0
    submission = read_submission(tmp_path / "submissions" / "demo.csv")
    assert len(submission) == 120  # 30 species x 4 test images
    assert (tmp_path / "reports" / "demo" / "index.html").exists()
    # The ensemble exported into a bundle that named test sheets on its own.
    assert (tmp_path / "bundles" / "demo" / "manifest.json").exists()
    predicted = (tmp_path / "submissions" / "demo_bundle_predictions.csv").read_text().splitlines()
    assert len(predicted) == 1 + 6
    assert (tmp_path / "submissions" / "demo_bundle_predictions.html").exists()
    assert 0.0 <= scores["openset"]["auroc"] <= 1.0 and len(scores["openset"]["held_out_category_ids"]) == 3
