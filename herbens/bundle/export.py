"""``herbens export RUN_OR_ENSEMBLE_JSON -o bundles/NAME``: a self-contained model bundle.

The source is a run directory (a one-member bundle) or the JSON record ``herbens ensemble``
writes beside its CSV (one member per run, with the fitted combination). The back-off and
open-set thresholds are fitted here, on the members' labelled validation logits combined
exactly as at prediction time (:mod:`herbens.bundle.scoring`). The layout is described in
:mod:`herbens.bundle.load`; the folder is written atomically, the manifest last.
"""

from __future__ import annotations

import platform
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from safetensors import SafetensorError
from safetensors.torch import save_model

from herbens.bundle import distance
from herbens.bundle import thresholds as th
from herbens.bundle.load import (
    DATA_CONFIG,
    FORMAT_VERSION,
    ONNX,
    RECIPE,
    WEIGHTS,
    check_export_target,
    load_bundle,
    write_manifest,
)
from herbens.bundle.onnx_card import check_onnx_extra, onnx_section
from herbens.bundle.onnx_export import export_onnx
from herbens.bundle.prototype_export import export_prototypes
from herbens.bundle.scoring import combine_members, needed_levels, params_record
from herbens.bundle.sources import resolve_source
from herbens.config import load_run_config, save_config
from herbens.core.errors import HerbensError
from herbens.core.fileio import (
    atomic_dir,
    atomic_write,
    exclusive_lock,
    read_json,
    write_json,
)
from herbens.data.metadata import find_dataset
from herbens.data.taxonomy import LEVELS, Taxonomy
from herbens.data.transforms import model_data_config
from herbens.ensemble.stores import (
    align_split,
    auto_chunk_rows,
    class_space,
    labelled,
    load_runs,
)
from herbens.infer.run import load_run_model
from herbens.metrics import level_scores
from herbens.stores.logits import read_logits

AUTO_OOD = "auto"  # the default OOD score: knn when every member run has embeddings, else msp


# ----------------------------------------------------------------------------------------
# Validation rows: scores, thresholds
# ----------------------------------------------------------------------------------------
def combined_chunks(run_dirs: list[Path], params, split: str = "val", *, labelled_only: bool = True):
    """Yield ``(LevelProbabilities, species labels or None)`` per chunk of a split's rows common
    to the members, combined as a bundle combines them; with ``labelled_only`` only labelled
    rows (an error when there are none)."""

    runs = load_runs(run_dirs, splits=(split,))
    missing = [run for run in runs if split not in run.splits]
    if missing:
        raise HerbensError(f"run '{missing[0].path}': no logits/{split}, needed to fit the bundle's thresholds")
    space = class_space(runs)
    rows = align_split(runs, split, space, exact=False, log=lambda _: None)
    if labelled_only:
        if rows.labels is None or not (rows.labels >= 0).any():
            raise HerbensError(f"run '{runs[0].path}': logits/{split} carry no labels, needed to fit thresholds")
        rows = labelled(rows)
    levels = needed_levels(params)
    for chunk in rows.chunks(auto_chunk_rows(space.num_classes), levels=levels):
        members = [{lv: chunk.get(r, lv) for lv in levels} for r in range(len(runs))]
        yield combine_members(members, params, space), chunk.labels


def split_rows(run_dirs: list[Path], params, ood_score: str, split: str = "val", *, labelled_only: bool = True):
    """A split's rows common to the members, combined as a bundle combines them, chunk by chunk.

    Returns:
        ``(RowSummary, species labels or None)``; with ``labelled_only`` only labelled rows
        (an error when there are none).
    """
    parts, labels = [], []
    for probs, chunk_labels in combined_chunks(run_dirs, params, split, labelled_only=labelled_only):
        parts.append(th.summarize(probs, ood_score))
        labels.append(chunk_labels)
    return th.RowSummary.concat(parts), (None if labels[0] is None else np.concatenate(labels))


def row_image_ids(run_dirs: list[Path], split: str = "val") -> list[str]:
    """The image ids of :func:`combined_chunks`' labelled rows, in their order."""

    runs = load_runs(run_dirs, splits=(split,))
    return labelled(align_split(runs, split, class_space(runs), exact=False, log=lambda _: None)).image_ids


