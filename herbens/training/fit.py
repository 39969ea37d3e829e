"""One training run from a resolved recipe to a complete run directory.

Order of work: data and taxonomy -> split -> model -> loaders -> loss -> optimizer and
schedule -> Accelerate -> (resume) -> epochs with validation and checkpoints -> final
weights -> logits for val/test -> metrics.json.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed

from herbens import __version__
from herbens.config import check_resume, load_run_config, save_config
from herbens.config.rules import flatten
from herbens.data.dataset import BadImageWarning
from herbens.data.run_data import RunData, load_run_data
from herbens.data.splits import save_split
from herbens.data.taxonomy import Taxonomy
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write, write_json
from herbens.infer.loop import Engine, predict
from herbens.infer.splits import embedding_splits, logits_failure_message, write_split_embeddings, write_split_logits
from herbens.metrics import level_scores, macro_f1
from herbens.models.clip import text_head_scales, with_text_head_scales
from herbens.models.compiling import compile_seconds
from herbens.stores.logits import read_logits
from herbens.training.checkpoint import latest_checkpoint, resume_checkpoint, save_checkpoint
from herbens.training.engine import TrainParts, TrainState, current_lr, train_one_epoch
from herbens.training.preflight import Plan, run_preflight
from herbens.training.run_folder import clear_failed_start, first_missing_folder, remove_created_folders, start_mode
from herbens.training.setup import TrainingSetup, build_accelerator, build_setup

# Per-epoch figures of what a step costs, recorded under their own names (not as loss parts).
COST_KEYS = ("images_per_second", "epoch_time_s", "teacher_s_per_step")


def git_revision() -> str | None:
    """The source revision, recorded so a run folder says what code produced it."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run_header(run_dir: Path, cfg: dict, data: RunData) -> None:
    """Config, provenance, taxonomy and split: what makes the run reproducible (the folder exists: preflight).

    ``config.yaml`` is the resolved recipe alone, so it loads back through the schema
    (:func:`herbens.config.load_run_config`); what produced it goes to ``provenance.json``.
    """
    save_config(cfg, run_dir / "config.yaml")
    write_json(run_dir / "provenance.json", {"git_revision": git_revision(), "herbens_version": __version__})
    data.taxonomy.save(run_dir / "taxonomy.json")
    save_split(run_dir / "split.csv", data.val["image_id"].tolist())


def validate(accelerator, model, loader, levels, taxonomy: Taxonomy, progress: bool = True) -> dict:
    """Per-level macro-F1 of each head's own prediction on the validation split."""
    scores = predict(Engine.of_accelerator(accelerator, progress=progress), model, loader, levels, desc="validate")
    out = {}
    for level in levels:
        true = taxonomy.level_indices(level, scores["labels"])
        out[f"val_{level}_macro_f1"] = macro_f1(true, scores[level].argmax(axis=1))
    return out


def append_history(run_dir: Path, state: TrainState) -> None:
    with atomic_write(run_dir / "history.jsonl") as handle:
        for record in state.history:
            handle.write(json.dumps(record) + "\n")


