"""The GPU training benchmark runs end to end on the CPU in its smoke mode (``--device cpu --tiny``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_train_bench_smoke_prints_every_contender_and_its_ratio(tmp_path):
    # Compiling variants are left out here (minutes of CPU compile); they run the same code path.
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "bench/gpu_train.py", "--device", "cpu", "--tiny",
                           "--variants", "eager", "fused"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = re.findall(r"^  (bare timm|herbens \S+)\s+([\d.]+) img/s  ratio ([\d.]+)", done.stdout, re.MULTILINE)
    # bare + eager for each recipe, + fused for the SwinV2 stand-in
    assert [label for label, _, _ in rows] == ["bare timm", "herbens eager", "herbens fused"] + \
        ["bare timm", "herbens eager"] * 2, done.stdout
    summary = json.loads((tmp_path / "gpu_train.json").read_text())
    results = summary["results"]
    assert [r["recipe"] for r in results] == ["swinv2_b", "convnext_b", "effnetv2_s"]
    assert results[0]["backbone"] == "swinv2_tiny_window8_256"
    assert [r["backbone"] for r in results[1:]] == ["test_convnext", "test_efficientnet"]
    assert "not applicable" in results[1]["skipped"]["fused"]
    printed = iter(rows)
    for result in results:
        bare = result["contenders"][0]
        assert bare["contender"] == "bare timm" and bare["ratio_to_bare"] == 1.0
        for contender in result["contenders"]:
            label, ips, ratio = next(printed)
            assert label == contender["contender"] and contender["images_per_s"] > 0
            assert contender["ratio_to_bare"] == pytest.approx(contender["images_per_s"] / bare["images_per_s"])
            assert float(ratio) == pytest.approx(contender["ratio_to_bare"], abs=1e-3)
            assert contender["compile_s"] == 0 and contender["peak_memory_gb"] is None  # CPU, eager
    assert (tmp_path / "gpu_train.txt").read_text().strip()


@pytest.mark.slow
def test_distil_bench_smoke_trains_every_model_and_reports_each_row(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    command = [sys.executable, "bench/distil_bench.py", "--workdir", str(tmp_path / "work"), "--results",
               str(tmp_path), "--seeds", "3", "--epochs", "1", "--student-epochs", "2", "--name", "smoke"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert list(result["models"]) == ["single", "ensemble", "offline", "online", "online_mixup", "single_long"]
    assert result["epochs"] == {"single": 1, "ensemble": 3, "offline": 2, "online": 2, "online_mixup": 2,
                                "single_long": 2}
    seed = result["per_seed"][0]
    assert [len(seed["curves"][k]) for k in ("demo_balanced", "offline", "online", "online_mixup")] == [1, 2, 2, 2]
    assert 0 < result["teacher_share"] < 1 and result["teacher_s_per_step"] > 0
    assert result["cost"]["ensemble"]["params_M"] > result["cost"]["single"]["params_M"] > 0
    table = (tmp_path / "smoke.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 7  # header + 6 models
    assert "consistent online teacher, Mixup 0.8" in table
    # A second run with the same settings gathers the seed from <workdir>/seed_3.json: nothing retrained.
    again = subprocess.run([*command[:-2], "--name", "again"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "seed 3: the results in" in again.stdout and "epoch 1/" not in again.stdout + again.stderr
    assert json.loads((tmp_path / "again.json").read_text())["models"] == result["models"]
    # An ensemble of one recipe's seeds: members trained with the seed and the next two.
    seeds = subprocess.run([*command[:-2], "--name", "seeds", "--ensemble", "seeds", "--single", "demo_seesaw",
                            "--workdir", str(tmp_path / "seeds")], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=1200)
    assert seeds.returncode == 0, seeds.stdout + seeds.stderr
    by_seed = json.loads((tmp_path / "seeds.json").read_text())
    assert [m[1:] for m in by_seed["members"]] == [["demo_seesaw_seed+0", 0], ["demo_seesaw_seed+1", 1],
                                                   ["demo_seesaw_seed+2", 2]]
    assert "online_mixup" not in by_seed["models"] and "hard labels" in by_seed["skipped"]["online_mixup"]
    assert "online_mixup student not run" in (tmp_path / "seeds.md").read_text()  # Seesaw refuses Mixup
    runs = tmp_path / "seeds" / "runs_s3"
    assert [yaml.safe_load((runs / f"demo_seesaw_seed+{i}" / "config.yaml").read_text())["seed"]
            for i in range(3)] == [3, 4, 5]
    too_long = subprocess.run([*command[:-4], "--student-epochs", "4"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
    assert too_long.returncode != 0 and "--student-epochs must be 1..3" in too_long.stderr
