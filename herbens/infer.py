"""Per-level logits of a run's validation and test images, through the logits store.

Called at the end of training with the model in memory, and by ``herbens infer runs/NAME``,
which rebuilds the model from the run's ``config.yaml`` and final weights.
"""

from __future__ import annotations

import argparse
import shlex
import warnings
from pathlib import Path

import numpy as np
import torch

from herbens.data.dataset import BadImageWarning
from herbens.data.loaders import predict_loader
from herbens.data.run_data import RunData, load_run_data
from herbens.data.transforms import build_tta_views, model_data_config, view_row_names
from herbens.engine import predict_batches
from herbens.embeddings import open_embeddings_writer
from herbens.errors import HerbensError
from herbens.logits import UNREADABLE_FALLBACKS, format_ids, open_logits_writer

#: ``infer.bad_images``: what a val/test row whose image cannot be decoded gets (under
#: ``data.bad_images: skip``; ``error`` stops at the image). ``fail``: the split is not written
#: and the error lists every unreadable image; ``prior``: the row holds each level's training
#: log-prior and the store records the image as unreadable (every reader warns and lists it).
INFER_BAD_IMAGES = ("fail", *UNREADABLE_FALLBACKS)


def _split_frame(data: RunData, split: str):
    if split == "train":
        return data.train, data.images_dir, True
    if split == "val":
        return data.val, data.images_dir, True
    if split == "test":
        if data.test is None:
            raise HerbensError("no test metadata found next to the training metadata; cannot infer 'test'")
        return data.test, data.test_images_dir, False
    raise HerbensError(f"unknown split {split!r}; expected train, val or test")


def write_split_logits(accelerator, model, cfg: dict, data: RunData, data_config: dict,
                       run_dir: Path, split: str, views: list[str] | None = None) -> None:
    """Predict every image of ``split`` with test-time views combined and store the logits.

    Batches stream straight into the logits store, so a full test split (210,407 x 15,501
    per level) never sits in memory; the split appears only once every row is written.
    Rows whose image cannot be decoded (``data.bad_images: skip``) follow ``infer.bad_images``:
    ``prior`` stores the training log-prior and records them as unreadable in ``meta.json``;
    ``fail`` raises HerbensError listing them, and nothing is written.
    """
    views = list(views or cfg["infer"]["tta"])
    policy = cfg["infer"]["bad_images"]
    frame, images_dir, labelled = _split_frame(data, split)
    loader = accelerator.prepare(
        predict_loader(frame, images_dir, data.taxonomy if labelled else None,
                       build_tta_views(views, data_config), cfg, data_config=data_config))
    levels = tuple(cfg["levels"])
    keep_views, space = bool(cfg["infer"]["keep_views"]), cfg["infer"]["tta_space"]
    rows = view_row_names(views)
    batches = predict_batches(accelerator, model, loader, levels, desc=f"logits {split}", space=space,
                              keep_views=keep_views)
    ids = frame["image_id"].astype(str).tolist()

    def write(batches) -> None:
        fallback = {level: prior_logits(data.taxonomy, level) for level in levels}
        with open_logits_writer(
                run_dir, split, ids,
                {level: data.taxonomy.num_classes(level) for level in levels},
                {"taxonomy_hash": data.taxonomy.hash, "tta_space": space, "views": rows if keep_views else views,
                 "model": cfg["model"]["backbone"], "split": split},
                labels=data.taxonomy.index_of(frame["category_id"].to_numpy()) if labelled else None,
                num_views=len(rows) if keep_views else 0, view_levels=levels if keep_views else ()) as writer:
            for index, record in batches:
                _substitute_unreadable(writer, index, record, fallback, keep_views, policy)
                order = np.argsort(index, kind="stable")
                for start, stop in _consecutive_runs(index[order]):
                    rows_here, first = order[start:stop], int(index[order[start]])
                    for level in levels:
                        writer.write(level, first, record[level][rows_here])
                        if keep_views:
                            writer.write_views(level, first, record[f"{level}.views"][rows_here])
            _finish_unreadable(writer, ids, split, policy)

    written_by_main_process(accelerator, batches, write, f"the {split} logits")


def written_by_main_process(accelerator, batches, write, what: str) -> None:
    """The main process stores the gathered ``batches`` with ``write(batches)``; the others only
    compute and gather.

    Every process then runs the batches to their end (each gather needs all of them, also after
    the main process's write failed part-way) and learns whether the write succeeded, so a
    failure raises on every process instead of leaving the others waiting for ever on a main
    process that has given up.

    Raises:
        the main process's own error there; HerbensError naming ``what`` on the others.
    """
    error = None
    if accelerator.is_main_process:
        try:
            write(batches)
        except Exception as exc:  # raised below, once every process knows
            error = exc
    for _ in batches:
        pass
    if accelerator.num_processes > 1:
        failed = accelerator.gather(torch.tensor([int(error is not None)], device=accelerator.device))
        if error is None and int(failed.sum()):
            raise HerbensError(f"the main process failed writing {what}; its error is in its output")
    if error is not None:
        raise error