def _start(cfg: dict, resume: bool, overwrite: bool, dry: bool):
    """Accelerator, run folder decision, data, built parts and preflight: everything before epoch 1.

    Returns ``(setup, plan, resume, run_dir)``; ``resume`` is False when the folder held only a
    failed start (nothing to resume), which is then cleared (unless ``dry``).
    """
    run_dir = Path(cfg["output_dir"]) / cfg["name"]
    accelerator = build_accelerator(cfg, run_dir)
    mode = start_mode(run_dir, resume, overwrite)
    scales = None
    if mode == "resume":
        recorded = load_run_config(run_dir)
        # The run's text heads took their scale from the checkpoint at its start (config.yaml keeps it).
        scales = {level: scale for level, scale in text_head_scales(recorded).items()
                  if level in cfg["text_heads"]["levels"]}
        check_resume(recorded, with_text_head_scales(cfg, scales), run_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not dry and mode in ("clear", "overwrite"):
        if mode == "clear":
            accelerator.print(f"{run_dir} holds only a start that failed before its first checkpoint: "
                              f"starting it again")
            clear_failed_start(run_dir)
        else:
            shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    resume = mode == "resume"
    set_seed(int(cfg["seed"]))
    if cfg["train"]["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = load_run_data(cfg, run_dir, reuse_split=resume)
    setup = build_setup(cfg, accelerator, data, scales)
    plan = run_preflight(cfg, setup, run_dir)
    accelerator.wait_for_everyone()
    return setup, plan, resume, run_dir


def check(cfg: dict, resume: bool = False, overwrite: bool = False) -> Plan:
    """Run only the preflight (``herbens train --check``): build everything, train nothing.

    Leaves the file system as it found it (a run folder that did not exist is removed again).
    """
    run_dir = Path(cfg["output_dir"]) / cfg["name"]
    created = first_missing_folder(run_dir)
    try:
        setup, plan, _, _ = _start(cfg, resume, overwrite, dry=True)
        setup.accelerator.end_training()
    finally:
        remove_created_folders(run_dir, created)
    return plan


def fit(cfg: dict, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Train one run end to end and return its directory.

    The preflight (:mod:`herbens.training.preflight`) runs first; a run that fails before its
    first checkpoint removes what it wrote, so that retrying the same command starts cleanly.

    Args:
        cfg: resolved configuration (:func:`herbens.config.load_config`).
        resume: continue from the run's latest checkpoint (same sample order, optimizer,
            schedule, EMA, loss state and step counter).
        overwrite: delete an existing run directory of the same name first.
        progress: show progress (training, validation and inference bars; herbens.core.progress).
    """
    wall_start = time.perf_counter()
    run_dir = Path(cfg["output_dir"]) / cfg["name"]
    created = first_missing_folder(run_dir)
    try:
        setup, plan, resume, run_dir = _start(cfg, resume, overwrite, dry=False)
    except BaseException:
        remove_created_folders(run_dir, created)
        raise
    accelerator = setup.accelerator
    accelerator.print(plan.summary())
    compile_start = compile_seconds()  # torch.compile works lazily, within the first steps
    state = TrainState()
    try:
        _train(cfg, setup, state, resume, run_dir, progress)
    except BaseException:
        if accelerator.is_main_process and not resume and latest_checkpoint(run_dir) is None:
            clear_failed_start(run_dir)
            remove_created_folders(run_dir, created)
        raise
    _finish(cfg, setup, state, run_dir, time.perf_counter() - wall_start, compile_start, progress)
    return run_dir


def _train(cfg: dict, setup: TrainingSetup, state: TrainState, resume: bool, run_dir: Path,
           progress: bool = True) -> None:
    """The run's header (or, resuming, its recipe and checkpoint), then every epoch."""
    accelerator = setup.accelerator
    if accelerator.is_main_process:
        if resume:  # the run now trains this recipe (resumable keys such as train.epochs may differ)
            save_config(setup.config, run_dir / "config.yaml")
        else:
            write_run_header(run_dir, setup.config, setup.data)
    accelerator.wait_for_everyone()
    for obj in (setup.schedule, state, setup.criterion) + ((setup.ema,) if setup.ema is not None else ()):
        accelerator.register_for_checkpointing(obj)
    if resume:
        resume_checkpoint(accelerator, run_dir)
        # The schedule of this recipe's length (train.epochs may have grown), at the restored update.
        setup.schedule.seek(state.step)
    accelerator.init_trackers(cfg["name"], config=_tracker_config(cfg))
    parts = TrainParts(accelerator, setup.model, setup.criterion, setup.optimizer, setup.schedule,
                       tuple(cfg["levels"]), mixup=setup.mixup, ema=setup.ema, clip_grad=cfg["train"]["clip_grad"],
                       progress=progress, teacher=setup.teacher)
    _train_epochs(cfg, parts, setup.loader, setup.sampler, setup.val_loader, state, run_dir, setup.data.taxonomy)


def _finish(cfg: dict, setup: TrainingSetup, state: TrainState, run_dir: Path, wall: float,
            compile_start: float, progress: bool = True) -> None:
    """Final weights, the logits (and embeddings) of the inference splits, then metrics.json."""
    accelerator, ema = setup.accelerator, setup.ema
    eval_model = ema.module if ema is not None else accelerator.unwrap_model(setup.model)
    _save_weights(accelerator, run_dir, setup.plain_model, ema)
    _write_all_logits(accelerator, eval_model, cfg, setup, run_dir, progress)
    if cfg["infer"]["embeddings"]:
        for split in embedding_splits(setup.data):
            write_split_embeddings(accelerator, eval_model, cfg, setup.data, setup.data_config, run_dir, split,
                                   progress=progress)
    compile_time = compile_seconds() - compile_start
    if setup.compiled_modules:
        accelerator.print(f"model.compile={cfg['model']['compile']}: {setup.compiled_modules} module(s) compiled "
                          f"in place, {compile_time:.1f} s spent compiling")
    if accelerator.is_main_process:
        _write_metrics(cfg, run_dir, state, setup.data, accelerator, wall,
                       sum(p.numel() for p in eval_model.parameters()), compile_time)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _write_all_logits(accelerator, eval_model, cfg: dict, setup: TrainingSetup, run_dir: Path,
                      progress: bool = True) -> None:
    """The logits of every ``infer.splits``; a failure says how to finish without retraining."""
    splits = list(cfg["infer"]["splits"])
    for done, split in enumerate(splits):
        try:
            write_split_logits(accelerator, eval_model, cfg, setup.data, setup.data_config, run_dir, split,
                               progress=progress)
        except Exception as exc:
            raise HerbensError(logits_failure_message(run_dir, splits[done:], exc)) from exc


def _tracker_config(cfg: dict) -> dict:
    """The recipe as flat ``a.b`` keys with scalar values (what trackers store as hyperparameters)."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in flatten(cfg).items()}


def _train_epochs(cfg, parts: TrainParts, loader, sampler, val_loader, state: TrainState, run_dir: Path,
                  taxonomy: Taxonomy):
    acc = parts.accelerator
    every = int(cfg["train"]["checkpoint_every_steps"] or 0)
    keep = int(cfg["train"]["keep_checkpoints"])

    def on_step():
        if every and state.step % every == 0:
            save_checkpoint(acc, run_dir, state, keep)

    unreadable: set[int] = set()
    for epoch in range(state.epoch, int(cfg["train"]["epochs"])):
        state.epoch = epoch
        epoch_loader = acc.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        # Accelerate's loaders re-seed the sampler from their own pass counter on every pass; a
        # resumed run's loader starts counting at 0, so the epoch is set on the loader itself.
        epoch_loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        if cfg["train"]["freeze_trunk_epochs"]:  # a linear-probe epoch trains only the neck and heads
            acc.unwrap_model(parts.model).set_trunk_frozen(epoch < cfg["train"]["freeze_trunk_epochs"])
        stats = train_one_epoch(parts, epoch_loader, state, len(loader), on_step=on_step,
                                log_every=int(cfg["train"]["log_every"]))
        eval_model = parts.ema.module if parts.ema is not None else parts.model
        scores = validate(acc, eval_model, val_loader, parts.levels, taxonomy, parts.progress)
        _report_unreadable(acc, loader.dataset, stats.pop("unreadable"), unreadable, epoch)
        record = {"epoch": epoch + 1, "step": state.step,
                  "train_loss": stats.pop("loss"), "lr": current_lr(parts.optimizer)}
        cost = {k: stats.pop(k) for k in COST_KEYS if k in stats}
        record.update({f"loss_{k}": v for k, v in stats.items()})
        record.update(cost, **scores)
        state.history.append(record)
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        acc.log({k: v for k, v in record.items() if k not in ("epoch", "step")}, step=state.step)
        if acc.is_main_process:
            append_history(run_dir, state)
            acc.print(f"epoch {epoch + 1}/{cfg['train']['epochs']}  loss {record['train_loss']:.4f}  "
                      + "  ".join(f"{k[4:]} {v:.3f}" for k, v in scores.items())
                      + f"  {record['images_per_second']:.1f} img/s")
        save_checkpoint(acc, run_dir, state, keep)


def _report_unreadable(acc, dataset, found: list[int], known: set[int], epoch: int) -> None:
    """Warn once per epoch, with the count, when new unreadable training images were skipped.

    Every rank reports the dataset indices it replaced; their union (``known``, kept across
    epochs) is what the warning counts, so the number does not depend on the process count.
    """
    new = set(gather_object(list(found))) - known
    known.update(new)
    if not new or not acc.is_main_process:
        return
    examples = ", ".join(dataset.paths[i] for i in sorted(new)[:3])
    warnings.warn(f"epoch {epoch + 1}: {len(new)} unreadable training image(s) skipped and replaced by "
                  f"the next readable one ({len(known)} in all; data.bad_images=skip), e.g. {examples}; "
                  f"`herbens check` lists every problem file", BadImageWarning, stacklevel=2)


def _save_weights(accelerator, run_dir: Path, model, ema) -> None:
    """Final weights of the plain (unwrapped, uncompiled) ``model`` and of the EMA, written
    atomically by the main process."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    weights = {"model.pt": model.state_dict()}
    if ema is not None:
        weights["model_ema.pt"] = ema.module.state_dict()
    for name, state_dict in weights.items():
        with atomic_write(run_dir / name, "wb") as handle:
            torch.save(state_dict, handle)


def _write_metrics(cfg, run_dir: Path, state: TrainState, data: RunData, accelerator, wall: float, params: int,
                   compile_time: float):
    val = read_logits(run_dir, "val") if "val" in cfg["infer"]["splits"] else None
    val_scores = {}
    if val is not None:
        val.warn_unreadable()
        readable = ~val.unreadable_mask()  # fallback rows are not predictions: keep them out of the score
        labels = np.asarray(val.labels)[readable]
        val_scores = level_scores(labels, np.asarray(val.level("species")).argmax(axis=1)[readable], data.taxonomy)
    train_time = float(sum(r["epoch_time_s"] for r in state.history))
    device = accelerator.device
    write_json(run_dir / "metrics.json", {
        "run": cfg["name"],
        "backbone": cfg["model"]["backbone"],
        "params": int(params),
        "epochs": int(cfg["train"]["epochs"]),
        "val": val_scores,
        "cost": {
            "wall_time_s": wall,
            "train_time_s": train_time,
            "device_type": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "device_count": accelerator.num_processes,
            "images_per_second": float(np.mean([r["images_per_second"] for r in state.history])) if state.history else 0.0,
            "device_hours": train_time * accelerator.num_processes / 3600.0,
            "compile_time_s": compile_time,  # lazily, within the first training and validation steps
        },
    })
