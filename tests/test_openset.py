"""Open-set evaluation: AUROC against sklearn, held-out species really unseen, rates reported."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_OVERRIDES
from herbens.analysis.openset import auroc, held_out_species, run_open_set
from herbens.data.taxonomy import Taxonomy
from herbens.stores.logits import read_logits


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    pos, neg = np.round(rng.normal(1, 1, 40), 1), np.round(rng.normal(0, 1, 30), 1)
    expected = roc_auc_score(np.r_[np.ones(40), np.zeros(30)], np.r_[pos, neg])
    assert auroc(pos, neg) == pytest.approx(expected)


def test_held_out_species_share_and_bounds():
    ids = np.arange(100, 130)
    held = held_out_species(ids, 0.1, seed=1)
    assert len(held) == 3 and set(held) <= set(ids)
    assert (held_out_species(ids, 0.1, seed=1) == held).all()
    assert len(held_out_species(np.arange(3), 0.9, 0)) == 1  # two species stay known


@pytest.mark.slow
def test_open_set_trains_without_held_out_species(tiny_herbarium, tmp_path, capsys):
    overrides = [f"data.root={tiny_herbarium}", *TINY_OVERRIDES]
    report = run_open_set("demo_ce", overrides, tmp_path, share=0.34, seed=0)
    taxonomy = Taxonomy.load(tmp_path / "runs" / "demo_ce" / "taxonomy.json")
    assert not set(report["held_out_category_ids"]) & set(taxonomy.category_ids.tolist())
    assert taxonomy.num_classes("species") == 4 and report["held_out_images"] > 0
    assert 0 <= report["auroc"] <= 1
    assert report["known_images"] == len(read_logits(tmp_path / "runs" / "demo_ce", "val").image_ids)
    for key in ("known_ood_flagged", "held_out_ood_flagged", "known_decided_unknown", "held_out_decided_unknown"):
        assert 0 <= report[key] <= 1
    out = capsys.readouterr().out
    assert "AUROC" in out and "held-out species flagged" in out
    assert (tmp_path / "runs" / "demo_ce" / "openset.json").exists()


@pytest.mark.slow
def test_openset_command_reports_far_unknowns_beside_near_ones(tiny_herbarium, tmp_path, capsys):
    import json

    from herbens.analysis.far import FAR_KINDS, package_samples
    from herbens.cli.main import main

    overrides = [f"data.root={tiny_herbarium}", *TINY_OVERRIDES, "infer.embeddings=true"]
    assert main(["openset", "demo_ce", *overrides, "--holdout", "0.34", "--workdir", str(tmp_path),
                 "--no-progress"]) == 0
    run = tmp_path / "runs" / "demo_ce"
    report = json.loads((run / "openset.json").read_text())
    far = report["far"]
    assert 0 <= report["auroc"] <= 1  # the near report is still there
    assert far["known_images"] == len(read_logits(run, "val").image_ids)
    assert far["far_images"] == 10 * len(FAR_KINDS) + len(package_samples())
    assert set(far["scores"]) == {"msp", "energy", "knn"} and far["decision_score"] == "knn"
    for entry in far["scores"].values():
        assert 0 <= entry["auroc"] <= 1 and entry["threshold"] is not None
        assert 0 <= entry["far_flagged"] <= 1 and 0 <= entry["known_flagged"] <= 1
    out = capsys.readouterr().out
    assert "held-out species flagged" in out and "far unknowns" in out and "knn" in out
