"""``herbens report``: figures (PNG), one HTML page and a text summary for runs and submissions.

Figures: the paper's fig. 3a (species accuracy of the best and worst ten families, binomial
SE bars, test counts) per scored input, fig. 3b (mean per-species accuracy by training-image
bin, SE bars) for all scored inputs, training loss / learning rate / validation macro-F1 per
epoch (``history.jsonl``), throughput and macro-F1 against device-hours (``metrics.json``).

A run or submission that lacks what a figure needs is left out of that figure with a note;
nothing missing makes the report fail. Every file is written atomically (``herbens.core.fileio``),
each on its own, so an existing output folder with other content is never replaced wholesale.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from herbens.analysis.evaluate import evaluate_predictions, load_predictions, unique_names
from herbens.analysis.figures import (is_number, plot_f1_vs_cost, plot_family_accuracy,
                                      plot_history, plot_throughput, plot_training_bins,
                                      save_figure)
from herbens.analysis.tables import format_anova, format_bins, format_group_table, format_summary, pct
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_dir, atomic_write, read_json, replaceable, write_json
from herbens.stores.logits import format_ids

#: Per-epoch series drawn from history.jsonl: (key, y-axis label, title, file stem).
HISTORY_PLOTS = (
    ("train_loss", "training loss", "Training loss per epoch", "train_loss"),
    ("lr", "learning rate", "Learning rate per epoch", "learning_rate"),
    ("val_species_macro_f1", "validation species macro-F1 (%)",
     "Validation species macro-F1 per epoch", "val_macro_f1"),
)


@dataclass
class Entry:
    """Everything the report knows about one input (run directory or submission CSV)."""

    name: str
    path: Path
    kind: str  # "run" or "submission"
    split: str = "test"  # the images its scores and counts are of: a run's logits split, a submission's test
    evaluation: dict | None = None
    metrics: dict | None = None  # metrics.json of a run
    history: list[dict] | None = None  # history.jsonl of a run
    unreadable: list[str] = field(default_factory=list)  # ids of fallback rows, left out of the scores


REPORT_RECORD = "report.json"


@dataclass
class Figures:
    """Figures written so far (file name, caption) and notes on what was skipped."""

    out_dir: Path
    written: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, fig: Figure | None, stem: str, caption: str, skipped: str = "") -> None:
        """Save ``fig`` as ``<stem>.png``, or note why there is none."""
        if fig is None:
            self.notes.append(skipped or f"{caption}: nothing to plot, figure skipped")
            return
        name = f"{stem}.png"
        save_figure(fig, self.out_dir / name)
        self.written.append((name, caption))


# ----- reading inputs ---------------------------------------------------------------------------

def read_history(path: Path) -> tuple[list[dict] | None, list[str]]:
    """Epoch records of a ``history.jsonl``; malformed lines are skipped with a note."""
    if not path.is_file():
        return None, [f"{path}: missing, training-curve figures skip this run"]
    records, notes = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # A run still training may have a half-written last line: skip it, keep the rest.
            notes.append(f"{path}: line {number} is not JSON, skipped")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, notes


def read_run_metrics(path: Path) -> tuple[dict | None, list[str]]:
    """A run's ``metrics.json``, or None with a note when missing or unreadable."""
    if not path.is_file():
        return None, [f"{path}: missing, throughput and cost figures skip this run"]
    try:
        data = read_json(path)
    except HerbensError as exc:
        return None, [f"{exc}; throughput and cost figures skip this run"]
    if not isinstance(data, dict):
        return None, [f"{path}: not a JSON object, skipped"]
    return data, []


def _looks_like_run(path: Path) -> bool:
    return any((path / name).exists() for name in
               ("taxonomy.json", "metrics.json", "history.jsonl", "logits", "config.yaml"))


