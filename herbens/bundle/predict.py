"""``herbens predict BUNDLE INPUT -o predictions.csv``: name new specimens from a bundle alone.

INPUT is an image, a folder (searched recursively for image files) or a CSV / text list of
paths. Each member predicts the images with its own test-time views and data config, exactly
as ``herbens infer`` does (same decoding, same view averaging, logits rounded to float16 as the
logits store keeps them); :mod:`herbens.bundle.scoring` combines the members as ``herbens
ensemble`` does; :mod:`herbens.bundle.thresholds` decides species / genus / family / unknown.
Unreadable images are reported one per line and the others still predicted (exit status 1).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from herbens.bundle import thresholds as th
from herbens.bundle.collection import (
    DEFAULT_BLOCK,
    FORMAT_VERSION,
    InputList,
    Processes,
    bundle_digest,
    check_parts,
    open_parts,
    parts_dir,
    predict_blocks,
    remove_parts,
    shard_path,
)
from herbens.bundle.distance import combined_distance
from herbens.bundle.load import load_bundle
from herbens.bundle.merge import (
    DEFAULT_PAGE_CAP,
    OUTPUT_FORMATS,
    PageSample,
    count_predicted,
    finite,
    output_writer,
    report_failures,
    shard_items,
)
from herbens.bundle.naming import decision_fields, is_enrolled
from herbens.bundle.page import write_page
from herbens.bundle.scoring import combine_members, needed_levels
from herbens.bundle.sheet_embeddings import array_name, check_embeddings_folder, write_sheet_embeddings
from herbens.core.errors import HerbensError
from herbens.core.progress import progress_bar
from herbens.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MIN_IMAGE_SIDE
from herbens.data.loaders import paths_loader
from herbens.ensemble.combine import top_k_columns
from herbens.infer.loop import Engine, predict_batches


# ----------------------------------------------------------------------------------------
# Member logits
# ----------------------------------------------------------------------------------------
def member_logits(member, paths: list[str], classes: dict[str, int], batch_size: int, device: str,
                  workers: int, progress: Callable, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                  embeddings: bool = False, min_side: int = DEFAULT_MIN_IMAGE_SIDE) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Per-level logits ``[n, C]`` of one member (rows of failed images stay NaN) and the errors
    by row; with ``embeddings`` also ``"embedding"``: unit ``[n, D]`` (views combined as the
    embeddings store combines them).

    Predicted by the one loop of ``herbens infer`` (:func:`herbens.infer.loop.predict_batches`)
    with the member's own views, data config and precision; ``progress(n)`` after each batch.
    """
    # Pinned host memory lets the copy to a GPU overlap the next batch's decoding.
    loader = paths_loader(paths, member.tta, member.data_config, batch_size, workers, max_pixels,
                          pin_memory=torch.device(device).type == "cuda", min_side=min_side)
    out = {lv: np.full((len(paths), n), np.nan, dtype=np.float32) for lv, n in classes.items()}
    errors: dict[int, str] = {}
    for index, record in predict_batches(Engine.local(device, member.precision), member.model, loader,
                                         tuple(classes), space=member.tta.space, embedding=embeddings):
        errors.update(record["errors"])
        if len(index):
            for lv in classes:
                # float16 rounding as in the logits store, so the bundle predicts what
                # `herbens infer` + `herbens ensemble` predict for the same images.
                out[lv][index] = record[lv].astype(np.float16).astype(np.float32)
            if embeddings:
                emb = record["embedding"]
                out.setdefault("embedding", np.full((len(paths), emb.shape[-1]), np.nan, dtype=np.float32))
                out["embedding"][index] = emb
        progress(len(index) + len(record["errors"]))
    return out, errors


# ----------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------
@dataclass
class Predictions:
    """Per predicted image: its path, top-k species, best genus/family, decision."""

    paths: list[str]
    top_species: np.ndarray       # [n, k] species columns = rows of names.csv (enrolled ones last)
    top_probs: np.ndarray         # [n, k]
    rows: th.RowSummary
    decisions: np.ndarray
    failures: list[tuple[str, str]]
    embeddings: list[np.ndarray] | None = None  # per member, unit float32 [n, D] (keep_embeddings)


