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
from typing import Callable

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


def block_probabilities(bundle, paths: list[str], *, batch_size: int = 32, device: str = "cpu", workers: int = 0,
                        block: int = 1024, progress: bool = True, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                        min_side: int = DEFAULT_MIN_IMAGE_SIDE):
    """Yield ``(start, good, probabilities, errors)`` per block of ``block`` paths.

    ``good`` are the block's rows (0-based within the block) every member could read,
    ``probabilities`` their :class:`herbens.bundle.scoring.LevelProbabilities` and ``errors``
    ``{row: message}`` for the others. Memory holds one block per member.
    """

    levels = needed_levels(bundle.params)
    classes = {lv: bundle.taxonomy.num_classes(lv) for lv in levels}
    bar = progress_bar(total=len(paths) * len(bundle.members), desc="predict", unit="img", enabled=progress)
    enrolment = bundle.enrolment
    embeddings = enrolment is not None or bundle.ood_banks is not None
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
        probs = combine_members([{lv: m[lv][good] for lv in levels} for m in logits], bundle.params, bundle.space) \
            if len(good) else None
        if probs is not None and enrolment is not None:
            # Enrolled species: prototype scores fused with the combined head (herbens.bundle.enrolment).
            probs = enrolment.fuse(probs, [m["embedding"][good] for m in logits])
        if probs is not None and bundle.ood_banks is not None:
            # The knn OOD score: distance to each member's training embeddings (herbens.bundle.distance).
            probs = replace(probs, distance=combined_distance([m["embedding"][good] for m in logits], bundle.ood_banks))
        yield start, good, probs, errors
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
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS, min_side: int = DEFAULT_MIN_IMAGE_SIDE) -> Predictions:
    """Predict every readable image of ``paths`` with the bundle, in blocks of ``block`` images."""

    check_predict_options(top_k, batch_size, workers, block, max_pixels, min_side)
    kept, tops, probs, rows, failures = [], [], [], [], {}
    for start, good, level_probs, errors in block_probabilities(bundle, paths, batch_size=batch_size, device=device,
                                                               workers=workers, block=block, progress=progress,
                                                               max_pixels=max_pixels, min_side=min_side):
        failures.update({start + i: message for i, message in errors.items()})
        if level_probs is None:
            continue
        top = top_k_columns(level_probs.scores, top_k)
        kept += [paths[start + i] for i in good]
        tops.append(top)  # a bundle's columns are its taxonomy's order, the rows of names.csv
        probs.append(np.take_along_axis(level_probs.species, top, axis=1))
        rows.append(th.summarize(level_probs, bundle.ood_score))
    failure_list = [(paths[i], failures[i]) for i in sorted(failures)]
    if not kept:
        return Predictions([], np.zeros((0, top_k), np.int64), np.zeros((0, top_k)), None, np.array([]), failure_list)
    summary = th.RowSummary.concat(rows)
    return Predictions(kept, np.concatenate(tops), np.concatenate(probs), summary,
                       th.decide(summary, bundle.thresholds), failure_list)


# ----------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------
def records(bundle, pred: Predictions) -> list[dict]:
    """One JSON-ready dict per image: the decided ``name``, ``rank`` and ``reason`` first
    (:mod:`herbens.bundle.naming`), then the top-k species and the best genus and family."""
    names, genera, families = bundle.names, bundle.level_names("genus"), bundle.level_names("family")
    out = []
    for i, (path, fields) in enumerate(zip(pred.paths, decision_fields(bundle, pred.rows, pred.decisions))):
        species = [{"category_id": int(names.category_id[s]), "scientific_name": names.scientific_name[s],
                    "authors": names.authors[s], "probability": float(p), "enrolled": is_enrolled(bundle, s)}
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
                    block: int = DEFAULT_BLOCK,
                    page_cap: int = DEFAULT_PAGE_CAP, log: Callable[[str], None] = print) -> int:
    """Everything ``herbens predict`` does; returns the exit status (1 when some image failed).

    Streams the input in blocks of ``block`` paths into resumable shards beside ``output`` and
    merges them at the end (:mod:`herbens.bundle.collection`); under torchrun or ``accelerate
    launch`` every process predicts its own blocks and the first one merges. ``device`` None:
    the accelerator when present. ``page_cap``: most cards on the HTML page. ``min_side``: images
    with a shorter side are refused as too small to be specimen images (0: no minimum).
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
        check_parts(work, made_from)  # every process refuses alike, before any waits for the others
        if procs.is_main:
            open_parts(work, made_from)
        procs.barrier()

        def predict(part: list[str]) -> tuple[list[dict], dict[str, str]]:
            pred = predict_paths(bundle, part, top_k=top_k, batch_size=batch_size, device=procs.device, workers=workers,
                                 block=len(part), progress=False, max_pixels=max_pixels, min_side=min_side)
            return (records(bundle, pred) if pred.paths else []), dict(pred.failures)

        blocks = procs.run_everywhere(lambda: predict_blocks(predict, inputs, work, block, procs, progress),
                                      "predicting its blocks (rerun the same command to resume)")
        if not procs.is_main:
            return 0
        return _merge(bundle, source, inputs, [shard_path(work, b) for b in range(blocks)], output, fmt, html, top_k,
                      page_cap, log)


def _merge(bundle, source, inputs: InputList, shards: list[Path], output: Path, fmt: str, html: Path | None,
           top_k: int, page_cap: int, log: Callable[[str], None]) -> int:
    """Merge the shards into ``output`` (and the page), report, and remove the parts folder."""
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
