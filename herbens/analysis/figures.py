"""The report's figures, each drawn from plain lists on a Matplotlib Agg canvas.

Every ``plot_*`` returns a Figure, or None when its input has nothing to draw; ``save_figure``
writes a PNG atomically. pyplot's global state is never touched, so reports can be drawn from
worker threads and tests.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from herbens.core.fileio import atomic_write

# History keys stored as fractions and drawn as percentages.
PERCENT_KEYS = {"val_species_macro_f1"}


def new_figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    """A figure on the Agg canvas, never touching pyplot's global state."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` as PNG atomically."""
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)


def plot_family_accuracy(best: list[dict], worst: list[dict], title: str) -> Figure:
    """Fig. 3a: species accuracy of the best and worst families, SE bars, test counts."""
    fig, axes = new_figure(12, 0.35 * max(len(best), len(worst), 3) + 1.8, ncols=2)
    for ax, records, which, colour in ((axes[0], best, "Best", "tab:green"),
                                       (axes[1], worst, "Worst", "tab:red")):
        y = np.arange(len(records))[::-1]  # first record on top
        acc = [100 * r["accuracy"] for r in records]
        se = [100 * (r["se"] or 0.0) for r in records]
        ax.barh(y, acc, xerr=se, color=colour, alpha=0.8, capsize=3)
        ax.set_yticks(y, [f"{r['name']} (n={r['n_images']})" for r in records])
        ax.set_xlim(0, 105)
        ax.set_xlabel("species accuracy (%), bars: binomial SE")
        ax.set_ylabel("family (n: scored images, the title's split)")
        ax.set_title(f"{which} {len(records)} families")
    fig.suptitle(title)
    return fig


def plot_training_bins(series: list[tuple[str, list[dict]]]) -> Figure | None:
    """Fig. 3b: mean per-species accuracy against training images per species, SE bars."""
    series = [(name, bins) for name, bins in series if bins]
    if not series:
        return None
    labels = _ordered_bins([b for _, bins in series for b in bins])
    position = {label: i for i, label in enumerate(labels)}
    fig, (ax,) = new_figure(8, 4.5)
    for i, (name, bins) in enumerate(series):
        # Shift each input a little sideways so overlapping error bars stay readable.
        shift = 0.08 * (i - (len(series) - 1) / 2)
        x = [position[b["bin"]] + shift for b in bins]
        y = [100 * b["accuracy"] for b in bins]
        err = [100 * (b["se"] or 0.0) for b in bins]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("training images per species")
    ax.set_ylabel("mean per-species accuracy (%)")
    ax.set_title("Accuracy by training-set size (bars: SE of the mean over species)")
    ax.legend(fontsize="small")
    return fig


def _ordered_bins(bins: list[dict]) -> list[str]:
    lows = {}
    for b in bins:
        lows[b["bin"]] = b["lo"]
    return sorted(lows, key=lows.get)


def plot_history(histories: list[tuple[str, list[dict]]], key: str, ylabel: str,
                 title: str) -> Figure | None:
    """One line per run of ``key`` against epoch; None when no run logged ``key``."""
    lines = []
    for name, records in histories:
        points = [(r.get("epoch", i), r[key]) for i, r in enumerate(records)
                  if is_number(r.get(key)) and is_number(r.get("epoch", i))]
        if points:
            lines.append((name, points))
    if not lines:
        return None
    scale = 100.0 if key in PERCENT_KEYS else 1.0
    fig, (ax,) = new_figure(7, 4)
    for name, points in lines:
        x, y = zip(*points)
        ax.plot(x, [scale * v for v in y], marker="o", markersize=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def plot_throughput(values: list[tuple[str, float]]) -> Figure | None:
    """Training images per second of each run."""
    if not values:
        return None
    fig, (ax,) = new_figure(max(5, 0.8 * len(values) + 2), 4)
    names, speeds = zip(*values)
    bars = ax.bar(range(len(values)), speeds, color="tab:blue")
    ax.bar_label(bars, fmt="%.0f", fontsize="small")
    ax.set_xticks(range(len(values)), names, rotation=30, ha="right")
    ax.set_xlabel("run")
    ax.set_ylabel("training images per second")
    ax.set_title("Training throughput")
    return fig


def plot_f1_vs_cost(points: list[tuple[str, float, float]]) -> Figure | None:
    """Species macro-F1 against device-hours, one labelled point per run."""
    if not points:
        return None
    fig, (ax,) = new_figure(7, 4.5)
    for name, hours, f1 in points:
        ax.scatter([hours], [100 * f1])
        ax.annotate(name, (hours, 100 * f1), textcoords="offset points", xytext=(4, 4),
                    fontsize="small")
    ax.set_xlabel("training cost (device-hours)")
    ax.set_ylabel("species macro-F1 (%)")
    ax.set_title("Macro-F1 against cost")
    ax.margins(0.15)
    return fig


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