class Block(NamedTuple):
    """One block of predicted paths (:func:`block_probabilities`)."""

    start: int                      # index of the block's first path
    good: np.ndarray                # the block's rows (0-based) every member could read
    probs: object                   # their LevelProbabilities (None when no row was readable)
    errors: dict[int, str]          # row -> message for the others
    embeddings: list[np.ndarray] | None = None  # per member, unit float32 [len(good), D] (keep_embeddings)


def block_probabilities(bundle, paths: list[str], *, batch_size: int = 32, device: str = "cpu", workers: int = 0,
                        block: int = 1024, progress: bool = True, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                        min_side: int = DEFAULT_MIN_IMAGE_SIDE, keep_embeddings: bool = False) -> Iterator[Block]:
    """Yield a :class:`Block` per ``block`` paths: the probabilities of its readable rows, the
    errors of the others and, with ``keep_embeddings``, each member's embeddings of the readable
    rows. Memory holds one block per member.
    """

    levels = needed_levels(bundle.params)
    classes = {lv: bundle.taxonomy.num_classes(lv) for lv in levels}
    bar = progress_bar(total=len(paths) * len(bundle.members), desc="predict", unit="img", enabled=progress)
    enrolment = bundle.enrolment
    embeddings = keep_embeddings or enrolment is not None or bundle.ood_banks is not None
    for start in range(0, len(paths), block):
        part = paths[start:start + block]
        logits, errors = [], {}
        for member in bundle.members:
            out, failed = member_logits(member, part, classes, batch_size, device, workers, bar.update, max_pixels,
                                        embeddings=embeddings, min_side=min_side)
            logits.append(out)
            for i, message in failed.items():
                errors.setdefault(i, message)
        good = np.array([i for i in range(len(part)) if i not in errors], dtype=np.int64)
        if not len(good):
            yield Block(start, good, None, errors, [] if keep_embeddings else None)
            continue
        probs = combine_members([{lv: m[lv][good] for lv in levels} for m in logits], bundle.params, bundle.space)
        member_embeddings = [m["embedding"][good] for m in logits] if embeddings else None
        if enrolment is not None:
            # Enrolled species: prototype scores fused with the combined head (herbens.bundle.enrolment).
            probs = enrolment.fuse(probs, member_embeddings)
        if bundle.ood_banks is not None:
            # The knn OOD score: distance to each member's training embeddings (herbens.bundle.distance).
            probs = replace(probs, distance=combined_distance(member_embeddings, bundle.ood_banks))
        yield Block(start, good, probs, errors, member_embeddings if keep_embeddings else None)
    bar.close()


def check_predict_options(top_k: int, batch_size: int, workers: int, block: int, max_pixels: int | None,
                          min_side: int = DEFAULT_MIN_IMAGE_SIDE) -> None:
    """Refuse numeric options torch would reject deep inside the loader (or silently misuse)."""
    least = {"top_k (--top-k)": (top_k, 1), "batch_size (--batch-size)": (batch_size, 1),
             "workers (--workers)": (workers, 0), "block": (block, 1)}
    if max_pixels is not None:
        least["max_pixels (--max-image-pixels)"] = (max_pixels, 1)
    least["min_side (--min-image-size)"] = (min_side, 0)
    for name, (value, lowest) in least.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise HerbensError(f"predict: {name} must be an integer of at least {lowest}, got {value!r}")