def validation_rows_with_ood(run_dirs: list[Path], params, taxonomy: Taxonomy, ood_score: str, seed: int):
    """:func:`validation_rows` with the chosen OOD score, the members' OOD banks and every
    available score of the known validation rows.

    Returns:
        ``(rows, truth, labels, banks, val_ood)``: ``banks`` None when some run lacks train/val
        embeddings (then no ``knn``); ``val_ood`` ``{score: [n]}`` for msp, energy (and knn):
        export stores every score's threshold, for the far-unknown report beside the chosen one.
    """
    has_embeddings = distance.has_embeddings(run_dirs)
    if ood_score == "knn" and not has_embeddings:
        raise HerbensError("--ood-score knn needs train and val embeddings of every member run "
                           "(herbens infer RUN --embeddings, or train with infer.embeddings=true)")
    rows, truth, labels = validation_rows(run_dirs, params, taxonomy, "msp")
    val_ood = {"msp": rows.ood, "energy": split_rows(run_dirs, params, "energy", "val")[0].ood}
    banks = distance.training_banks(run_dirs, taxonomy, seed) if has_embeddings else None
    if banks is not None:
        ids = row_image_ids(run_dirs, "val")
        val_ood["knn"] = -distance.split_distance(run_dirs, banks, "val", ids, taxonomy)
    return replace(rows, ood=val_ood[ood_score]), truth, labels, banks, val_ood


def validation_rows(run_dirs: list[Path], params, taxonomy: Taxonomy, ood_score: str):
    """Labelled validation rows: ``(RowSummary, truth per level, species labels)``."""
    rows, labels = split_rows(run_dirs, params, ood_score, "val")
    truth = {lv: np.asarray(taxonomy.level_indices(lv, labels)) for lv in LEVELS}
    return rows, truth, labels


def _json_thresholds(values: dict) -> dict:
    return {k: (None if not np.isfinite(v) else float(v)) for k, v in values.items()}


# ----------------------------------------------------------------------------------------
# Members
# ----------------------------------------------------------------------------------------
def export_member(run_dir: Path, folder: Path, taxonomy: Taxonomy, onnx: bool, log: Callable) -> dict:
    """Write one member (EMA weights when the run has them); returns its provenance entry."""

    cfg = load_run_config(run_dir)
    if Taxonomy.load(run_dir / "taxonomy.json") != taxonomy:
        raise HerbensError(f"run '{run_dir}': its taxonomy differs from the first member's")
    model = load_run_model(run_dir, cfg, taxonomy).eval()
    folder.mkdir(parents=True)
    _save_weights(model, folder / WEIGHTS)
    save_config(cfg, folder / RECIPE)  # the resolved recipe, upgraded to this version's schema
    data_config = model_data_config(model.data_config, cfg["input"])
    levels = [lv for lv in LEVELS if lv in cfg["levels"]]
    views, tta_space = fitted_views(run_dir, cfg, taxonomy, log)
    write_json(folder / DATA_CONFIG, {
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()},
        "views": views, "tta_space": tta_space,
        "precision": cfg["train"]["precision"], "levels": levels})
    if onnx:

        exporter = export_onnx(model, levels, data_config, folder / ONNX)
        log(f"member {folder.name}: ONNX graph written ({exporter} exporter, checked against PyTorch)")
    metrics = run_dir / "metrics.json"
    graph = {"exporter": exporter, "outputs": levels,
             **{k: _plain(data_config[k]) for k in ("mean", "std", "interpolation", "crop_pct")}} if onnx else None
    return {"name": folder.name, "onnx": graph, "run": str(run_dir), "backbone": cfg["model"]["backbone"],
            "weights": "ema" if (run_dir / "model_ema.pt").exists() else "final",
            "git_revision": _provenance(run_dir).get("git_revision"), "views": views,
            "input_size": list(data_config["input_size"]),
            "val": read_json(metrics).get("val", {}) if metrics.exists() else {},
            "data_root": cfg["data"]["root"]}


