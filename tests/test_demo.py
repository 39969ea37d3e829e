"""The demo end to end at a tiny budget: every stage runs and the scores are consistent."""

import glob
import shlex
from pathlib import Path

import pandas as pd
import pytest

from herbens.cli.main import main
from herbens.demo import DEMO_RECIPES, run_demo
from herbens.ensemble.submission import read_submission


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path):
    scores = run_demo(tmp_path, overrides=["train.epochs=1", "input.size=[48,32]", "data.num_workers=0"])
    assert set(DEMO_RECIPES) | {"chance (uniform)", "ensemble"} <= set(scores)
    for name in (*DEMO_RECIPES, "ensemble"):
        assert 0.0 <= scores[name]["species_macro_f1"] <= 1.0
    submission = read_submission(tmp_path / "submissions" / "demo.csv")
    assert len(submission) == 120  # 30 species x 4 test images
    assert (tmp_path / "reports" / "demo" / "index.html").exists()
    # The ensemble exported into a bundle that named test sheets on its own.
    assert (tmp_path / "bundles" / "demo" / "manifest.json").exists()
    predicted = (tmp_path / "submissions" / "demo_bundle_predictions.csv").read_text().splitlines()
    assert len(predicted) == 1 + 6
    assert (tmp_path / "submissions" / "demo_bundle_predictions.html").exists()
    assert 0.0 <= scores["openset"]["auroc"] <= 1.0 and len(scores["openset"]["held_out_category_ids"]) == 3


def readme_after_demo_commands() -> list[list[str]]:
    """The argument lists of the README's after-demo block, in its order."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- after-demo commands", 1)[1].split("```", 2)[1]
    lines = [shlex.split(line, comments=True) for line in block.splitlines()]
    return [line[1:] for line in lines if line and line[0] == "herbens"]


def _expanded(argv: list[str]) -> list[str]:
    """Shell glob expansion of ``runs/*`` as the README's shell would do it."""
    return [p for a in argv for p in (sorted(glob.glob(a)) if "*" in a else [a])]


@pytest.mark.slow
def test_readme_after_demo_commands_work_as_written(tmp_path, monkeypatch):
    commands = readme_after_demo_commands()
    assert len(commands) >= 8 and commands[0][0] == "ensemble"
    run_demo(tmp_path, overrides=["train.epochs=1", "input.size=[48,32]", "data.num_workers=0"])
    # runs/ holds runs only: the open-set run went to openset/, and the demo's bundle can enrol.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(DEMO_RECIPES)
    assert (tmp_path / "openset").is_dir()
    assert all((tmp_path / "runs" / r / "embeddings" / "train").is_dir() for r in DEMO_RECIPES)
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert main(_expanded(argv)) == 0, argv
    # A 1-epoch model need not name the enrolled species first; the commands must have worked.
    assert len(pd.read_csv(tmp_path / "predictions" / "new_species.csv")) == 2
    assert "Novelia prima" in set(pd.read_csv(tmp_path / "bundles" / "final" / "names.csv")["scientific_name"])
    assert (tmp_path / "teachers" / "final_teacher").is_dir() and (tmp_path / "predictions" / "final.html").exists()