def collect_entries(inputs: list[Path], solution=None, metadata=None, split: str = "val",
                    k: int = 10, exclude_split=None) -> tuple[list[Entry], list[str]]:
    """Load and score each input; whatever is missing becomes a note instead of an error.

    A path that does not exist is still an error: it is a typo, not a partial run.
    """
    entries, notes, cache = [], [], {}
    for path in map(Path, inputs):
        if not path.exists():
            raise HerbensError(f"{path}: no such run directory or submission file")
        if path.is_dir() and not _looks_like_run(path):
            notes.append(f"{path}: not a run directory (no taxonomy.json, metrics.json, "
                         f"history.jsonl or logits), skipped")
            continue
        if path.is_file() and path.suffix.lower() != ".csv":
            notes.append(f"{path}: not a .csv submission, skipped")
            continue
        entry = Entry(path.name if path.is_dir() else path.stem, path,
                      "run" if path.is_dir() else "submission",
                      split_name(split) if path.is_dir() else "test")
        if entry.kind == "run":
            entry.metrics, more = read_run_metrics(path / "metrics.json")
            notes += more
            entry.history, more = read_history(path / "history.jsonl")
            notes += more
        try:
            pred = load_predictions(path, solution, metadata, split, cache, exclude_split)
            entry.evaluation = evaluate_predictions(pred.true, pred.pred, pred.taxonomy, k)
            entry.unreadable = list(pred.unreadable)
            if entry.unreadable:
                notes.append(f"{path}: {len(entry.unreadable)} {split} image(s) were unreadable at inference "
                             f"and are left out of its scores: {format_ids(entry.unreadable)}")
        except HerbensError as exc:
            notes.append(f"not scored: {exc}")
        entries.append(entry)
    for entry, name in zip(entries, unique_names([e.name for e in entries])):
        entry.name = name
    return entries, notes


def split_name(split: str) -> str:
    """What a logits split is called in the report (``val`` reads ``validation``)."""
    return {"val": "validation"}.get(split, split)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "input"


# ----- what each figure is drawn from -------------------------------------------------------------

def throughput_of(entry: Entry) -> float | None:
    """metrics.json cost.images_per_second, else the mean over history epochs."""
    speed = ((entry.metrics or {}).get("cost") or {}).get("images_per_second")
    if is_number(speed):
        return float(speed)
    epochs = [r["images_per_second"] for r in entry.history or []
              if is_number(r.get("images_per_second"))]
    return float(np.mean(epochs)) if epochs else None


def macro_f1_of(entry: Entry) -> float | None:
    """Species macro-F1: this report's own evaluation, else the one in metrics.json."""
    if entry.evaluation is not None:
        return entry.evaluation["species_macro_f1"]
    value = ((entry.metrics or {}).get("val") or {}).get("species_macro_f1")
    return float(value) if is_number(value) else None


def draw_figures(entries: list[Entry], figures: Figures) -> None:
    """Write every figure the inputs allow; note the inputs left out."""
    scored = [e for e in entries if e.evaluation is not None]
    for i, e in enumerate(scored):
        figures.add(plot_family_accuracy(e.evaluation["family_best"], e.evaluation["family_worst"],
                                         f"Species accuracy per family: {e.name} ({e.split} images)"),
                    f"family_accuracy_{i:02d}_{_slug(e.name)}",
                    f"Best and worst families of {e.name}, {e.split} images (fig. 3a)")
    figures.add(plot_training_bins([(e.name, e.evaluation["by_training_count"]) for e in scored]),
                "accuracy_by_training_images", "Accuracy by training images per species (fig. 3b)",
                "accuracy by training images: no scored input, figure skipped")
    runs = [e for e in entries if e.kind == "run"]
    histories = [(e.name, e.history) for e in runs if e.history]
    for key, ylabel, title, stem in HISTORY_PLOTS:
        figures.add(plot_history(histories, key, ylabel, title), stem, title,
                    f"{title}: no run has '{key}' in history.jsonl, figure skipped")
    speeds = [(e.name, throughput_of(e)) for e in runs]
    figures.notes += [f"{name}: no images_per_second in metrics.json or history.jsonl, "
                      f"left out of the throughput figure" for name, s in speeds if s is None]
    figures.add(plot_throughput([(n, s) for n, s in speeds if s is not None]), "throughput",
                "Training throughput per run", "throughput: no run reports images/s, figure skipped")
    points = []
    for e in runs:
        hours = ((e.metrics or {}).get("cost") or {}).get("device_hours")
        f1 = macro_f1_of(e)
        if is_number(hours) and f1 is not None:
            points.append((e.name, float(hours), f1))
        else:
            figures.notes.append(f"{e.name}: no cost.device_hours or species macro-F1, "
                                 f"left out of the macro-F1 vs cost figure")
    figures.add(plot_f1_vs_cost(points), "macro_f1_vs_cost", "Species macro-F1 against device-hours",
                "macro-F1 vs cost: no run has both device-hours and a macro-F1, figure skipped")