def logits_failure_message(run_dir: Path, splits: list[str], exc: BaseException) -> str:
    """What to say when writing logits fails after training: the weights are safe, and how to finish.

    Args:
        splits: the splits whose logits are still missing, the failed one first.
    """
    weights = ", ".join(name for name in ("model.pt", "model_ema.pt") if (Path(run_dir) / name).exists())
    command = f"herbens infer {shlex.quote(str(run_dir))} --split {' '.join(splits)}"
    return (f"training finished and its weights are saved ({weights} in {run_dir}), but writing the "
            f"{splits[0]} logits failed: {exc}. Finish the run without retraining: {command}")
def write_split_embeddings(accelerator, model, cfg: dict, data: RunData, data_config: dict,
                           run_dir: Path, split: str, views: list[str] | None = None) -> None:
    """Embed every image of ``split`` (views averaged, unit norm) into ``embeddings/<split>/``."""
    views = list(views or cfg["infer"]["tta"])
    frame, images_dir, labelled = _split_frame(data, split)
    loader = accelerator.prepare(
        predict_loader(frame, images_dir, data.taxonomy if labelled else None,
                       build_tta_views(views, data_config), cfg, data_config=data_config))
    batches = predict_batches(accelerator, model, loader, (), desc=f"embeddings {split}", embedding=True)

    def write(batches) -> None:
        with open_embeddings_writer(
                run_dir, split, frame["image_id"].astype(str).tolist(), accelerator.unwrap_model(model).embedding_dim,
                {"taxonomy_hash": data.taxonomy.hash, "views": views, "model": cfg["model"]["backbone"]},
                labels=data.taxonomy.index_of(frame["category_id"].to_numpy()) if labelled else None,
                num_species=data.taxonomy.num_classes("species")) as writer:
            for index, record in batches:
                order = np.argsort(index, kind="stable")
                for start, stop in _consecutive_runs(index[order]):
                    writer.write(int(index[order[start]]), record["embedding"][order[start:stop]])

    written_by_main_process(accelerator, batches, write, f"the {split} embeddings")


def embedding_splits(data: RunData) -> list[str]:
    """The splits a run can embed: train and val, and test when test metadata exists."""
    return ["train", "val"] + (["test"] if data.test is not None else [])
def prior_logits(taxonomy, level: str) -> np.ndarray:
    """Log training frequency of each class of ``level`` (counts clamped to 1), float32.

    The fallback scores of an unreadable image: what is known about it without its pixels.
    Its softmax is the class frequencies and its argmax the most frequent class.
    """
    counts = np.maximum(np.asarray(taxonomy.level_counts(level), dtype=np.float64), 1.0)
    return np.log(counts / counts.sum()).astype(np.float32)


def _substitute_unreadable(writer, index: np.ndarray, record: dict, fallback: dict, keep_views: bool,
                           policy: str) -> None:
    """Overwrite, in ``record``, the scores of rows whose own image was unreadable.

    Their scores come from another image (the dataset's replacement): they must never be
    stored as this row's. Under ``fail`` the prior is written too, but only the rows matter:
    :func:`_finish_unreadable` then refuses the split, so nothing is published.
    """
    bad = np.flatnonzero(record.pop("unreadable", np.zeros(len(index), np.int64)))
    if not len(bad):
        return
    writer.mark_unreadable(index[bad].tolist(), "prior" if policy == "fail" else policy)
    for level, scores in fallback.items():
        record[level][bad] = scores
        if keep_views:
            record[f"{level}.views"][bad] = scores


def _finish_unreadable(writer, ids: list[str], split: str, policy: str) -> None:
    """Fail the split (nothing is published) or warn with the count and ids of fallback rows."""
    if not writer.unreadable_rows:
        return
    bad = [ids[r] for r in sorted(writer.unreadable_rows)]
    shown = format_ids(bad)
    if policy == "fail":
        raise HerbensError(f"split '{split}': {len(bad)} image(s) cannot be decoded ({shown}); "
                           "no logits written (infer.bad_images=fail). Fix or remove them "
                           "(`herbens check` lists them), or set infer.bad_images=prior")
    warnings.warn(f"split '{split}': {len(bad)} unreadable image(s) get the '{policy}' fallback and are "
                  f"recorded as unreadable in the logits store: {shown}", BadImageWarning, stacklevel=3)


