"""Plain-text tables of scores (percent with standard errors), as ``herbens evaluate`` and
``herbens report`` print them."""

from __future__ import annotations


SUMMARY_COLUMNS = (
    ("n_images", "images"), ("species_macro_f1", "sp F1"), ("species_accuracy", "sp acc"),
    ("genus_macro_f1", "gen F1"), ("genus_accuracy", "gen acc"), ("family_macro_f1", "fam F1"),
    ("family_accuracy", "fam acc"), ("head_macro_f1", "head F1"), ("tail_macro_f1", "tail F1"),
)


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _pct_se(value, se) -> str:
    # A single species or image has no standard error: show the value alone, not "+- nan".
    return pct(value) if se is None else f"{pct(value)} +- {pct(se)}"


def format_summary(results: list[tuple[str, dict]]) -> str:
    """Side-by-side table: one row per input, scores in percent."""
    header = ["input"] + [label for _, label in SUMMARY_COLUMNS]
    rows = [[name] + [str(m[key]) if key == "n_images" else pct(m.get(key))
                      for key, _ in SUMMARY_COLUMNS] for name, m in results]
    return format_rows(header, rows)


def format_rows(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_group_table(records: list[dict], level: str) -> str:
    """Best or worst family/genus table: name, scored images (the split the caller names), training images, accuracy +- SE."""
    rows = [[r["name"], str(r["n_images"]), str(r["train_images"]),
             _pct_se(r["accuracy"], r["se"])] for r in records]
    return format_rows([level, "images", "train", "accuracy %"], rows)


def format_bins(records: list[dict]) -> str:
    """Accuracy by training-image bin: mean per-species accuracy +- SE of that mean."""
    rows = [[r["bin"], str(r["n_species"]), str(r["n_images"]),
             _pct_se(r["accuracy"], r["se"])] for r in records]
    return format_rows(["train images", "species", "images", "accuracy %"], rows)


def format_anova(anova: dict) -> str:
    """One line per level: F, p and degrees of freedom."""
    lines = []
    for level, a in anova.items():
        f = "nan" if a["F"] is None else f"{a['F']:.4g}"
        p = "nan" if a["p"] is None else f"{a['p']:.3g}"
        extra = f"  ({a['note']})" if a.get("note") else ""
        lines.append(f"ANOVA of correctness across {level}: F({a['df_between']}, {a['df_within']})"
                     f" = {f}, p = {p}{extra}")
    return "\n".join(lines)


def format_detail(name: str, metrics: dict) -> str:
    """Per-family best/worst tables, training-count bins and ANOVA of one input."""
    k = len(metrics["family_best"])
    parts = [f"== {name} ==",
             f"Best {k} families (species accuracy)", format_group_table(metrics["family_best"], "family"),
             f"Worst {k} families", format_group_table(metrics["family_worst"], "family"),
             f"Accuracy by training images per species (counts: {metrics['training_counts']})",
             format_bins(metrics["by_training_count"]),
             format_anova(metrics["anova"])]
    return "\n\n".join(parts)
