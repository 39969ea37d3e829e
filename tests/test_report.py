"""``herbens report``: figures with labelled axes, PNGs on disk, HTML linking only real images."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from herbens.analysis.evaluate import evaluate_predictions
from herbens.analysis.figures import (plot_f1_vs_cost, plot_family_accuracy, plot_history, plot_throughput,
                                      plot_training_bins)
from herbens.analysis.report import write_report
from herbens.cli.main import main
from herbens.data.taxonomy import Taxonomy
from herbens.core.errors import HerbensError
from herbens.stores.logits import write_logits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def taxonomy() -> Taxonomy:
    """Twelve species in four families, training counts spread over several bins."""
    return Taxonomy(list(range(100, 112)), [f"G{i // 2} s{i}" for i in range(12)],
                    [f"G{i}" for i in range(6)], ["Fa", "Fb", "Fc", "Fd"],
                    [i // 2 for i in range(12)], [i // 3 for i in range(12)],
                    [3, 7, 12, 18, 25, 33, 41, 55, 62, 78, 85, 96])


def history(epochs: int, with_lr: bool = True) -> list[dict]:
    return [{"epoch": e + 1, "step": 10 * (e + 1), "train_loss": 3.0 / (e + 1),
             **({"lr": 0.1 * (1 - e / epochs)} if with_lr else {}), "images_per_second": 50.0 + e,
             "epoch_time_s": 2.0, "val_species_macro_f1": 0.2 * (e + 1)} for e in range(epochs)]


def make_run(root: Path, name: str, *, metrics: bool = True, hist=None, seed: int = 0) -> Path:
    """A run folder with taxonomy.json, optional metrics.json/history.jsonl, real val logits."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    tax = taxonomy()
    tax.save(run_dir / "taxonomy.json")
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(12), 4)
    scores = rng.normal(size=(len(labels), 12))
    scores[np.arange(len(labels)), labels] += rng.uniform(0, 3, size=len(labels))  # mostly right
    write_logits(run_dir, "val", [str(i) for i in range(len(labels))], {"species": scores},
                 {"taxonomy_hash": tax.hash}, labels=labels)
    if metrics:
        (run_dir / "metrics.json").write_text(json.dumps({
            "run": name, "backbone": "test_vit", "params": 1234, "epochs": 3,
            "val": {"species_macro_f1": 0.5},
            "cost": {"wall_time_s": 10, "train_time_s": 8, "device_type": "cpu", "device_name": "cpu",
                     "device_count": 1, "images_per_second": 51.0, "device_hours": 0.002 * (seed + 1)}}))
    if hist is not None:
        (run_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hist))
    return run_dir


def assert_labelled(fig):
    assert fig is not None and fig.axes
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()


def tiny_evaluation():
    rng = np.random.default_rng(3)
    true = np.repeat(np.arange(12), 3)
    pred = np.where(rng.random(len(true)) < 0.7, true, rng.integers(0, 12, len(true)))
    return evaluate_predictions(true, pred, taxonomy(), k=3)


def test_every_plot_has_labelled_axes():
    ev = tiny_evaluation()
    assert_labelled(plot_family_accuracy(ev["family_best"], ev["family_worst"], "families"))
    assert_labelled(plot_training_bins([("a", ev["by_training_count"]), ("b", ev["by_training_count"])]))
    for key in ("train_loss", "lr", "val_species_macro_f1"):
        assert_labelled(plot_history([("a", history(3)), ("b", history(2))], key, "y", "t"))
    assert_labelled(plot_throughput([("a", 10.0), ("b", 20.0)]))
    assert_labelled(plot_f1_vs_cost([("a", 1.0, 0.5), ("b", 2.0, 0.7)]))


def test_plots_without_data_are_skipped():
    assert plot_training_bins([]) is None
    assert plot_history([("a", history(2, with_lr=False))], "lr", "y", "t") is None
    assert plot_throughput([]) is None and plot_f1_vs_cost([]) is None


