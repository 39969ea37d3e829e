"""The data-loader and training-step benchmarks run end to end at toy sizes and print ratios."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_loader_bench_prints_three_loaders_and_their_ratios(tmp_path, capsys):
    bench = load_bench("loader_bench")
    assert bench.main(["--recipe", "demo_ce", "--images", "16", "--repeats", "1", "--batch-size", "4",
                       "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(naive|herbens).*?\s([\d.]+)\s+([\d.]+)x$", out, flags=re.M)
    assert [r[0] for r in rows] == ["naive", "herbens", "herbens"], out
    assert float(rows[0][2]) == 1.0 and all(float(rate) > 0 for _, rate, _ in rows)
    height, width = (int(v) for v in re.search(r"input (\d+)x(\d+)", out).groups())
    assert f"prepared cache: long edge {2 * max(height, width)} px" in out
    assert list(tmp_path.iterdir()) == []  # synthetic data removed


@pytest.mark.slow
def test_loop_bench_prints_both_step_times_and_the_ratio(capsys):
    bench = load_bench("loop_bench")
    assert bench.main(["--backbone", "test_resnet", "--size", "32", "--batch", "4", "--species", "60",
                       "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    times = dict(re.findall(r"^(bare timm|herbens)\s+([\d.]+) ms/step", out, flags=re.M))
    assert set(times) == {"bare timm", "herbens"} and all(float(t) > 0 for t in times.values())
    ratio = float(re.search(r"ratio bare / herbens time .*?: ([\d.]+)", out).group(1))
    assert ratio == pytest.approx(float(times["bare timm"]) / float(times["herbens"]), rel=0.01)
