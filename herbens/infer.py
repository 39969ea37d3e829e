"""Per-level logits of a run's validation and test images, through the logits store.

Called at the end of training with the model in memory, and by ``herbens infer runs/NAME``,
which rebuilds the model from the run's ``config.yaml`` and final weights.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import numpy as np
import torch
import yaml

from herbens.data.loaders import predict_loader
from herbens.data.run_data import RunData, load_run_data
from herbens.data.transforms import build_tta_views, model_data_config, view_row_names
from herbens.engine import predict_batches
from herbens.errors import HerbensError
from herbens.logits import open_logits_writer


def _split_frame(data: RunData, split: str):
    if split == "val":
        return data.val, data.images_dir, True
    if split == "test":
        if data.test is None:
            raise HerbensError("no test metadata found next to the training metadata; cannot infer 'test'")
        return data.test, data.test_images_dir, False
    raise HerbensError(f"unknown split {split!r}; expected val or test")


def write_split_logits(accelerator, model, cfg: dict, data: RunData, data_config: dict,
                       run_dir: Path, split: str, views: list[str] | None = None) -> None:
    """Predict every image of ``split`` with test-time views combined and store the logits.

    Batches stream straight into the logits store, so a full test split (210,407 x 15,501
    per level) never sits in memory; the split appears only once every row is written.
    """
    views = list(views or cfg["infer"]["tta"])
    frame, images_dir, labelled = _split_frame(data, split)
    loader = accelerator.prepare(
        predict_loader(frame, images_dir, data.taxonomy if labelled else None,
                       build_tta_views(views, data_config), cfg, data_config=data_config))
    levels = tuple(cfg["levels"])
    keep_views, space = bool(cfg["infer"]["keep_views"]), cfg["infer"]["tta_space"]
    rows = view_row_names(views)
    batches = predict_batches(accelerator, model, loader, levels, desc=f"logits {split}", space=space,
                              keep_views=keep_views)
    if not accelerator.is_main_process:
        for _ in batches:  # the other processes only compute and gather
            pass
        accelerator.wait_for_everyone()
        return
    with open_logits_writer(
            run_dir, split, frame["image_id"].astype(str).tolist(),
            {level: data.taxonomy.num_classes(level) for level in levels},
            {"taxonomy_hash": data.taxonomy.hash, "tta_space": space, "views": rows if keep_views else views,
             "model": cfg["model"]["backbone"], "split": split},
            labels=data.taxonomy.index_of(frame["category_id"].to_numpy()) if labelled else None,
            num_views=len(rows) if keep_views else 0, view_levels=levels if keep_views else ()) as writer:
        for index, record in batches:
            order = np.argsort(index, kind="stable")
            for start, stop in _consecutive_runs(index[order]):
                rows_here, first = order[start:stop], int(index[order[start]])
                for level in levels:
                    writer.write(level, first, record[level][rows_here])
                    if keep_views:
                        writer.write_views(level, first, record[f"{level}.views"][rows_here])
    accelerator.wait_for_everyone()


def logits_failure_message(run_dir: Path, splits: list[str], exc: BaseException) -> str:
    """What to say when writing logits fails after training: the weights are safe, and how to finish.

    Args:
        splits: the splits whose logits are still missing, the failed one first.
    """
    weights = ", ".join(name for name in ("model.pt", "model_ema.pt") if (Path(run_dir) / name).exists())
    command = f"herbens infer {shlex.quote(str(run_dir))} --split {' '.join(splits)}"
    return (f"training finished and its weights are saved ({weights} in {run_dir}), but writing the "
            f"{splits[0]} logits failed: {exc}. Finish the run without retraining: {command}")


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
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


def infer_run(run_dir: str | Path, splits: list[str], views: list[str] | None = None,
              data_root: str | None = None, batch_size: int | None = None,
              tta_space: str | None = None, keep_views: bool | None = None) -> None:
    """Rewrite a finished run's logits for ``splits`` (e.g. with other test-time views)."""
    from accelerate import Accelerator

    from herbens.training import launched_on_cpus_only

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.exists():
        raise HerbensError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = yaml.safe_load(config_file.read_text())
    if data_root:
        cfg["data"]["root"] = data_root
    if batch_size:
        cfg["infer"]["batch_size"] = batch_size
    if tta_space is not None:
        cfg["infer"]["tta_space"] = tta_space
    if keep_views is not None:
        cfg["infer"]["keep_views"] = keep_views
    accelerator = Accelerator(mixed_precision=cfg["train"]["precision"], cpu=launched_on_cpus_only())
    data = load_run_data(cfg, run_dir, reuse_split=True)
    model = accelerator.prepare(load_run_model(run_dir, cfg, data.taxonomy))
    data_config = model_data_config(accelerator.unwrap_model(model).data_config, cfg["input"])
    for split in splits:
        write_split_logits(accelerator, model, cfg, data, data_config, run_dir, split, views)


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
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    infer_run(args.run, args.split, args.tta, args.data_root, args.batch_size, args.tta_space, args.keep_views)
    return 0
