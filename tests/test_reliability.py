"""No silent wrong output (issue 13): unreadable val/test images, stores that lost rows, the
shared reader check of every logits consumer, and leftovers of killed ensemble runs.

Each test reproduces one finding; README.md's reliability table names them.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from herbens.analysis.evaluate import evaluate_inputs
from herbens.cli.main import main
from herbens.data.dataset import BadImageWarning
from herbens.data.metadata import load_test_metadata
from herbens.data.taxonomy import Taxonomy
from herbens.ensemble.pipeline import ensemble_runs
from herbens.ensemble.submission import prepare_outputs
from herbens.core.errors import HerbensError
from herbens.infer.run import infer_run
from herbens.infer.splits import prior_logits
from herbens.stores.logits import LogitsRecordWarning, UnreadableRowsWarning, logits_dir, read_logits, write_logits

NO_FIT = dict(weights="equal", calibrate=False, tau="none", hierarchy="none", progress=False)


# ----- unreadable val/test images at inference ----------------------------------------------------

@pytest.fixture
def run_copy(tiny_run, tiny_herbarium, tmp_path):
    """A copy of the session's tiny run and of its dataset (the run's config points at the copy)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_herbarium, data)
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["root"] = str(data)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run, data


def truncate(path: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 3])


def test_unreadable_test_image_gets_the_prior_not_its_neighbours_scores(run_copy):
    run, data = run_copy
    test = load_test_metadata(data / "test_metadata.json")
    truncate(data / "test_images" / test["file_name"].iloc[3])
    bad_id = str(test["image_id"].iloc[3])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["bad_images"] = "skip"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))

    with pytest.warns(BadImageWarning, match=rf"split 'test': 1 unreadable image.*'{bad_id}'"):
        infer_run(run, ["test"])
    split = read_logits(run, "test")
    species = np.asarray(split.level("species"), dtype=np.float32)
    assert not np.array_equal(species[3], species[4])  # the neighbour's scores are not copied
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    np.testing.assert_array_equal(species[3], prior_logits(taxonomy, "species").astype(np.float16))
    assert split.meta["unreadable"] == {"ids": [bad_id], "fallback": "prior"}
    assert split.unreadable == [bad_id]

    out = run.parent.parent / "sub" / "s.csv"
    with pytest.warns(UnreadableRowsWarning, match=rf"1 image\(s\) were unreadable.*'{bad_id}'"):
        ensemble_runs([run], out, **NO_FIT, log=lambda _: None)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["unreadable"] == {"tiny": {"test": [bad_id]}}


def test_unreadable_image_under_fail_policy_writes_nothing(run_copy):
    run, data = run_copy
    before = read_logits(run, "test", mmap=False).level("species").copy()
    test = load_test_metadata(data / "test_metadata.json")
    truncate(data / "test_images" / test["file_name"].iloc[0])
    truncate(data / "test_images" / test["file_name"].iloc[5])
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["bad_images"] = "skip"
    cfg["infer"]["bad_images"] = "fail"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    ids = [repr(str(test["image_id"].iloc[k])) for k in (0, 5)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)  # the dataset's per-file warnings
        with pytest.raises(HerbensError, match=rf"split 'test': 2 image\(s\) cannot be decoded "
                                               rf"\({ids[0]}, {ids[1]}\); no logits written"):
            infer_run(run, ["test"])
    np.testing.assert_array_equal(read_logits(run, "test").level("species"), before)  # old store kept


