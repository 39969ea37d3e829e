"""Preflight: `herbens train --check`, and mistakes found before epoch 1 instead of after training."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES, train_tiny
from herbens.config import load_config
from herbens.data.run_data import load_run_data
from herbens.core.errors import HerbensError


@pytest.fixture
def herbarium_copy(tiny_herbarium, tmp_path) -> Path:
    root = tmp_path / "herbarium"
    shutil.copytree(tiny_herbarium, root)
    return root


def assert_refused_before_training(status: int, capsys, *expected: str) -> str:
    out, err = capsys.readouterr()
    assert status == 2
    assert "epoch 1/" not in out
    message = err.strip().splitlines()[-1]
    assert len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in message
    return message


@pytest.mark.parametrize("recipe", ["demo_ce", "demo_arcface", "demo_seesaw", "demo_balanced"])
def test_check_prints_the_plan_and_writes_nothing(tiny_herbarium, tmp_path, capsys, recipe):
    out = tmp_path / "runs"
    assert train_tiny(tiny_herbarium, out, recipe=recipe, flags=["--check"]) == 0
    printed = capsys.readouterr().out
    for text in ("images: train", "optimizer updates per epoch", "global batch: 8", "peak lr after scaling",
                 "checkpoint", "logits val", "preflight passed"):
        assert text in printed
    assert "epoch 1/" not in printed
    assert not out.exists()  # --check leaves the file system as it found it


def test_missing_test_metadata_is_found_before_training(herbarium_copy, tmp_path, capsys):
    (herbarium_copy / "test_metadata.json").unlink()
    status = train_tiny(herbarium_copy, tmp_path / "runs")
    assert_refused_before_training(status, capsys, "test_metadata.json", "infer.splits")
    assert not (tmp_path / "runs").exists()
    # Without test in infer.splits the same data trains.
    assert train_tiny(herbarium_copy, tmp_path / "runs", extra=["infer.splits=[val]"], flags=["--check"]) == 0


def test_missing_validation_image_is_found_before_training(herbarium_copy, tmp_path, capsys):
    cfg = load_config("demo_ce", [f"data.root={herbarium_copy}", *TINY_OVERRIDES])
    data = load_run_data(cfg, tmp_path / "none", reuse_split=False)
    missing = data.images_dir / data.val["file_name"].iloc[-1]
    missing.unlink()
    status = train_tiny(herbarium_copy, tmp_path / "runs", flags=["--check"])
    assert_refused_before_training(status, capsys, "val image", str(missing))


def test_empty_test_image_is_found_before_training(herbarium_copy, tmp_path, capsys):
    cfg = load_config("demo_ce", [f"data.root={herbarium_copy}", *TINY_OVERRIDES])
    data = load_run_data(cfg, tmp_path / "none", reuse_split=False)
    empty = data.test_images_dir / data.test["file_name"].iloc[0]
    empty.write_bytes(b"")
    status = train_tiny(herbarium_copy, tmp_path / "runs")
    assert_refused_before_training(status, capsys, "test image", str(empty), "empty")


def test_training_split_smaller_than_a_batch(tiny_herbarium, tmp_path, capsys):
    # 8 images, a quarter held out: 6 left for a batch of 8 (today's KeyError 'loss').
    status = train_tiny(tiny_herbarium, tmp_path / "runs", extra=["data.limit_train=8"])
    assert_refused_before_training(status, capsys, "train.batch_size=8", "less than one batch")
    assert not (tmp_path / "runs").exists()


def test_unwritable_output_folder(tiny_herbarium, tmp_path, capsys):
    # A file where the output folder should be: refused even for root, who ignores permissions.
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    status = train_tiny(tiny_herbarium, blocker, extra=["name=x"], flags=["--check"])
    assert_refused_before_training(status, capsys, f"cannot create run directory {blocker / 'x'}")
    assert blocker.read_text() == "not a folder"


def test_too_little_disk_space_is_refused(tmp_path):
    from herbens.training.preflight import check_output_dir

    free = check_output_dir(tmp_path / "run", needed=1)
    assert free > 0 and (tmp_path / "run").is_dir() and list((tmp_path / "run").iterdir()) == []
    with pytest.raises(HerbensError, match="output_dir: .* free, but the run needs about"):
        check_output_dir(tmp_path / "run", needed=free * 1000)


def test_size_estimates_match_a_real_run(tiny_run):
    # The tiny run: demo_ce (adamw: two moments per weight), no EMA, logits for val and test.
    import yaml

    from herbens.training.checkpoint import latest_checkpoint
    from herbens.data.taxonomy import Taxonomy
    from herbens.infer.run import load_run_model
    from herbens.stores.logits import logits_dir, read_logits
    from herbens.training.preflight import estimate_sizes

    cfg = yaml.safe_load((tiny_run / "config.yaml").read_text())
    taxonomy = Taxonomy.load(tiny_run / "taxonomy.json")
    model = load_run_model(tiny_run, cfg, taxonomy)
    rows = {split: len(read_logits(tiny_run, split).image_ids) for split in ("val", "test")}
    classes = {level: taxonomy.num_classes(level) for level in cfg["levels"]}
    checkpoint, weights, logits = estimate_sizes(list(model.parameters()), cfg, rows, classes)

    def size(path: Path) -> int:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    assert 0.8 < checkpoint / size(latest_checkpoint(tiny_run)) < 1.25
    assert 0.9 < weights / (tiny_run / "model.pt").stat().st_size < 1.1
    for split, estimate in logits.items():
        stored = sum((logits_dir(tiny_run, split) / f"{level}.npy").stat().st_size for level in classes)
        assert estimate <= stored < estimate + 4096 * len(classes)  # plus the .npy headers


def test_preflight_leaves_the_run_state_untouched(tiny_herbarium, tmp_path):
    # Seesaw keeps class counts updated in forward, mixup draws from numpy: both must be restored.
    import numpy as np

    from herbens.training.preflight import run_preflight
    from herbens.training.setup import build_accelerator, build_setup

    cfg = load_config("demo_seesaw", [f"data.root={tiny_herbarium}", f"output_dir={tmp_path}", *TINY_OVERRIDES,
                                      "train.ema=true"])
    accelerator = build_accelerator(cfg)
    setup = build_setup(cfg, accelerator, load_run_data(cfg, tmp_path / "none", reuse_split=False))

    def snapshot():
        return ({k: v.clone() for k, v in setup.plain_model.state_dict().items()},
                {k: v.clone() for k, v in setup.criterion.state_dict().items()},
                {k: v.clone() for k, v in setup.ema.module.state_dict().items()},
                setup.optimizer.state_dict()["param_groups"], setup.schedule.state_dict(),
                torch.get_rng_state(), np.random.get_state()[1].copy())

    before = snapshot()
    plan = run_preflight(cfg, setup, tmp_path / cfg["name"])
    after = snapshot()
    assert plan.updates_per_epoch == len(setup.loader) and plan.global_batch == 8
    assert not setup.optimizer.state  # no step taken on the real optimizer
    for one, two in zip(before, after):
        if isinstance(one, dict) and one and isinstance(next(iter(one.values())), torch.Tensor):
            assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
        elif isinstance(one, (torch.Tensor, np.ndarray)):
            assert (one == two).all()
        else:
            assert one == two


def test_check_through_the_herbens_command(tiny_herbarium, tmp_path, capsys):
    from herbens.cli.main import main as cli_main

    argv = ["train", "demo_ce", f"data.root={tiny_herbarium}", f"output_dir={tmp_path / 'runs'}", *TINY_OVERRIDES,
            "train.grad_accum=3", "train.epochs=3", "--check"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "updates in 3 epochs" in printed and "global batch: 24" in printed
    assert not (tmp_path / "runs").exists()