def predict_paths(bundle, paths: list[str], *, top_k: int = 5, batch_size: int = 32, device: str = "cpu",
                  workers: int = 0, block: int = 1024, progress: bool = True,
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, min_side: int = DEFAULT_MIN_IMAGE_SIDE,
                  keep_embeddings: bool = False) -> Predictions:
    """Predict every readable image of ``paths`` with the bundle, in blocks of ``block`` images
    (with ``keep_embeddings`` also each member's embeddings of them)."""

    check_predict_options(top_k, batch_size, workers, block, max_pixels, min_side)
    kept, tops, probs, rows, failures = [], [], [], [], {}
    embeddings = [[] for _ in bundle.members]
    for part in block_probabilities(bundle, paths, batch_size=batch_size, device=device, workers=workers, block=block,
                                    progress=progress, max_pixels=max_pixels, min_side=min_side,
                                    keep_embeddings=keep_embeddings):
        failures.update({part.start + i: message for i, message in part.errors.items()})
        if part.probs is None:
            continue
        top = top_k_columns(part.probs.scores, top_k)
        kept += [paths[part.start + i] for i in part.good]
        tops.append(top)  # a bundle's columns are its taxonomy's order, the rows of names.csv
        probs.append(np.take_along_axis(part.probs.species, top, axis=1))
        rows.append(th.summarize(part.probs, bundle.ood_score))
        for mine, block_embeddings in zip(embeddings, part.embeddings or []):
            mine.append(block_embeddings)
    failure_list = [(paths[i], failures[i]) for i in sorted(failures)]
    if not kept:
        return Predictions([], np.zeros((0, top_k), np.int64), np.zeros((0, top_k)), None, np.array([]), failure_list)
    summary = th.RowSummary.concat(rows)
    return Predictions(kept, np.concatenate(tops), np.concatenate(probs), summary,
                       th.decide(summary, bundle.thresholds), failure_list,
                       [np.concatenate(m) for m in embeddings] if keep_embeddings else None)


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------
def records(bundle, pred: Predictions) -> list[dict]:
    """One JSON-ready dict per image: the decided ``name``, ``rank`` and ``reason`` first
    (:mod:`herbens.bundle.naming`), then the top-k species and the best genus and family."""
    genera, families = bundle.level_names("genus"), bundle.level_names("family")
    # Plain lists: indexing the names frame per species and image cost ~1 ms per image, more
    # than a small member's forward pass.
    category_ids, scientific, authors = (bundle.names[c].tolist() for c in ("category_id", "scientific_name", "authors"))
    out = []
    for i, (path, fields) in enumerate(zip(pred.paths, decision_fields(bundle, pred.rows, pred.decisions))):
        species = [{"category_id": int(category_ids[s]), "scientific_name": scientific[s],
                    "authors": authors[s], "probability": float(p), "enrolled": is_enrolled(bundle, s)}
                   for s, p in zip(pred.top_species[i], pred.top_probs[i])]
        out.append({"path": path, **fields, "decision": pred.decisions[i], "species": species,
                    "genus": genera[pred.rows.top["genus"][i]],
                    "genus_probability": float(pred.rows.confidence["genus"][i]),
                    "family": families[pred.rows.top["family"][i]],
                    "family_probability": float(pred.rows.confidence["family"][i]),
                    "ood_score": float(pred.rows.ood[i])})
    return out


