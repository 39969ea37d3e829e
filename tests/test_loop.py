"""One prediction loop: ``herbens infer``, ``herbens predict``, enrolment, ``herbens teach`` and
the preflight all predict through :func:`herbens.infer.loop.predict_batches`, and a bundle
predicts a run's images exactly as ``herbens infer`` stores them for the same views."""

from __future__ import annotations

import inspect
import shutil
from collections import Counter

import numpy as np
import pytest
from accelerate import Accelerator

import herbens.infer.loop as loop
from herbens.bundle.enrolment import enrol_species
from herbens.bundle.export import export_bundle
from herbens.bundle.load import load_bundle
from herbens.bundle.predict import member_logits
from herbens.bundle.teach import write_teacher
from herbens.config import load_run_config
from herbens.data.metadata import load_test_metadata
from herbens.data.run_data import load_run_data
from herbens.data.transforms import model_data_config
from herbens.data.views import Views
from herbens.core.errors import HerbensError
from herbens.infer.run import infer_run, load_run_model
from herbens.stores.logits import read_logits
from herbens.training.preflight import check_prediction

VIEWS = ["center", "vflip@1.2"]  # not the recipe's default, so the views are really passed down


@pytest.fixture
def forwards(monkeypatch):
    """Counts the loop's forward passes, by the module that asked for them."""
    calls: Counter = Counter()
    real = loop._forward

    def counted(engine, model, images):
        callers = {frame.frame.f_globals.get("__name__") for frame in inspect.stack()[2:12]}
        calls.update(name for name in callers if name and name.startswith("herbens.") and name != "herbens.infer.loop")
        return real(engine, model, images)

    monkeypatch.setattr(loop, "_forward", counted)
    return calls


def _test_paths(root):
    test = load_test_metadata(root / "test_metadata.json")
    return [str(test.attrs["images_dir"] / f) for f in test["file_name"]], test["image_id"].astype(str).tolist()


def test_every_caller_predicts_through_the_one_loop(tiny_herbarium, tiny_run, tmp_path, forwards):
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    infer_run(run, ["test"], views=VIEWS, tta_space="prob", data_root=str(tiny_herbarium), embeddings=True)
    assert forwards["herbens.infer.splits"] > 0
    stored = read_logits(run, "test")
    assert stored.meta["views"] == VIEWS and stored.meta["tta_space"] == "prob"

    # herbens predict: a bundle of this run with the same views predicts what infer stored.
    export_bundle(run, tmp_path / "bundle", log=lambda _: None)
    bundle = load_bundle(tmp_path / "bundle")
    member = bundle.members[0]
    member.tta = Views.parse(VIEWS, "prob")
    paths, ids = _test_paths(tiny_herbarium)
    out, errors = member_logits(member, paths, {"species": bundle.taxonomy.num_classes("species")}, 4, "cpu", 0,
                                lambda _: None)
    assert not errors and forwards["herbens.bundle.predict"] > 0
    order = [stored.image_ids.index(i) for i in ids]
    np.testing.assert_array_equal(out["species"], np.asarray(stored.level("species"), np.float32)[order])

    shots = tmp_path / "shots.txt"
    shots.write_text("\n".join(paths[:2]) + "\n")
    enrol_species(tmp_path / "bundle", shots, "Novum loopum", family="Loopaceae", log=lambda _: None)
    assert forwards["herbens.bundle.enrolment"] > 0

    write_teacher(run, tmp_path / "teacher", k=2, progress=False, log=lambda _: None)
    assert forwards["herbens.bundle.teach"] > 0

    cfg = load_run_config(run)
    data = load_run_data({**cfg, "data": {**cfg["data"], "root": str(tiny_herbarium)}}, run, reuse_split=True)
    model = load_run_model(run, cfg, data.taxonomy)
    classes = {level: data.taxonomy.num_classes(level) for level in cfg["levels"]}
    check_prediction(model, cfg, data.val, data.images_dir, data.taxonomy, classes,
                     model_data_config(model.data_config, cfg["input"]), Accelerator(cpu=True), "val",
                     Views.parse(VIEWS))
    assert forwards["herbens.training.preflight"] > 0


def test_views_are_parsed_once_into_a_value():
    views = Views.parse(["center", "tencrop@1.2", "rrc3"], "prob")
    assert views.names == ["center", "tencrop@1.2", "rrc3"] and views.space == "prob"
    assert views.num_views == 1 + 10 + 3
    assert views.row_names[:3] == ["center", "tencrop@1.2/0", "tencrop@1.2/1"]
    assert views.items[1].scale == 1.2 and views.items[2].count == 3
    assert views.with_names(["hflip"]).space == "prob" and views.with_space("logit").names == views.names
    assert Views.of(views) is views
    with pytest.raises(HerbensError, match="tta_space"):
        Views.parse(["center"], "median")
    with pytest.raises(HerbensError, match="did you mean center"):
        Views.parse(["centre"])
