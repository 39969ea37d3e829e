"""The stores kernel: one description, one reader check, kind and ids digest on every store,
stores of the previous version still read; the views record from ``herbens infer --tta`` to a
bundle's predictions, and the ensembler's refusal of val/test stores made with other views."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from herbens.data.taxonomy import Taxonomy
from herbens.core.errors import HerbensError
from herbens.stores.description import LogitsDescription, view_names_of_rows
from herbens.stores.embeddings import embeddings_dir, read_embeddings, write_embeddings
from herbens.stores.kernel import ids_digest
from herbens.stores.logits import logits_dir, read_logits, write_logits
from herbens.stores.targets import open_targets_writer, read_targets, targets_dir

TAX = Taxonomy([1, 2, 3, 4], list("ABCD"), ["g0", "g1"], ["f0"], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1])
OTHER = Taxonomy([1, 2, 3], list("ABC"), ["g0"], ["f0"], [0, 0, 0], [0, 0, 0], [1, 1, 1])
IDS = ["a", "b", "c"]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return (x - np.log(np.exp(x).sum(axis=1, keepdims=True))).astype(np.float32)


def write_logits_store(run):
    rng = np.random.default_rng(0)
    write_logits(run, "val", IDS, {"species": rng.normal(size=(3, 2, 4)), "genus": rng.normal(size=(3, 2))},
                 {"taxonomy_hash": TAX.hash, "model": "m", "views": ["center", "hflip"], "tta_space": "prob",
                  "generation": 7}, labels=np.array([0, 3, -1]), keep_views=True)
    return logits_dir(run, "val"), lambda taxonomy=None: read_logits(run, "val", taxonomy=taxonomy)


def write_embeddings_store(run):
    write_embeddings(run, "val", IDS, np.random.default_rng(1).normal(size=(3, 5)),
                     {"taxonomy_hash": TAX.hash, "views": ["center"]}, labels=np.array([0, 1, 2]), num_species=4)
    return embeddings_dir(run, "val"), lambda taxonomy=None: read_embeddings(run, "val", taxonomy=taxonomy)


def write_targets_store(run):
    with open_targets_writer(run, "val", IDS, {"species": (2, 4)}, {"taxonomy_hash": TAX.hash, "teacher": "t"}) as w:
        w.write("species", 0, _log_softmax(np.random.default_rng(2).normal(size=(3, 4))))
    return targets_dir(run, "val"), lambda taxonomy=None: read_targets(run, "val", taxonomy=taxonomy)


STORES = {"logits": write_logits_store, "embeddings": write_embeddings_store, "sparse_targets": write_targets_store}


def _meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def _edit_meta(path: Path, drop=(), **changes) -> None:
    meta = {k: v for k, v in _meta(path).items() if k not in drop}
    (path / "meta.json").write_text(json.dumps({**meta, **changes}))


@pytest.mark.parametrize("kind", STORES)
def test_every_store_records_its_kind_and_ids_digest(tmp_path, kind):
    path, read = STORES[kind](tmp_path)
    meta = _meta(path)
    assert meta["kind"] == kind and meta["format_version"] == 1 and meta["split"] == "val"
    assert meta["ids"] == {"count": 3, "sha256": ids_digest(IDS)}
    assert read().meta == meta
    # Same count, other ids: the digest catches it, for every kind.
    (path / "image_ids.json").write_text(json.dumps(["a", "b", "z"]))
    with pytest.raises(HerbensError, match=r"split 'val': its image ids are not those it was written for"):
        read()


@pytest.mark.parametrize("kind", STORES)
def test_one_reader_check_refuses_another_taxonomy(tmp_path, kind):
    _, read = STORES[kind](tmp_path)
    read(taxonomy=TAX)  # the taxonomy it was written for
    with pytest.raises(HerbensError, match=rf"split 'val': \w+ were written for taxonomy {TAX.hash} but the "
                                           rf"run's taxonomy.json is {OTHER.hash}"):
        read(taxonomy=OTHER)


def test_class_counts_are_checked_against_the_taxonomy(tmp_path):
    class SameHash:  # a taxonomy whose hash matches but with one genus fewer
        hash = TAX.hash

        def num_classes(self, level):
            return {"species": 4, "genus": 1, "family": 1}[level]

    write_logits_store(tmp_path)
    with pytest.raises(HerbensError, match="genus has 2 classes; the taxonomy has 1 genus classes"):
        read_logits(tmp_path, "val", taxonomy=SameHash())


def test_description_round_trip(tmp_path):
    path, read = write_logits_store(tmp_path)
    split = read()
    described = split.description
    assert isinstance(described, LogitsDescription)
    assert described.views == ["center", "hflip"] and described.view_rows == ["center", "hflip"]
    assert described.tta_space == "prob" and described.labels and described.model == "m"
    assert described.levels == {"species": [3, 4], "genus": [3, 2]}
    assert described.view_levels == {"species": [3, 2, 4]}  # genus was given without views
    assert described.model_extra == {"generation": 7}  # a caller's own key is kept
    assert described.as_meta() == _meta(path)
    assert LogitsDescription.model_validate(described.as_meta()) == described


def test_a_bad_description_field_is_named(tmp_path):
    path, read = write_logits_store(tmp_path)
    _edit_meta(path, tta_space="median")
    with pytest.raises(HerbensError, match=r"meta.json: tta_space: "):
        read()
    _edit_meta(path, tta_space="prob", format_version=2)
    with pytest.raises(HerbensError, match=r"meta.json format_version 2 is not supported .*rewrite the store"):
        read()


def test_views_of_rows_reference():
    assert view_names_of_rows(["tencrop/0", "tencrop/1", "center", "rrc3/0", "rrc3/1", "rrc3/2"]) == \
        ["tencrop", "center", "rrc3"]
    assert view_names_of_rows(["center", "hflip"]) == ["center", "hflip"]
    assert view_names_of_rows([]) == []


@pytest.mark.parametrize("kind", STORES)
def test_store_of_the_previous_version_still_reads(tmp_path, kind):
    path, read = STORES[kind](tmp_path)
    _edit_meta(path, drop=("kind", "ids"))  # what the previous version wrote for most stores
    store = read(taxonomy=TAX)
    assert "kind" not in store.meta and store.description.kind == kind and store.description.ids is None


def test_previous_per_view_logits_name_their_views_again(tmp_path):
    rng = np.random.default_rng(3)
    write_logits(tmp_path, "test", IDS, {"species": rng.normal(size=(3, 10, 4))},
                 {"taxonomy_hash": TAX.hash, "views": ["tencrop"], "view_rows": [f"tencrop/{i}" for i in range(10)]},
                 keep_views=True)
    path = logits_dir(tmp_path, "test")
    # The previous version recorded the per-view row names as `views`, and no view_rows.
    _edit_meta(path, drop=("view_rows", "kind"), views=[f"tencrop/{i}" for i in range(10)])
    described = read_logits(tmp_path, "test").description
    assert described.views == ["tencrop"] and described.view_rows == [f"tencrop/{i}" for i in range(10)]


# ----------------------------------------------------------------------------------------
# The views record
# ----------------------------------------------------------------------------------------
def _run_with_views(root: Path, val: tuple, test: tuple) -> Path:
    rng = np.random.default_rng(4)
    run = root / "r"
    TAX.save(run / "taxonomy.json")
    for split, (views, space), labels in (("val", val, rng.integers(0, 4, 8)), ("test", test, None)):
        write_logits(run, split, [f"{split}{i}" for i in range(8)], {"species": rng.normal(size=(8, 4))},
                     {"taxonomy_hash": TAX.hash, "views": views, "tta_space": space}, labels=labels)
    return run


def test_the_ensembler_refuses_val_and_test_made_with_other_views(tmp_path):
    from herbens.ensemble.stores import load_runs

    run = _run_with_views(tmp_path / "a", (["center", "hflip"], "logit"), (["tencrop"], "logit"))
    with pytest.raises(HerbensError, match=r"run '.*r': its val logits were made with views center hflip "
                                           r"\(tta_space logit\) but its test logits with tencrop \(tta_space logit\)"):
        load_runs([run])
    run = _run_with_views(tmp_path / "b", (["center"], "logit"), (["center"], "prob"))
    with pytest.raises(HerbensError, match=r"tta_space logit\) but its test logits with center \(tta_space prob\)"):
        load_runs([run])
    run = _run_with_views(tmp_path / "c", (["tencrop"], "prob"), (["tencrop"], "prob"))
    assert [r.name for r in load_runs([run])] == ["r"]


@pytest.mark.slow
def test_a_bundle_predicts_with_the_views_its_ensemble_was_fitted_on(tiny_herbarium, tiny_run, tmp_path):
    from herbens.cli.main import main
    from herbens.config import load_run_config
    from herbens.data.metadata import load_test_metadata

    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    recipe_views = load_run_config(run)["infer"]["tta"]
    assert recipe_views != ["tencrop"]  # the recipe keeps its own views: the defect needs that
    assert main(["infer", str(run), "--data-root", str(tiny_herbarium), "--tta", "tencrop"]) == 0
    for split in ("val", "test"):
        assert read_logits(run, split).description.views == ["tencrop"]
    submission = tmp_path / "out" / "ens.csv"
    assert main(["ensemble", str(run), "-o", str(submission), "--top-k", "3", "--no-progress"]) == 0
    bundle = tmp_path / "bundle"
    assert main(["export", str(submission.with_suffix(".json")), "-o", str(bundle)]) == 0
    member = next((bundle / "members").iterdir())
    assert json.loads((member / "data_config.json").read_text())["views"] == ["tencrop"]
    pred_csv = tmp_path / "pred.csv"
    assert main(["predict", str(bundle), str(tiny_herbarium / "test_images"), "-o", str(pred_csv),
                 "--top-k", "3", "--no-progress"]) == 0
    test = load_test_metadata(tiny_herbarium / "test_metadata.json")
    images = Path(test.attrs["images_dir"])
    ids = {str(images / f): i for i, f in zip(test["image_id"], test["file_name"])}
    pred = pd.read_csv(pred_csv)
    pred["Id"] = pred["path"].map(ids)
    expected = pd.read_csv(submission, dtype={"Id": str}).merge(
        pd.read_csv(submission.with_suffix(".topk.csv"), dtype={"Id": str}), on="Id")
    both = pred.merge(expected, on="Id")
    assert len(both) == len(ids) == len(pred)
    assert (both["category_id_1"] == both["Predicted"]).all()
    # Within float16 rounding of these probabilities (about 0.2 * 2**-10 at the top): the tiny
    # model is nearly uniform, so the recipe's centre + hflip views are off by ~1.6e-3, not less.
    for j in (1, 2, 3):
        np.testing.assert_allclose(both[f"probability_{j}"], both[f"Score_{j}"], atol=2.5e-4)


def test_export_takes_the_views_of_the_validation_logits(tmp_path):
    from herbens.bundle.export import fitted_views

    cfg = {"infer": {"tta": ["center", "hflip"], "tta_space": "logit"}}
    run = _run_with_views(tmp_path / "a", (["tencrop"], "prob"), (["tencrop"], "prob"))
    notes = []
    assert fitted_views(run, cfg, TAX, notes.append) == (["tencrop"], "prob") and not notes
    # A store that does not record them (an older one): the recipe's, and the log says so.
    run = _run_with_views(tmp_path / "b", (["tencrop"], None), (["tencrop"], None))
    assert fitted_views(run, cfg, TAX, notes.append) == (["tencrop"], "logit")
    assert "do not record their views and tta_space" in notes[0]