def _save_weights(model, path: Path) -> None:
    """The member's safetensors file; a full disk or a write error becomes one line naming it."""

    try:
        save_model(model, str(path))
    except (SafetensorError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = " (the disk is full or the file size limit is reached)" if "too large" in reason.lower() \
            or "no space" in reason.lower() else ""
        raise HerbensError(f"cannot write {path}: {reason}{hint}; the previous bundle, if any, is kept") from None


def fitted_views(run_dir: Path, cfg: dict, taxonomy: Taxonomy, log: Callable) -> tuple[list[str], str]:
    """The test-time views and ``tta_space`` of the validation logits the ensemble and the
    thresholds were fitted on: the bundle must predict with them, whatever the recipe says
    (``herbens infer RUN --tta ...`` changes the views of the logits, not the recipe).

    A store written before ``tta_space`` was recorded falls back to the recipe's, said in the log.
    """
    recorded = read_logits(run_dir, "val", taxonomy=taxonomy).description
    views, space = list(recorded.views), recorded.tta_space
    if not views or space is None:
        log(f"note: run '{run_dir}': its val logits do not record their views and tta_space; the bundle "
            "uses the recipe's infer.tta and infer.tta_space")
        views, space = views or list(cfg["infer"]["tta"]), space or cfg["infer"]["tta_space"]
    return views, space


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _provenance(run_dir: Path) -> dict:
    """What produced a run (``provenance.json``; empty for runs of older versions)."""
    path = run_dir / "provenance.json"
    return read_json(path) if path.exists() else {}


def names_table(taxonomy: Taxonomy, data_root: str | None, log: Callable) -> pd.DataFrame:
    """Scientific name, authors, genus and family per species (authors from the metadata's
    categories when it can still be read, else empty)."""
    authors = _authors(data_root, log)
    return pd.DataFrame({
        "category_id": taxonomy.category_ids,
        "scientific_name": taxonomy.species_names,
        "authors": [authors.get(int(c), "") for c in taxonomy.category_ids],
        "genus": [taxonomy.genus_names[g] for g in taxonomy.species_to_genus],
        "family": [taxonomy.family_names[f] for f in taxonomy.species_to_family],
    })


def _authors(data_root: str | None, log: Callable) -> dict[int, str]:

    try:
        train_file, _ = find_dataset(Path(data_root or ""))
        categories = read_json(train_file).get("categories", [])
    except (HerbensError, AttributeError):
        log("note: training metadata not found; the bundle's names table has no authors")
        return {}
    return {int(c.get("category_id", c.get("id"))): str(c.get("authors") or "") for c in categories
            if isinstance(c, dict) and ("category_id" in c or "id" in c)}


# ----------------------------------------------------------------------------------------
# The whole export
# ----------------------------------------------------------------------------------------
def _check_request(out: Path, overwrite: bool, onnx: bool, ood_score: str) -> None:
    """What can be refused before any work: the OOD score, the output folder, the onnx extra."""
    if ood_score not in (AUTO_OOD, *th.OOD_SCORES):
        raise HerbensError(f"unknown OOD score {ood_score!r}; expected one of {AUTO_OOD}, {', '.join(th.OOD_SCORES)}")
    check_export_target(out, overwrite)
    if onnx:
        check_onnx_extra()


def choose_ood_score(requested: str, run_dirs: list[Path], log: Callable) -> str:
    """``auto``: knn when every member run has train and val embeddings (it alone flags sheets
    that are not specimens), else msp, with a line saying why."""
    if requested != AUTO_OOD:
        return requested
    lacking = [run for run in run_dirs if not distance.has_embeddings([run])]
    if not lacking:
        return "knn"
    log(f"note: OOD score msp, not knn: run '{lacking[0]}' has no train/val embeddings "
        "(herbens infer RUN --embeddings, or train with infer.embeddings=true)")
    return "msp"


def export_bundle(source: str | Path, out: str | Path, *, onnx: bool = False, target_precision: float = 0.95,
                  ood_score: str = AUTO_OOD, ood_keep: float = 0.95, folds: int = 2, seed: int = 0,
                  overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Export a run or an ensemble into a self-contained bundle folder.

    Args:
        source: a run directory or an ensemble's JSON record (or its CSV, the JSON beside it).
        out: the bundle folder: new, empty, or (with ``overwrite``) a bundle, replaced atomically.
            Any other existing folder is refused: export never destroys what it did not write.
        onnx: also write one ONNX graph per member, checked against PyTorch with onnxruntime.
        target_precision: precision each back-off level's threshold must reach on validation.
        ood_score: ``msp``, ``energy``, ``knn`` or ``auto`` (knn when every run has embeddings,
            else msp); ``ood_keep``: share of known validation images kept.
        folds: cross-fitting folds for the out-of-sample threshold report.

    Returns:
        The bundle folder.
    """

    out = Path(out)
    _check_request(out, overwrite, onnx, ood_score)
    run_dirs, params, record = resolve_source(source)
    ood_score = choose_ood_score(ood_score, run_dirs, log)
    taxonomy = Taxonomy.load(run_dirs[0] / "taxonomy.json")
    rows, truth, labels, banks, val_ood = validation_rows_with_ood(run_dirs, params, taxonomy, ood_score, seed)
    fitted = th.cross_fit(rows, truth, target_precision, ood_keep, folds, seed)
    fitted["ood_thresholds"] = {kind: th.ood_threshold(values, ood_keep) for kind, values in val_ood.items()}
    log(th.format_report(fitted))
    val_scores = level_scores(labels, rows.top["species"], taxonomy)
    with exclusive_lock(out, on_wait=log), atomic_dir(out) as tmp:
        check_export_target(out, overwrite)  # again, now that no other writer can change it
        folders = [tmp / "members" / f"m{i}_{run.name}" for i, run in enumerate(run_dirs)]
        members = [export_member(run, folder, taxonomy, onnx, log) for run, folder in zip(run_dirs, folders)]
        for folder, bank in zip(folders, banks or []):
            distance.save_bank(folder, bank)
        enrolment = export_prototypes(run_dirs, folders, combined_chunks(run_dirs, params, "val"), taxonomy, log, seed)
        taxonomy.save(tmp / "taxonomy.json")
        frame = names_table(taxonomy, members[0]["data_root"], log)
        with atomic_write(tmp / "names.csv", newline="") as handle:
            frame.to_csv(handle, index=False)
        bundle = {
            "format_version": FORMAT_VERSION,
            "name": out.name,
            "members": [m["name"] for m in members],
            "taxonomy_hash": taxonomy.hash,
            "ensemble": params_record(params),
            "thresholds": {**fitted, "thresholds": _json_thresholds(fitted["thresholds"]), "ood_score": ood_score},
            "ood_bank": distance.bank_record(banks),
            "val_scores": val_scores,
            "enrolment": enrolment,
            "provenance": {"source": str(source), "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "python": platform.python_version(), "members": members,
                           "ensemble_val": (record or {}).get("val")},
        }
        write_json(tmp / "bundle.json", bundle)
        (tmp / "README.md").write_text(model_card(bundle, taxonomy))
        write_manifest(tmp)
        load_bundle(tmp)  # refuse to publish a bundle that does not load
    log(f"wrote bundle {out} ({len(members)} member(s), {taxonomy.num_classes('species')} species)")
    return out


def model_card(bundle: dict, taxonomy: Taxonomy) -> str:
    """The bundle's README: what it was trained on, scores per level, intended use and limits."""
    members = bundle["provenance"]["members"]
    fit = bundle["thresholds"]
    scores = bundle["val_scores"]
    lines = [f"# Model card: {bundle['name']}", "",
             f"herbens bundle of {len(members)} member(s) naming herbarium specimens among "
             f"{taxonomy.num_classes('species')} species, {taxonomy.num_classes('genus')} genera and "
             f"{taxonomy.num_classes('family')} families ({int(taxonomy.counts.sum())} training images; "
             f"taxonomy {taxonomy.hash}).", "", "## Members", "",
             "| member | backbone | input | views | weights | git revision |", "|---|---|---|---|---|---|"]
    for m in members:
        lines.append(f"| {m['name']} | {m['backbone']} | {m['input_size'][1]}x{m['input_size'][2]} | "
                     f"{' '.join(m['views'])} | {m['weights']} | {m['git_revision'] or '-'} |")
    lines += ["", f"Trained on: {members[0]['data_root']}.", "",
              "## Validation scores (the bundle's combined prediction, in sample for fitted ensemble values)", "",
              "| level | macro-F1 | accuracy |", "|---|---|---|"]
    for lv in LEVELS:
        lines.append(f"| {lv} | {scores.get(f'{lv}_macro_f1', float('nan')):.4f} | "
                     f"{scores.get(f'{lv}_accuracy', float('nan')):.4f} |")
    lines += ["", "## Back-off and open set", "", "```", th.format_report(
        {**fit, "thresholds": {k: (np.inf if v is None else v) for k, v in fit["thresholds"].items()}}), "```", "",
        *onnx_section(members), "## Intended use", "",
        "Suggesting names for newly digitised herbarium sheets of the flora it was trained on, for a "
        "botanist to confirm. A species is named only when its probability reaches the species "
        "threshold; otherwise the genus or family alone, or unknown.", "",
        "## Limits", "",
        "- It only knows the species listed in names.csv: a sheet of any other species gets one of "
        "them or, at best, `unknown` (the OOD flag catches only part of them; measure it with `herbens openset`).",
        "- Thresholds were fitted on the validation split; precision on another collection (other "
        "institutions, imaging, regions) may be lower.",
        "- Rare species (few training images) are named less reliably than common ones.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
