"""Decided name, rank and reason of each prediction, and the page that shows them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd

from herbens.bundle import thresholds as th
from herbens.bundle.naming import decision_fields
from herbens.bundle.page import render_page, thresholds_line

THRESHOLDS = {"species": 0.6, "genus": 0.7, "family": 0.9, "ood": 0.3}


class _Taxonomy:
    def num_classes(self, level):
        return {"species": 2, "genus": 2, "family": 1}[level]


def _bundle(thresholds=THRESHOLDS):
    names = pd.DataFrame({"category_id": [10, 11, 99], "scientific_name": ["Carex alba", "Poa annua", "Carex nova"],
                          "authors": ["L.", "Scop.", "Smith"], "genus": ["Carex", "Poa", "Carex"],
                          "family": ["Cyperaceae", "Poaceae", "Cyperaceae"]})
    level_names = {"genus": ["Carex", "Poa"], "family": ["Cyperaceae"]}
    return SimpleNamespace(names=names, level_names=level_names.__getitem__, thresholds=thresholds, ood_score="msp",
                           record={"thresholds": {"target_precision": 0.95}}, taxonomy=_Taxonomy(),
                           path=SimpleNamespace(name="b"))


def _rows(species_conf, genus_conf, family_conf, ood):
    n = len(ood)
    return th.RowSummary({"species": np.array([0, 2, 1, 0][:n]), "genus": np.array([0, 0, 1, 0][:n]),
                          "family": np.zeros(n, np.int64)},
                         {"species": np.array(species_conf), "genus": np.array(genus_conf),
                          "family": np.array(family_conf)}, np.array(ood))


def test_each_decision_gets_its_name_rank_and_the_comparison_that_decided_it():
    rows = _rows([0.8, 0.5, 0.5, 0.5], [0.9, 0.75, 0.6, 0.6], [0.95, 0.95, 0.95, 0.5], [0.8, 0.8, 0.2, 0.8])
    decisions = th.decide(rows, THRESHOLDS)
    assert list(decisions) == ["species", "genus", "unknown", "unknown"]
    fields = decision_fields(_bundle(), rows, decisions)
    assert [f["name"] for f in fields] == ["Carex alba L.", "Carex", "unknown", "unknown"]
    assert [f["rank"] for f in fields] == list(decisions)
    assert fields[0]["reason"] == "species 80.0 % >= 60.0 % (95 % precision threshold)"
    assert fields[1]["reason"] == "genus 75.0 % >= 70.0 % (95 % precision threshold); species 50.0 % < 60.0 %"
    # Row 2 reaches family but its OOD score decides: the reason must say so, not name a level.
    assert fields[2]["reason"].startswith("OOD score msp 0.2 below its threshold 0.3")
    assert fields[3]["reason"] == ("no level reached its 95 % precision threshold "
                                   "(species 50.0 % < 60.0 %, genus 60.0 % < 70.0 %, family 50.0 % < 90.0 %)")


def test_family_decision_and_a_level_that_never_reaches_its_target():
    thresholds = {**THRESHOLDS, "species": float("inf")}
    rows = _rows([0.99], [0.5], [0.95], [0.9])
    (field,) = decision_fields(_bundle(thresholds), rows, th.decide(rows, thresholds))
    assert field["name"] == "Cyperaceae" and field["rank"] == "family"
    assert "species 99.0 % (no threshold: never reached the target precision)" in field["reason"]


def _item(name, rank, enrolled=False):
    return {"path": f"/x/{rank}.jpg", "name": name, "rank": rank, "reason": f"why {rank}", "decision": rank,
            "genus": "Carex", "genus_probability": 0.7, "family": "Cyperaceae", "family_probability": 0.9,
            "species": [{"category_id": 99, "scientific_name": "Carex nova", "authors": "Smith", "probability": 0.6,
                         "enrolled": enrolled}]}


def test_page_headlines_the_decided_name_labels_ids_marks_enrolled_and_counts_failures():
    items = [_item("Carex alba L.", "species", enrolled=True), _item("Cyperaceae", "family")]
    page = render_page(items, "t", [("/x/broken.jpg", "cannot decode image")], thresholds_line(_bundle()))
    assert '<h2 class="name"><i>Carex alba L.</i></h2>' in page and '<h2 class="name">Cyperaceae</h2>' in page
    assert "category_id 99" in page and page.count('class="enrolled"') == 1
    assert page.count('class="card"') == 3 and "/x/broken.jpg" in page and "cannot decode image" in page
    assert "3 files: 1 failed, 1 family, 1 species" in page
    assert "species 60.0 %, genus 70.0 %, family 90.0 %" in page and "below 0.3" in page
