"""``herbens infer runs/NAME``: rebuild a finished run's model from its ``config.yaml`` and final
weights, and rewrite its stores (e.g. with other test-time views)."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from herbens.config import load_run_config
from herbens.core.errors import HerbensError
from herbens.core.fileio import one_writer
from herbens.core.runtime import launched_on_cpus_only
from herbens.data.run_data import load_run_data
from herbens.data.transforms import model_data_config
from herbens.data.views import Views
from herbens.infer.splits import (
    embedding_splits,
    write_split_embeddings,
    write_split_logits,
)
from herbens.models.net import build_model
from herbens.stores.embeddings import embeddings_dir
from herbens.stores.logits import logits_dir


def load_run_model(run_dir: Path, cfg: dict, taxonomy, use_ema: bool = True):
    """Rebuild a run's model and load its final (EMA, when present) weights."""

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


@one_writer
def infer_run(run_dir: str | Path, splits: list[str], views: list[str] | None = None,
              data_root: str | None = None, batch_size: int | None = None,
              tta_space: str | None = None, keep_views: bool | None = None,
              embeddings: bool = False, bad_images: str | None = None,
              progress: bool = True) -> list[tuple[Path, int]]:
    """Rewrite a finished run's logits for ``splits`` (e.g. with other test-time views).

    With ``embeddings`` (or the recipe's ``infer.embeddings``) also write its embeddings of the
    train, val and test images. ``bad_images`` overrides the recipe for this inference: every
    image is tried (``data.bad_images: skip``), then ``fail`` refuses the split listing every
    unreadable image and ``prior`` stores the fallback for them (``infer.bad_images``).

    Returns:
        ``(store folder, rows)`` of every store written, in order.
    """



    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if data_root:
        cfg["data"]["root"] = data_root
    if batch_size:
        cfg["infer"]["batch_size"] = batch_size
    if keep_views is not None:
        cfg["infer"]["keep_views"] = keep_views
    if bad_images is not None:
        cfg["data"]["bad_images"] = "skip"
        cfg["infer"]["bad_images"] = bad_images
    parsed = Views.of_recipe(cfg).with_names(views).with_space(tta_space)
    accelerator = Accelerator(mixed_precision=cfg["train"]["precision"], cpu=launched_on_cpus_only())
    data = load_run_data(cfg, run_dir, reuse_split=True)
    model = accelerator.prepare(load_run_model(run_dir, cfg, data.taxonomy))
    data_config = model_data_config(accelerator.unwrap_model(model).data_config, cfg["input"])
    written = [(logits_dir(run_dir, split),
                write_split_logits(accelerator, model, cfg, data, data_config, run_dir, split, parsed, progress))
               for split in splits]
    if embeddings or cfg["infer"]["embeddings"]:
        written += [(embeddings_dir(run_dir, split),
                     write_split_embeddings(accelerator, model, cfg, data, data_config, run_dir, split, parsed,
                                            progress))
                    for split in embedding_splits(data)]
    return written