def _consecutive_runs(ordered: np.ndarray) -> list[tuple[int, int]]:
    """Positions ``[start, stop)`` of each run of consecutive row numbers in sorted ``ordered``.

    Gathered batches are consecutive in practice; this keeps the writer's contiguous blocks
    correct whatever order the processes deliver.
    """
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    edges = [0, *breaks.tolist(), len(ordered)]
    return list(zip(edges[:-1], edges[1:]))


def load_run_model(run_dir: Path, cfg: dict, taxonomy, use_ema: bool = True):
    """Rebuild a run's model and load its final (EMA, when present) weights."""
    from herbens.models.net import build_model

    weights = run_dir / "model_ema.pt"
    if not (use_ema and weights.exists()):
        weights = run_dir / "model.pt"
    if not weights.exists():
        raise HerbensError(f"{run_dir} has no final weights (model.pt): has training finished?")
    model = build_model({**cfg, "model": {**cfg["model"], "pretrained": False}}, taxonomy)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as exc:  # noqa: BLE001 - truncated, corrupt or foreign: any failure names the file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HerbensError(f"cannot load weights {weights}: {reason} (truncated or corrupt? "
                           "retrain, or copy it again from where training wrote it)") from exc
    return model


def infer_run(run_dir: str | Path, splits: list[str], views: list[str] | None = None,
              data_root: str | None = None, batch_size: int | None = None,
              tta_space: str | None = None, keep_views: bool | None = None,
              embeddings: bool = False, bad_images: str | None = None) -> None:
    """Rewrite a finished run's logits for ``splits`` (e.g. with other test-time views).

    With ``embeddings`` (or the recipe's ``infer.embeddings``) also write its embeddings of the
    train, val and test images. ``bad_images`` overrides the recipe for this inference: every
    image is tried (``data.bad_images: skip``), then ``fail`` refuses the split listing every
    unreadable image and ``prior`` stores the fallback for them (``infer.bad_images``).
    """
    from accelerate import Accelerator

    from herbens.training import launched_on_cpus_only

    from herbens.config import load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if data_root:
        cfg["data"]["root"] = data_root
    if batch_size:
        cfg["infer"]["batch_size"] = batch_size
    if tta_space is not None:
        cfg["infer"]["tta_space"] = tta_space
    if keep_views is not None:
        cfg["infer"]["keep_views"] = keep_views
    if bad_images is not None:
        cfg["data"]["bad_images"] = "skip"
        cfg["infer"]["bad_images"] = bad_images
    accelerator = Accelerator(mixed_precision=cfg["train"]["precision"], cpu=launched_on_cpus_only())
    data = load_run_data(cfg, run_dir, reuse_split=True)
    model = accelerator.prepare(load_run_model(run_dir, cfg, data.taxonomy))
    data_config = model_data_config(accelerator.unwrap_model(model).data_config, cfg["input"])
    for split in splits:
        write_split_logits(accelerator, model, cfg, data, data_config, run_dir, split, views)
    if embeddings or cfg["infer"]["embeddings"]:
        for split in embedding_splits(data):
            write_split_embeddings(accelerator, model, cfg, data, data_config, run_dir, split, views)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "infer", help="write a run's per-level logits for val/test images (with test-time views)",
        description="Predict a finished run's validation and/or test images and store the logits "
                    "in runs/NAME/logits/<split>/ for the ensembler.")
    parser.add_argument("run", help="run directory, e.g. runs/convnext_b")
    parser.add_argument("--split", nargs="+", default=["val", "test"], choices=["val", "test"])
    parser.add_argument("--tta", nargs="+", default=None, metavar="VIEW",
                        help="test-time views to average (default: the recipe's infer.tta)")
    parser.add_argument("--data-root", default=None, help="dataset folder, if it moved since training")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--tta-space", choices=["logit", "prob"], default=None,
                        help="average views' logits or probabilities (default: the recipe's)")
    parser.add_argument("--keep-views", action=argparse.BooleanOptionalAction, default=None,
                        help="also store per-view logits (default: the recipe's infer.keep_views)")
    parser.add_argument("--embeddings", action="store_true",
                        help="also write L2-normalised embeddings of the train, val and test images to "
                             "runs/NAME/embeddings/<split>/ (for herbens retrieval)")
    parser.add_argument("--no-logits", action="store_true", help="write no logits (with --embeddings)")
    parser.add_argument("--bad-images", choices=INFER_BAD_IMAGES, default=None,
                        help="unreadable images: fail (write nothing, list them all) or prior (store the "
                             "training prior for them and record them as unreadable); default: the recipe's")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    if args.no_logits and not args.embeddings:
        raise HerbensError("--no-logits leaves nothing to do without --embeddings")
    infer_run(args.run, [] if args.no_logits else args.split, args.tta, args.data_root, args.batch_size,
              args.tta_space, args.keep_views, embeddings=args.embeddings, bad_images=args.bad_images)
    return 0
