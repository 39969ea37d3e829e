"""Per-level logits and embeddings of a run's train, validation and test images, into the stores.

Called at the end of training with the model in memory, and by ``herbens infer runs/NAME``
(:mod:`herbens.infer.run`).
"""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path

import numpy as np
import torch

from herbens.data.dataset import BadImageWarning
from herbens.data.loaders import predict_loader
from herbens.data.run_data import RunData
from herbens.data.views import Views
from herbens.core.errors import HerbensError
from herbens.infer.loop import Engine, predict_batches
from herbens.core.numerics import log_prior
from herbens.stores.embeddings import open_embeddings_writer
from herbens.stores.logits import UNREADABLE_FALLBACKS, format_ids, open_logits_writer


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
                       run_dir: Path, split: str, views: Views | None = None, progress: bool = True) -> int:
    """Predict every image of ``split`` with test-time views combined and store the logits.

    Returns the number of rows stored.

    Batches stream straight into the logits store, so a full test split (210,407 x 15,501
    per level) never sits in memory; the split appears only once every row is written.
    Rows whose image cannot be decoded (``data.bad_images: skip``) follow ``infer.bad_images``:
    ``prior`` stores the training log-prior and records them as unreadable in ``meta.json``;
    ``fail`` raises HerbensError listing them, and nothing is written.

    Args:
        views: the test-time views and their space (default: the recipe's ``infer``).
    """
    views = views or Views.of_recipe(cfg)
    policy = cfg["infer"]["bad_images"]
    frame, images_dir, labelled = _split_frame(data, split)
    loader = accelerator.prepare(
        predict_loader(frame, images_dir, data.taxonomy if labelled else None, views, cfg, data_config=data_config))
    levels = tuple(cfg["levels"])
    keep_views, space = bool(cfg["infer"]["keep_views"]), views.space
    rows = views.row_names
    engine = Engine.of_accelerator(accelerator, progress=progress)
    batches = predict_batches(engine, model, loader, levels, desc=f"logits {split}", space=space,
                              keep_views=keep_views)
    ids = frame["image_id"].astype(str).tolist()

    def write(batches) -> None:
        fallback = {level: prior_logits(data.taxonomy, level) for level in levels}
        with open_logits_writer(
                run_dir, split, ids,
                {level: data.taxonomy.num_classes(level) for level in levels},
                {"taxonomy_hash": data.taxonomy.hash, "tta_space": space, "views": views.names,
                 "view_rows": rows if keep_views else None,
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
    return len(ids)


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
                           run_dir: Path, split: str, views: Views | None = None, progress: bool = True) -> int:
    """Embed every image of ``split`` (views averaged, unit norm) into ``embeddings/<split>/``."""
    views = views or Views.of_recipe(cfg)
    frame, images_dir, labelled = _split_frame(data, split)
    loader = accelerator.prepare(
        predict_loader(frame, images_dir, data.taxonomy if labelled else None, views, cfg, data_config=data_config))
    engine = Engine.of_accelerator(accelerator, progress=progress)
    batches = predict_batches(engine, model, loader, (), desc=f"embeddings {split}", embedding=True)

    def write(batches) -> None:
        with open_embeddings_writer(
                run_dir, split, frame["image_id"].astype(str).tolist(), accelerator.unwrap_model(model).embedding_dim,
                {"taxonomy_hash": data.taxonomy.hash, "views": views.names, "model": cfg["model"]["backbone"]},
                labels=data.taxonomy.index_of(frame["category_id"].to_numpy()) if labelled else None,
                num_species=data.taxonomy.num_classes("species")) as writer:
            for index, record in batches:
                order = np.argsort(index, kind="stable")
                for start, stop in _consecutive_runs(index[order]):
                    writer.write(int(index[order[start]]), record["embedding"][order[start:stop]])

    written_by_main_process(accelerator, batches, write, f"the {split} embeddings")
    return len(frame)


def embedding_splits(data: RunData) -> list[str]:
    """The splits a run can embed: train and val, and test when test metadata exists."""
    return ["train", "val"] + (["test"] if data.test is not None else [])


def prior_logits(taxonomy, level: str) -> np.ndarray:
    """Log training frequency of each class of ``level`` (counts clamped to 1), float32.

    The fallback scores of an unreadable image: what is known about it without its pixels.
    Its softmax is the class frequencies and its argmax the most frequent class.
    """
    return log_prior(taxonomy.level_counts(level))


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