def predict_command(bundle_path, source, output, *, fmt: str = "csv", html: Path | None = None, top_k: int = 5,
                    batch_size: int = 32, device: str | None = None, workers: int = 0, progress: bool = True,
                    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, min_side: int = DEFAULT_MIN_IMAGE_SIDE,
                    block: int = DEFAULT_BLOCK, page_cap: int = DEFAULT_PAGE_CAP, embeddings: Path | None = None,
                    log: Callable[[str], None] = print) -> int:
    """Everything ``herbens predict`` does; returns the exit status (1 when some image failed).

    Streams the input in blocks of ``block`` paths into resumable shards beside ``output`` and
    merges them at the end (:mod:`herbens.bundle.collection`); under torchrun or ``accelerate
    launch`` every process predicts its own blocks and the first one merges. ``device`` None:
    the accelerator when present. ``page_cap``: most cards on the HTML page. ``min_side``: images
    with a shorter side are refused as too small to be specimen images (0: no minimum).
    ``embeddings``: a folder for every member's embeddings of the predicted sheets
    (:mod:`herbens.bundle.sheet_embeddings`).
    """
    check_predict_options(top_k, batch_size, workers, block, max_pixels, min_side)
    if fmt not in OUTPUT_FORMATS:
        raise HerbensError(f"predict: format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    if isinstance(page_cap, bool) or not isinstance(page_cap, int) or page_cap < 1:
        raise HerbensError(f"predict: page_cap (--page-cap) must be an integer of at least 1, got {page_cap!r}")
    with Processes(device) as procs:
        if procs.device.startswith("cuda") and not torch.cuda.is_available():
            raise HerbensError("--device cuda: no CUDA device is available")
        bundle = load_bundle(bundle_path, device=procs.device)
        inputs, output = InputList(source), Path(output)
        work = parts_dir(output)
        made_from = {"format": FORMAT_VERSION, "bundle": bundle_digest(bundle), "input": inputs.digest(),
                     "block": block, "top_k": top_k, "max_pixels": max_pixels,
                     "min_side": min_side}
        if embeddings is not None:
            check_embeddings_folder(Path(embeddings))
            made_from["embeddings"] = True  # shards made without them lack the arrays
        check_parts(work, made_from)  # every process refuses alike, before any waits for the others
        if procs.is_main:
            open_parts(work, made_from)
        procs.barrier()

        def predict(part: list[str]) -> tuple[list[dict], dict[str, str], dict[str, np.ndarray]]:
            pred = predict_paths(bundle, part, top_k=top_k, batch_size=batch_size, device=procs.device, workers=workers,
                                 block=len(part), progress=False, max_pixels=max_pixels, min_side=min_side,
                                 keep_embeddings=embeddings is not None)
            arrays = {array_name(m.name): e for m, e in zip(bundle.members, pred.embeddings or [])}
            return (records(bundle, pred) if pred.paths else []), dict(pred.failures), arrays

        blocks = procs.run_everywhere(lambda: predict_blocks(predict, inputs, work, block, procs, progress),
                                      "predicting its blocks (rerun the same command to resume)")
        if not procs.is_main:
            return 0
        shards = [shard_path(work, b) for b in range(blocks)]
        return _merge(bundle, source, inputs, shards, output, fmt, html, top_k, page_cap, log,
                      None if embeddings is None else Path(embeddings), made_from, progress)


def _merge(bundle, source, inputs: InputList, shards: list[Path], output: Path, fmt: str, html: Path | None,
           top_k: int, page_cap: int, log: Callable[[str], None], embeddings: Path | None, made_from: dict,
           progress: bool) -> int:
    """Merge the shards into ``output`` (and the page) and, into the folder ``embeddings``, the
    members' embeddings; report, and remove the parts folder.

    The embeddings are written first: a kill before the parts folder is removed leaves it for
    the rerun, which merges again."""
    for path, reason in inputs.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    work = shards[0].parent if shards else None
    if not count_predicted(shards):
        failed = 0
        for _, failures in shard_items(shards):
            report_failures(failures)
            failed += len(failures)
        remove_parts(work)
        raise HerbensError(f"{source}: none of the {failed} image(s) could be read (each failure is "
                           f"listed above); nothing written")
    if embeddings is not None:
        rows = write_sheet_embeddings(embeddings, bundle, shards, made_from, output, progress)
        log(f"wrote {embeddings}: the embeddings of {rows} sheet(s) by {len(bundle.members)} member(s)")
    sample = PageSample(page_cap)
    with output_writer(output, fmt, top_k, bundle, finite(bundle.thresholds)) as write:
        for items, failures in shard_items(shards):
            report_failures(failures)
            write([item for _, item in items], failures)
            sample.add(items, failures)
    if html is not None:
        items, failures, counts, note = sample.shown(output)
        write_page(Path(html), items, bundle, failures, counts=counts, note=note)
    remove_parts(work)
    counts = {d: sample.counts.get(d, 0) for d in th.DECISIONS}
    log(f"wrote {output}: {sum(sample.counts.values())} image(s) predicted ("
        + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"), {sample.failed} unreadable"
        + (f", {len(inputs.skipped)} non-image file(s) skipped" if inputs.skipped else ""))
    return 1 if sample.failed else 0
