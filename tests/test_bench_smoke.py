"""The GPU training benchmark runs end to end on the CPU in its smoke mode (``--device cpu --tiny``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_train_bench_smoke_prints_both_rates_and_a_ratio(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "bench/gpu_train.py", "--device", "cpu", "--tiny"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if "ratio" in line and "img/s" in line]
    assert len(rows) == 3, done.stdout
    summary = json.loads((tmp_path / "gpu_train.json").read_text())
    results = summary["results"]
    assert [r["recipe"] for r in results] == ["swinv2_b", "convnext_b", "effnetv2_s"]
    for line, result in zip(rows, results):
        herbens, bare, ratio = (float(x) for x in re.search(
            r"herbens\s+([\d.]+) img/s\s+bare timm\s+([\d.]+) img/s\s+ratio ([\d.]+)", line).groups())
        assert herbens > 0 and bare > 0
        assert result["backbone"].startswith("test_")
        assert result["ratio"] == pytest.approx(result["herbens_images_per_s"] / result["bare_timm_images_per_s"])
        assert ratio == pytest.approx(result["ratio"], abs=1e-3)
    assert (tmp_path / "gpu_train.txt").read_text().strip()
