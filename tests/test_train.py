"""Training through ``main(argv)`` writes a complete, consistent run directory."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import train_tiny
from herbens.cli import main as cli_main
from herbens.data.metadata import load_test_metadata
from herbens.data.taxonomy import Taxonomy
from herbens.logits import read_logits


def test_run_directory_is_complete(tiny_run):
    for name in ("config.yaml", "taxonomy.json", "split.csv", "metrics.json", "history.jsonl",
                 "model.pt", "checkpoints/latest.json"):
        assert (tiny_run / name).exists(), name
    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["name"] == "tiny"
    history = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in history)
    assert {"val_species_macro_f1", "val_genus_macro_f1", "val_family_macro_f1"} <= set(history[-1])
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert 0.0 <= metrics["val"]["species_macro_f1"] <= 1.0
    assert metrics["cost"]["device_type"] == "cpu" and metrics["cost"]["device_count"] == 1
    assert metrics["cost"]["compile_time_s"] == 0.0  # model.compile is false


def test_logits_cover_every_val_and_test_image_once(tiny_run, tiny_herbarium):
    taxonomy = Taxonomy.load(tiny_run / "taxonomy.json")
    val_ids = pd.read_csv(tiny_run / "split.csv", dtype=str)["image_id"].tolist()
    val = read_logits(tiny_run, "val")
    assert sorted(val.image_ids) == sorted(val_ids)
    assert (np.asarray(val.labels) >= 0).all()
    test = read_logits(tiny_run, "test")
    expected = load_test_metadata(tiny_herbarium / "test_metadata.json")["image_id"].tolist()
    assert sorted(test.image_ids) == sorted(expected)
    for split in (val, test):
        assert split.meta["taxonomy_hash"] == taxonomy.hash
        for level in ("species", "genus", "family"):
            scores = np.asarray(split.level(level))
            assert scores.shape == (len(split.image_ids), taxonomy.num_classes(level))
            assert scores.dtype == np.float16 and np.isfinite(scores).all()


def test_split_is_reproducible_and_shared_by_runs_with_other_seeds(tiny_run, tiny_herbarium, tmp_path):
    # Runs to be ensembled differ in their training seed but must hold out the same images.
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=again", "train.epochs=1", "seed=5"]) == 0
    first = pd.read_csv(tiny_run / "split.csv", dtype=str)
    second = pd.read_csv(tmp_path / "again" / "split.csv", dtype=str)
    assert first.equals(second)


def test_existing_run_needs_resume_or_overwrite(tiny_herbarium, tmp_path, capsys):
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"]) == 0
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"], flags=["--overwrite"]) == 0


def test_resume_continues_to_more_epochs(tiny_herbarium, tmp_path):
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=1"]) == 0
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=r", "train.epochs=2"], flags=["--resume"]) == 0
    history = (tmp_path / "r" / "history.jsonl").read_text().splitlines()
    assert [json.loads(h)["epoch"] for h in history] == [1, 2]


def test_infer_rewrites_logits_with_other_views(tiny_run):
    before = np.asarray(read_logits(tiny_run, "val").level("species")).copy()
    assert cli_main(["infer", str(tiny_run), "--split", "val", "--tta", "center"]) == 0
    after = read_logits(tiny_run, "val")
    assert after.meta["views"] == ["center"]
    assert after.level("species").shape == before.shape
    assert not np.array_equal(np.asarray(after.level("species")), before)  # hflip no longer averaged in


def test_bad_recipe_key_is_a_clear_error(tiny_herbarium, tmp_path, capsys):
    assert train_tiny(tiny_herbarium, tmp_path, extra=["train.epochz=1"]) == 2
    assert "train.epochz" in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert train_tiny(tmp_path / "nowhere", tmp_path) == 2
    assert "nowhere" in capsys.readouterr().err


def test_final_weights_reload_into_the_model(tiny_run):
    from herbens.infer import load_run_model

    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    model = load_run_model(tiny_run, cfg, Taxonomy.load(tiny_run / "taxonomy.json"))
    out = model.eval()(torch.zeros(1, 3, 48, 32))
    assert out["species"].shape[-1] == Taxonomy.load(tiny_run / "taxonomy.json").num_classes("species")


def test_infer_keeps_per_view_logits_and_averages_them(tiny_run):
    assert cli_main(["infer", str(tiny_run), "--split", "val", "--tta", "center", "hflip", "fivecrop",
                     "--keep-views"]) == 0
    val = read_logits(tiny_run, "val")
    views = np.asarray(val.views("species"), dtype=np.float32)
    assert views.shape[1] == 7  # centre + flip + five crops, one row each
    mean = np.asarray(val.level("species"), dtype=np.float32)
    np.testing.assert_allclose(mean, views.mean(axis=1), atol=2e-2)


def test_infer_in_probability_space(tiny_run):
    assert cli_main(["infer", str(tiny_run), "--split", "test", "--tta", "center", "hflip",
                     "--tta-space", "prob", "--no-keep-views"]) == 0
    test = read_logits(tiny_run, "test")
    assert test.meta["tta_space"] == "prob"
    # log of averaged probabilities: each row's exponentials sum to one.
    sums = np.exp(np.asarray(test.level("species"), dtype=np.float64)).sum(axis=1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-2)
    # Kept views are the raw per-view logits; the stored average follows tta_space.
    assert cli_main(["infer", str(tiny_run), "--split", "test", "--tta", "center", "hflip",
                     "--tta-space", "prob", "--keep-views"]) == 0
    kept = read_logits(tiny_run, "test")
    views = torch.as_tensor(np.asarray(kept.views("species"), dtype=np.float32))
    expected = torch.logsumexp(torch.log_softmax(views, -1), dim=1) - np.log(2)
    np.testing.assert_allclose(np.asarray(kept.level("species"), dtype=np.float32), expected.numpy(), atol=2e-2)


def test_consecutive_runs_split_shuffled_gathers_into_contiguous_blocks():
    from herbens.infer import _consecutive_runs

    assert _consecutive_runs(np.array([0, 1, 2, 5, 6, 9])) == [(0, 3), (3, 5), (5, 6)]
    assert _consecutive_runs(np.array([4])) == [(0, 1)]


@pytest.mark.slow
def test_trunk_compiled_run_reports_compile_time_and_saves_plain_keys(tiny_run, tiny_herbarium, tmp_path, capsys):
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=c", "train.epochs=1", "model.compile=trunk",
                                                       "infer.splits=[val]"]) == 0
    assert "model.compile=trunk: 4 module(s) compiled in place" in capsys.readouterr().out  # test_resnet's blocks
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["cost"]["compile_time_s"] > 0
    weights = torch.load(tmp_path / "c" / "model.pt", weights_only=True)
    assert list(weights) == list(torch.load(tiny_run / "model.pt", weights_only=True))  # no "_orig_mod."