# ----- HTML and text ------------------------------------------------------------------------------

def _html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_html(entries: list[Entry]) -> str:
    keys = [("species_macro_f1", "species F1"), ("species_accuracy", "species acc"),
            ("genus_macro_f1", "genus F1"), ("genus_accuracy", "genus acc"),
            ("family_macro_f1", "family F1"), ("family_accuracy", "family acc"),
            ("head_macro_f1", "head F1"), ("tail_macro_f1", "tail F1")]
    rows = [[e.name, e.kind, e.split, e.evaluation["n_images"]] + [pct(e.evaluation.get(k)) for k, _ in keys]
            for e in entries if e.evaluation is not None]
    if not rows:
        return "<p>No input could be scored (see notes).</p>"
    return _html_table(["input", "kind", "split scored", "images"] + [label for _, label in keys], rows)


def _runs_html(entries: list[Entry]) -> str:
    rows = []
    for e in entries:
        if e.kind != "run" or e.metrics is None:
            continue
        cost = e.metrics.get("cost") or {}
        rows.append([e.name, e.metrics.get("backbone", "-"), e.metrics.get("params", "-"),
                     e.metrics.get("epochs", "-"), cost.get("device_name", "-"),
                     cost.get("device_count", "-"), _fmt(cost.get("device_hours")),
                     _fmt(throughput_of(e))])
    if not rows:
        return "<p>No run has a metrics.json.</p>"
    return _html_table(["run", "backbone", "params", "epochs", "device", "devices",
                        "device-hours", "images/s"], rows)


def _fmt(value) -> str:
    return f"{value:.4g}" if is_number(value) else "-"


def _detail_html(entry: Entry) -> str:
    ev = entry.evaluation
    scored = f"{entry.split} images"

    def groups(records):
        return _html_table(["family", scored, "training images", "accuracy %", "SE %"],
                           [[r["name"], r["n_images"], r["train_images"], pct(r["accuracy"]),
                             pct(r["se"])] for r in records])

    bins = _html_table(["training images", "species", scored, "mean accuracy %", "SE %",
                        "pooled accuracy %"],
                       [[b["bin"], b["n_species"], b["n_images"], pct(b["accuracy"]),
                         pct(b["se"]), pct(b["image_accuracy"])] for b in ev["by_training_count"]])
    anova = html.escape(format_anova(ev["anova"])).replace("\n", "<br>")
    ht = ev["head_tail"]
    return (f"<h3>{html.escape(entry.name)}: {ev['n_images']} {html.escape(scored)}</h3>"
            f"<p>Head ({ht['head_species']} species, &ge; {ht['head_min_train_images']} training "
            f"images) macro-F1 {pct(ev['head_macro_f1'])} %; tail ({ht['tail_species']} species, "
            f"&le; {ht['tail_max_train_images']}) macro-F1 {pct(ev['tail_macro_f1'])} %.</p>"
            f"<h4>Best families</h4>{groups(ev['family_best'])}"
            f"<h4>Worst families</h4>{groups(ev['family_worst'])}"
            f"<h4>Accuracy by training images per species</h4>"
            f"<p>Training counts: {html.escape(str(ev.get('training_counts', '')))}.</p>{bins}<p>{anova}</p>")


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
         "figure{margin:1em 0}figcaption{color:#555}")