def test_infer_command_line_bad_images_option(run_copy, capsys):
    run, data = run_copy
    test = load_test_metadata(data / "test_metadata.json")
    truncate(data / "test_images" / test["file_name"].iloc[2])
    bad_id = str(test["image_id"].iloc[2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        assert main(["infer", str(run), "--split", "test", "--bad-images", "fail"]) == 2
        assert f"1 image(s) cannot be decoded ('{bad_id}')" in capsys.readouterr().err
        assert main(["infer", str(run), "--split", "test", "--bad-images", "prior"]) == 0
    assert read_logits(run, "test").unreadable == [bad_id]


def test_unreadable_validation_image_is_left_out_of_the_score(run_copy):
    run, data = run_copy
    val_ids = pd.read_csv(run / "split.csv", dtype=str)["image_id"].tolist()
    train = json.loads((data / "train_metadata.json").read_text())
    file_of = {str(im["image_id"]): im["file_name"] for im in train["images"]}
    truncate(data / "train_images" / file_of[val_ids[0]])
    with pytest.warns(BadImageWarning):
        infer_run(run, ["val"], bad_images="prior")
    split = read_logits(run, "val")
    assert split.unreadable == [val_ids[0]]
    with pytest.warns(UnreadableRowsWarning, match=val_ids[0]):
        (result,) = evaluate_inputs([run])
    assert result["metrics"]["n_images"] == len(val_ids) - 1
    assert result["unreadable"] == [val_ids[0]]


def write_with_unreadable(run: Path, split: str, n: int, bad_rows: list[int], labels=None) -> None:
    from herbens.stores.logits import open_logits_writer

    tax = make_taxonomy()
    scores = np.random.default_rng(1).normal(size=(n, 4))
    with open_logits_writer(run, split, [f"{split}{i}" for i in range(n)], {"species": 4},
                            {"taxonomy_hash": tax.hash}, labels=labels) as writer:
        writer.write("species", 0, scores)
        writer.mark_unreadable(bad_rows, "prior")


def test_ensemble_leaves_unreadable_validation_rows_out_of_fitting(tmp_path):
    run = write_run(tmp_path / "runs", "r", n_val=20)
    write_with_unreadable(run, "val", 20, [4, 9], labels=np.arange(20) % 4)
    with pytest.warns(UnreadableRowsWarning, match=r"split 'val': 2 image\(s\).*'val4', 'val9'"):
        summary = ensemble_runs([run], tmp_path / "s.csv", weights="equal", calibrate=True, tau="none",
                                hierarchy="none", progress=False, log=lambda _: None)
    assert summary["val"]["images"] == 18
    assert summary["unreadable"] == {"r": {"val": ["val4", "val9"]}}


def test_unreadable_record_is_checked_on_write_and_read(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(HerbensError, match="unknown fallback 'zeros'"):
        from herbens.stores.logits import open_logits_writer

        with open_logits_writer(run, "test", ["a"], {"species": 4}, {"taxonomy_hash": "0" * 16}) as writer:
            writer.write("species", 0, np.zeros((1, 4)))
            writer.mark_unreadable([0], "zeros")
    write_with_unreadable(run, "test", 3, [1])
    path = logits_dir(run, "test") / "meta.json"
    meta = json.loads(path.read_text())
    assert meta["unreadable"] == {"ids": ["test1"], "fallback": "prior"}
    meta["unreadable"]["ids"] = ["nowhere"]
    path.write_text(json.dumps(meta))
    with pytest.raises(HerbensError, match="unreadable ids that are not .*'nowhere'"):
        read_logits(run, "test")


def test_training_with_an_unreadable_validation_image_scores_without_it(tiny_herbarium, tmp_path):
    from conftest import TINY_OVERRIDES, train_tiny
    from herbens.config import load_config
    from herbens.data.run_data import load_run_data

    data = tmp_path / "data"
    shutil.copytree(tiny_herbarium, data)
    cfg = load_config("demo_ce", [f"data.root={data}", *TINY_OVERRIDES])
    split = load_run_data(cfg, tmp_path / "none", reuse_split=False)
    truncate(split.images_dir / split.val["file_name"].iloc[0])
    bad_id = str(split.val["image_id"].iloc[0])
    with pytest.warns(UnreadableRowsWarning, match=rf"split 'val': 1 image\(s\).*'{bad_id}'"):
        assert train_tiny(data, tmp_path, extra=["name=v", "train.epochs=1", "data.bad_images=skip"]) == 0
    run = tmp_path / "v"
    val = read_logits(run, "val")
    assert val.unreadable == [bad_id]
    keep = ~val.unreadable_mask()
    accuracy = (np.asarray(val.level("species")).argmax(axis=1) == val.labels)[keep].mean()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["species_accuracy"] == pytest.approx(accuracy)
    # Here the fallback row's prior guess happens to be right: counting it would change the score.
    counted = (np.asarray(val.level("species")).argmax(axis=1) == val.labels).mean()
    assert metrics["val"]["species_accuracy"] != pytest.approx(counted)


# ----- submission completeness --------------------------------------------------------------------

def make_taxonomy() -> Taxonomy:
    return Taxonomy([100, 103, 106, 109], ["A a", "A b", "B c", "B d"], ["A", "B"], ["F"],
                    [0, 0, 1, 1], [0, 0, 0, 0], [5, 3, 2, 7])


def write_run(root: Path, name: str, n_test: int = 120, n_val: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    tax = make_taxonomy()
    run = root / name
    tax.save(run / "taxonomy.json")
    for split, n in (("test", n_test), ("val", n_val)):
        labels = rng.integers(0, 4, n) if split == "val" else None
        write_logits(run, split, [f"{split}{i}" for i in range(n)], {"species": rng.normal(size=(n, 4))},
                     {"taxonomy_hash": tax.hash}, labels=labels)
    return run


def drop_last_row(run: Path, split: str) -> None:
    """What a store that lost a row looks like: consistent files, one image short."""
    path = logits_dir(run, split)
    meta = json.loads((path / "meta.json").read_text())
    ids = json.loads((path / "image_ids.json").read_text())[:-1]
    for level in meta["levels"]:
        np.save(path / f"{level}.npy", np.load(path / f"{level}.npy")[:-1])
        meta["levels"][level][0] = len(ids)
    if meta["labels"]:
        np.save(path / "labels.npy", np.load(path / "labels.npy")[:-1])
    meta["num_rows"] = len(ids)
    (path / "image_ids.json").write_text(json.dumps(ids))
    (path / "meta.json").write_text(json.dumps(meta))


def test_store_that_lost_a_test_row_is_refused(tmp_path):
    run = write_run(tmp_path / "runs", "lossy")
    drop_last_row(run, "test")
    with pytest.raises(HerbensError, match=r"run '.*lossy', split 'test': holds 119 of the 120 images"):
        ensemble_runs([run], tmp_path / "s.csv", **NO_FIT, log=lambda _: None)
    assert not (tmp_path / "s.csv").exists()


def test_store_whose_ids_changed_is_refused(tmp_path):
    run = write_run(tmp_path / "runs", "renamed")
    path = logits_dir(run, "test")
    ids = json.loads((path / "image_ids.json").read_text())
    (path / "image_ids.json").write_text(json.dumps(["other"] + ids[1:]))
    with pytest.raises(HerbensError, match=r"split 'test': its image ids are not those it was written for"):
        ensemble_runs([run], tmp_path / "s.csv", **NO_FIT, log=lambda _: None)


def test_store_without_an_id_record_is_warned_about(tmp_path):
    run = write_run(tmp_path / "runs", "old")
    path = logits_dir(run, "test")
    meta = json.loads((path / "meta.json").read_text())
    del meta["ids"]
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(LogitsRecordWarning, match="without a record of the test ids"):
        ensemble_runs([run], tmp_path / "s.csv", **NO_FIT, log=lambda _: None)


# ----- one reader check for every consumer --------------------------------------------------------

def _nonfinite(run):
    path = logits_dir(run, "val")
    arr = np.load(path / "species.npy")
    arr[2, 1] = np.nan
    np.save(path / "species.npy", arr)


def _shape(run):
    path = logits_dir(run, "val")
    np.save(path / "species.npy", np.load(path / "species.npy")[:, :3])


def _duplicate_ids(run):
    path = logits_dir(run, "val")
    ids = json.loads((path / "image_ids.json").read_text())
    (path / "image_ids.json").write_text(json.dumps([ids[1]] + ids[1:]))


def _taxonomy_hash(run):
    path = logits_dir(run, "val")
    meta = json.loads((path / "meta.json").read_text())
    meta["taxonomy_hash"] = "f" * 16
    (path / "meta.json").write_text(json.dumps(meta))


def _missing_file(run):
    (logits_dir(run, "val") / "species.npy").unlink()


def _truncated(run):
    path = logits_dir(run, "val") / "species.npy"
    path.write_bytes(path.read_bytes()[:-10])


FAULTS = {
    "nonfinite": (_nonfinite, r"species logits are not finite in 1 row\(s\) .*first at image id 'val2'"),
    "shape": (_shape, r"species.npy has shape \(20, 3\) but meta.json says \(20, 4\)"),
    "duplicate_ids": (_duplicate_ids, r"duplicate image ids in image_ids.json: 'val1'"),
    "taxonomy_hash": (_taxonomy_hash, r"logits were written for taxonomy f{16} but the run's taxonomy.json"),
    "missing_file": (_missing_file, r"species.npy is missing"),
    "truncated": (_truncated, r"species.npy is \d+ bytes, expected \d+ \(truncated\)"),
}


def _by_ensemble(run, tmp_path):
    ensemble_runs([run], tmp_path / "s.csv", weights="equal", calibrate=True, tau="none", hierarchy="none",
                  progress=False, log=lambda _: None)


def _by_evaluate(run, tmp_path):
    evaluate_inputs([run])


@pytest.mark.parametrize("reader", [_by_ensemble, _by_evaluate], ids=["ensemble", "evaluate"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_reader_refuses_a_damaged_store_naming_run_and_split(tmp_path, fault, reader):
    run = write_run(tmp_path / "runs", "damaged")
    damage, message = FAULTS[fault]
    damage(run)
    with pytest.raises(HerbensError, match=r"run '.*damaged', split 'val': .*" + message):
        reader(run, tmp_path)


def test_evaluate_refuses_non_finite_validation_rows_on_the_command_line(tmp_path, capsys):
    run = write_run(tmp_path / "runs", "nan")
    _nonfinite(run)
    assert main(["evaluate", str(run)]) == 2
    assert "not finite" in capsys.readouterr().err


# ----- leftovers and overwrites -------------------------------------------------------------------

def test_ensemble_cleans_stale_temporaries_and_reports_orphans_and_overwrites(tmp_path):
    run = write_run(tmp_path / "runs", "r")
    out = tmp_path / "sub" / "final.csv"
    out.parent.mkdir()
    dead_pid = 2 ** 22 + 7  # above the kernel's default pid_max: never a live process
    stale = out.parent / f".final.topk.csv.tmp-{dead_pid}"
    stale.write_text("half a top-k file")
    out.write_text("Id,Predicted\n")  # a CSV whose JSON sidecar was never written
    logged: list[str] = []
    ensemble_runs([run], out, **NO_FIT, log=logged.append)
    assert not stale.exists()
    assert any(f"removed {stale}" in line for line in logged)
    assert any("has no JSON sidecar final.json" in line for line in logged)
    assert any(f"overwriting existing {out}" in line for line in logged)
    logged.clear()
    ensemble_runs([run], out, **NO_FIT, log=logged.append)
    assert any(f"overwriting existing {out}" in line for line in logged)
    assert not any("sidecar" in line for line in logged)  # complete now
    assert sorted(p.name for p in out.parent.iterdir()) == ["final.csv", "final.json"]


def test_prepare_outputs_is_silent_for_fresh_outputs(tmp_path):
    assert prepare_outputs({"submission": tmp_path / "a.csv", "json": tmp_path / "a.json"}, log=print) == []


# ----- corrupt checkpoints and weights ------------------------------------------------------------

def test_resume_falls_back_past_a_truncated_checkpoint(tiny_herbarium, tmp_path):
    from conftest import train_tiny
    from herbens.training.checkpoint import DamagedCheckpointWarning, checkpoint_dir, latest_checkpoint

    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=ck", "train.epochs=2", "train.keep_checkpoints=2"]) == 0
    run = tmp_path / "ck"
    latest = latest_checkpoint(run)
    older = sorted(p.name for p in checkpoint_dir(run).iterdir() if p.is_dir())[0]
    assert older < latest.name
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(DamagedCheckpointWarning, match=rf"resuming from the older checkpoint {older}: "
                                                      rf".*{latest.name}: SafetensorError"):
        assert train_tiny(tiny_herbarium, tmp_path, extra=["name=ck", "train.epochs=3"], flags=["--resume"]) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # epoch 2 was trained again from epoch 1's state


def test_resume_with_no_loadable_checkpoint_names_each(tiny_herbarium, tmp_path, capsys):
    from conftest import train_tiny
    from herbens.training.checkpoint import checkpoint_dir

    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=ck1", "train.epochs=1", "train.keep_checkpoints=1"]) == 0
    (folder,) = [p for p in checkpoint_dir(tmp_path / "ck1").iterdir() if p.is_dir()]
    (folder / "model.safetensors").write_bytes(b"")
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=ck1", "train.epochs=2"], flags=["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint of {tmp_path / 'ck1'} can be loaded: {folder}:" in err


def test_infer_with_truncated_weights_names_the_file(run_copy, capsys):
    run, _ = run_copy
    weights = run / "model.pt"
    weights.write_bytes(weights.read_bytes()[:2000])
    assert main(["infer", str(run), "--split", "test"]) == 2
    message = capsys.readouterr().err
    assert f"herbens: error: cannot load weights {weights}:" in message


# ----- the README's reliability table names real tests --------------------------------------------

def test_readme_reliability_table_names_existing_tests():
    import ast
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", section)
    assert len(named) >= 20
    for file, test in named:
        tree = ast.parse((root / "tests" / file).read_text(encoding="utf-8"))
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        assert test in defined, f"README names {file}::{test}, which does not exist"