def test_report_figures_html_and_notes(tmp_path, capsys):
    runs = tmp_path / "runs"
    full = make_run(runs, "full", hist=history(3))
    bare = make_run(runs, "bare", metrics=False, seed=1)  # no metrics, no history
    (runs / "notes.txt").write_text("not a run")
    sub = tmp_path / "sub.csv"  # a submission cannot be scored without --solution/--metadata
    sub.write_text("Id,Predicted\n0,100\n")
    out = tmp_path / "reports" / "r1"
    rc = main(["report", str(full), str(bare), str(runs / "notes.txt"), str(sub), "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "full" in printed and "bare" in printed and "index.html" in printed

    page = (out / "index.html").read_text()
    linked = re.findall(r'<img src="([^"]+)"', page)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert sorted(linked) == pngs  # every figure shown, every link present
    for name in linked:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    expected = {"accuracy_by_training_images.png", "train_loss.png", "learning_rate.png",
                "val_macro_f1.png", "throughput.png", "macro_f1_vs_cost.png"}
    assert expected <= set(pngs)
    assert sum(name.startswith("family_accuracy_") for name in pngs) == 2
    report = json.loads((out / "report.json").read_text())
    notes = " ".join(report["notes"])
    assert "bare/metrics.json: missing" in notes and "bare/history.jsonl: missing" in notes
    assert "notes.txt" in notes and "--solution" in notes
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_report_survives_runs_without_anything(tmp_path):
    run_dir = tmp_path / "empty_run"
    run_dir.mkdir()
    (run_dir / "history.jsonl").write_text('{"epoch": 1, "train_loss": 2.0}\n{"epoch": 2, "tra')
    index = write_report([run_dir], tmp_path / "out")
    page = index.read_text()
    for name in re.findall(r'<img src="([^"]+)"', page):
        assert (index.parent / name).is_file()
    notes = json.loads((index.parent / "report.json").read_text())["notes"]
    assert any("not scored" in n for n in notes) and any("line 2 is not JSON" in n for n in notes)
    assert (index.parent / "train_loss.png").is_file()


def test_report_missing_input_is_an_error(tmp_path):
    with pytest.raises(HerbensError, match="no such"):
        write_report([tmp_path / "absent"], tmp_path / "out")


def test_report_names_the_split_of_every_score_and_keeps_best_and_worst_apart(tmp_path, capsys):
    run = make_run(tmp_path / "runs", "full", hist=history(2))
    out = tmp_path / "r"
    assert main(["report", str(run), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full (validation)" in printed and "Worst families of full (validation)" in printed
    page = (out / "index.html").read_text()
    assert "<th>split scored</th>" in page and "<td>validation</td>" in page
    assert "<h3>full: 48 validation images</h3>" in page and "<th>validation images</th>" in page
    assert "test images" not in page  # a run is scored on its validation logits, never called test
    (entry,) = json.loads((out / "report.json").read_text())["inputs"]
    assert entry["split"] == "validation"


def test_families_never_both_best_and_worst_and_no_interval_on_few_images():
    ev = tiny_evaluation()  # 4 families of 9 images each, k=3: 6 places for 4 families
    best = {r["name"] for r in ev["family_best"]}
    worst = {r["name"] for r in ev["family_worst"]}
    assert not best & worst and best | worst == {"Fa", "Fb", "Fc", "Fd"}
    # 9 images per family (< 10): the accuracy alone, no "+- SE" that would claim a precision.
    assert all(r["se"] is None for r in ev["per_family"])
    many = evaluate_predictions(np.repeat(np.arange(12), 4), np.repeat(np.arange(12), 4), taxonomy(), k=3)
    assert all(r["se"] == 0.0 for r in many["per_family"])  # 12 images each: an interval is shown


def test_a_failed_report_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    first = make_run(tmp_path / "runs", "first", hist=history(2))
    out = tmp_path / "out"
    write_report([first], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    second = make_run(tmp_path / "runs", "second", hist=history(3), seed=1)

    def broken(*args, **kwargs):  # the page fails after the new figures are drawn
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("herbens.analysis.report.render_html", broken)
    with pytest.raises(HerbensError, match="No space left"):
        write_report([second], out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_report_never_replaces_a_folder_that_is_not_one(tmp_path):
    run = make_run(tmp_path / "runs", "run", hist=history(2))
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"trained")
    with pytest.raises(HerbensError, match="not a herbens report"):
        write_report([run], folder)
    assert [p.name for p in folder.iterdir()] == ["weights.safetensors"]
    notes = tmp_path / "notes.txt"  # a plain file at -o is not replaced either
    notes.write_text("mine")
    with pytest.raises(HerbensError, match="not a herbens report"):
        write_report([run], notes)
    assert notes.read_text() == "mine"
    index = write_report([run], tmp_path / "again")
    assert write_report([run], index.parent) == index  # an earlier report is replaced