def render_html(title: str, entries: list[Entry], figures: Figures) -> str:
    """The self-contained page: tables, every figure (relative links), notes."""
    imgs = "".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                   f"<figcaption>{html.escape(caption)}</figcaption></figure>"
                   for name, caption in figures.written)
    details = "".join(_detail_html(e) for e in entries if e.evaluation is not None)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in figures.notes)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Scores (%)</h2>{_summary_html(entries)}"
            f"<h2>Runs</h2>{_runs_html(entries)}"
            f"<h2>Figures</h2>{imgs or '<p>No figures.</p>'}"
            f"<h2>Per-input analyses</h2>{details or '<p>Nothing scored.</p>'}"
            f"<h2>Notes</h2>{'<ul>' + notes + '</ul>' if notes else '<p>None.</p>'}"
            f"</body></html>\n")


def summary_text(entries: list[Entry], figures: Figures, index: Path) -> str:
    """Compact terminal summary: the score table, the first input's worst families, notes."""
    scored = [(f"{e.name} ({e.split})", e.evaluation) for e in entries if e.evaluation is not None]
    parts = [format_summary(scored) if scored else "no input could be scored"]
    if scored:
        name, ev = scored[0]
        parts.append(f"Worst families of {name}, scored images:\n" + format_group_table(ev["family_worst"][:5], "family"))
        parts.append(f"Accuracy by training images per species of {name}:\n"
                     + format_bins(ev["by_training_count"]))
    if figures.notes:
        parts.append("Notes:\n" + "\n".join(f"  - {n}" for n in figures.notes))
    parts.append(f"{len(figures.written)} figures; report: {index}")
    return "\n\n".join(parts)


# ----- entry points -------------------------------------------------------------------------------

def write_report(inputs: list[Path], out_dir, solution=None, metadata=None, split: str = "val",
                 k: int = 10, exclude_split=None) -> Path:
    """Write figures, ``index.html``, ``report.json`` and ``summary.txt`` into ``out_dir``.

    Args:
        inputs: run directories and/or submission CSVs.
        out_dir: output folder: new, empty or an earlier report, which is replaced as a whole.
        solution, metadata: solution CSV and train metadata, needed to score submissions.
        split: logits split used to score runs.
        k: families in the best/worst figures and tables.
        exclude_split: a run's ``split.csv``, left out of the metadata's training counts when
            scoring submissions (runs use their own training-split counts).

    Returns:
        Path of ``index.html``.
    """
    out_dir = Path(out_dir)
    check_report_target(out_dir)
    entries, notes = collect_entries(list(inputs), solution, metadata, split, k, exclude_split)
    if not entries:
        raise HerbensError("report: none of the inputs is a run directory or a submission CSV")
    index = out_dir / "index.html"
    # The figures, page, record and summary are one output: staged together and swapped in at
    # once, so a failed or killed run leaves the previous report whole, never a mix of two.
    with atomic_dir(out_dir) as staging:
        figures = Figures(staging, notes=notes)
        draw_figures(entries, figures)
        with atomic_write(staging / "index.html") as handle:
            handle.write(render_html(f"herbens report: {out_dir.resolve().name}", entries, figures))
        write_json(staging / REPORT_RECORD, {
            "inputs": [{"name": e.name, "path": str(e.path), "kind": e.kind, "split": e.split,
                        "evaluation": e.evaluation, "metrics": e.metrics, "unreadable": e.unreadable}
                       for e in entries],
            "figures": [name for name, _ in figures.written], "notes": figures.notes})
        with atomic_write(staging / "summary.txt") as handle:
            handle.write(summary_text(entries, figures, index) + "\n")
    return index


def check_report_target(out_dir: Path) -> None:
    """A report replaces only an earlier report (a folder with ``report.json``) or an empty folder."""
    if not replaceable(out_dir, REPORT_RECORD):
        raise HerbensError(f"report: {out_dir} is a file or holds files but no {REPORT_RECORD}, so it is not a "
                           "herbens report and is not replaced; choose another -o")
