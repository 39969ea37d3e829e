"""Each verb ends with one line naming what it wrote; progress shows off a terminal, or not at all
with --no-progress (infer, predict, teach on a tiny trained run)."""

from __future__ import annotations

import re
import shutil

import pytest
from conftest import train_tiny

from herbens.cli.main import main


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def _progress_lines(err: str, desc: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{desc}: ")]


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    """The tiny run, copied: these tests rewrite its stores."""
    return shutil.copytree(tiny_run, tmp_path_factory.mktemp("verbs") / "tiny")


def test_infer_embeddings_prints_progress_lines_and_names_the_stores(run_copy, capsys):
    assert main(["infer", str(run_copy), "--embeddings", "--no-logits"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err
    lines = _progress_lines(err, "embeddings train")
    assert lines[0].startswith("embeddings train: 0/") and re.match(r"embeddings train: (\d+)/\1 batch", lines[-1])
    last = _last_line(out)
    for split in ("train", "val", "test"):
        assert re.search(rf"{re.escape(str(run_copy / 'embeddings' / split))} \(\d+ rows\)", last), last
    assert last.startswith("wrote ")


def test_infer_without_progress_still_names_what_it_wrote(run_copy, capsys):
    assert main(["infer", str(run_copy), "--split", "val", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert _progress_lines(err, "logits val") == []
    assert re.fullmatch(rf"wrote {re.escape(str(run_copy / 'logits' / 'val'))} \(\d+ rows\)", _last_line(out))


def test_predict_and_teach_progress_and_closing_lines(run_copy, tiny_herbarium, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    assert main(["export", str(run_copy), "-o", str(bundle)]) == 0
    assert _last_line(capsys.readouterr().out).startswith(f"wrote bundle {bundle}")
    out_csv = tmp_path / "names.csv"
    assert main(["predict", str(bundle), str(tiny_herbarium / "test_images"), "-o", str(out_csv)]) == 0
    out, err = capsys.readouterr()
    lines = _progress_lines(err, "predict")  # one line per block of --block paths (and every 10 s)
    assert lines[0].startswith("predict: 0/") and re.match(r"predict: 1/\S+ block", lines[-1]), lines
    assert _last_line(out).startswith(f"wrote {out_csv}")
    assert main(["predict", str(bundle), str(tiny_herbarium / "test_images"), "-o", str(out_csv),
                 "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert _progress_lines(err, "predict") == [] and _last_line(out).startswith(f"wrote {out_csv}")
    teacher = tmp_path / "teacher"
    assert main(["teach", str(run_copy), "-o", str(teacher), "--k", "3", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert _progress_lines(err, "predict") == []
    assert _last_line(out).startswith("wrote teacher targets for ")
    assert str(teacher / "targets" / "train") in _last_line(out)


def test_train_without_progress_draws_no_bar_and_names_the_run(tiny_herbarium, tmp_path, capsys):
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=quiet", "train.epochs=1"], flags=["--no-progress"]) == 0
    out, err = capsys.readouterr()
    for desc in ("epoch 1", "validate", "logits val", "logits test"):
        assert _progress_lines(err, desc) == [], desc
    assert _last_line(out) == f"run written to {tmp_path / 'quiet'}"


def test_dataset_verbs_end_with_what_they_wrote(tmp_path, capsys):
    data = tmp_path / "mini"
    assert main(["synth", str(data), "--species", "3", "--long-edge", "64", "--min-images", "2", "--max-images",
                 "3", "--test-per-species", "1", "--workers", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert _last_line(out).startswith("wrote ") and str(data) in _last_line(out) and "synth: " not in err
    assert main(["check", str(data), "--workers", "1", "--json", str(tmp_path / "check.json")]) == 0
    out, err = capsys.readouterr()
    assert _last_line(out) == f"wrote {tmp_path / 'check.json'}" and _progress_lines(err, "checking images")
    small = tmp_path / "small"
    assert main(["prepare", str(data), "--size", "32", "--out", str(small), "--workers", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert re.match(rf"wrote \d+ images into {re.escape(str(small))} ", _last_line(out)), out
    assert "prepare: " not in err
