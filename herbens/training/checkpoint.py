"""Resumable checkpoints: Accelerate's ``save_state`` folders plus a ``latest.json`` pointer.

The pointer is written atomically only after every file of a checkpoint is on disk, so a
run killed mid-save resumes from the previous complete checkpoint, never a partial one. A
checkpoint damaged later (a truncated copy, a bad disk block) is found when it fails to load;
:func:`resume_checkpoint` then falls back to the newest older one that loads, and says so.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from safetensors import SafetensorError

from herbens.core.errors import HerbensError
from herbens.core.fileio import read_json, write_json

POINTER = "latest.json"


# torch.save reports a failed write as RuntimeError, safetensors as SafetensorError.
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(accelerator, run_dir: Path, state, keep: int) -> Path:
    """Save model, optimizer, RNG and registered objects; every process must call this."""
    folder = checkpoint_dir(run_dir) / f"epoch{state.epoch:04d}-step{state.step:08d}"
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(folder))
    except _WRITE_ERRORS as exc:
        # A full disk or a read-only directory: the pointer still names the previous complete
        # checkpoint; drop the partial folder so that it does not take the space of the next one.
        shutil.rmtree(folder, ignore_errors=True)
        raise HerbensError(f"cannot save checkpoint {folder}: {_write_failure(exc, folder.parent)}") from exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(checkpoint_dir(run_dir) / POINTER,
                   {"checkpoint": folder.name, "epoch": state.epoch, "step": state.step,
                    "batch_in_epoch": state.batch_in_epoch})
        _prune(checkpoint_dir(run_dir), keep=max(1, keep), current=folder.name)
    accelerator.wait_for_everyone()
    return folder


def _write_failure(exc: BaseException, where: Path) -> str:
    """The reason a save failed, with the free space: torch reports a full disk only as an
    internal "unexpected pos" assertion."""
    reason = getattr(exc, "strerror", None) or str(exc).strip()
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return reason
    return f"{reason} ({free / 2**20:.1f} MiB free on that disk)"


def _prune(root: Path, keep: int, current: str) -> None:
    """Remove all but the newest ``keep`` checkpoint folders (never the current one)."""
    for old in _checkpoint_folders(root)[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def _checkpoint_folders(root: Path) -> list[Path]:
    """The checkpoint folders under ``root``, oldest first (their names sort by epoch and step)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("epoch"))


def _pointed_name(run_dir: Path) -> str | None:
    """The checkpoint folder name ``latest.json`` names; None when the run has no pointer yet.

    Raises:
        HerbensError: the pointer is not JSON or names no checkpoint folder.
    """
    pointer = checkpoint_dir(run_dir) / POINTER
    if not pointer.exists():
        return None
    info = read_json(pointer)
    name = info.get("checkpoint") if isinstance(info, dict) else None
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise HerbensError(f"{pointer}: expected {{\"checkpoint\": FOLDER, ...}} naming a checkpoint "
                           f"folder, got {info!r}; remove it to start the run again")
    return name


def _complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders the pointer vouches for, newest first: the one it names (even when
    that folder has gone since) and the older ones; folders newer than it are saves that never
    finished."""
    named = _pointed_name(run_dir)
    if named is None:
        return []
    older = [p for p in _checkpoint_folders(checkpoint_dir(run_dir)) if p.name < named]
    return [checkpoint_dir(run_dir) / named] + older[::-1]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run that exists, or None when it has none."""
    return next((p for p in _complete_checkpoints(run_dir) if p.is_dir()), None)


def load_checkpoint(accelerator, folder: Path) -> None:
    """Restore everything ``save_checkpoint`` saved (registered objects included)."""
    accelerator.load_state(str(folder))


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint could not be loaded and an older one was used instead."""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def resume_checkpoint(accelerator, run_dir: Path) -> Path:
    """Load the newest complete checkpoint that loads; returns its folder.

    A checkpoint that fails to load (truncated or corrupt file, missing file) is reported with
    a :class:`DamagedCheckpointWarning` naming it and the reason, and the next older complete
    one is tried: every object is restored again from that one, so nothing of the damaged
    checkpoint survives a fallback.

    Raises:
        HerbensError: when the run has no checkpoint, or none of them loads (naming each).
    """
    candidates = _complete_checkpoints(run_dir)
    if not candidates:
        raise HerbensError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    failures: list[str] = []
    for folder in candidates:
        if not folder.is_dir():
            failures.append(f"{folder}: missing")
            continue
        try:
            load_checkpoint(accelerator, folder)
        except Exception as exc:  # noqa: BLE001 - any failure to load means this checkpoint is damaged
            failures.append(f"{folder}: {_reason(exc)}")
            continue
        if failures:
            warnings.warn(f"resuming from the older checkpoint {folder.name}: " + "; ".join(failures)
                          + " (damaged: truncated or corrupt)", DamagedCheckpointWarning, stacklevel=2)
        return folder
    raise HerbensError(f"--resume: no checkpoint of {run_dir} can be loaded: " + "; ".join(failures))
