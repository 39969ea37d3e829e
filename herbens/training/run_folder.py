"""The run folder at the start of training: new, resumed, overwritten, or a failed start to clear."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path


from herbens.core.errors import HerbensError
from herbens.training.checkpoint import latest_checkpoint


# What a run writes before its first checkpoint; a folder holding nothing else is a failed start.
START_FILES = ("config.yaml", "provenance.json", "taxonomy.json", "split.csv", "history.jsonl", "checkpoints",
               "trackers")


def failed_start(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds only what a run that died before its first checkpoint wrote."""
    if not run_dir.is_dir() or latest_checkpoint(run_dir) is not None:
        return False
    names = {p.name for p in run_dir.iterdir()}
    return bool(names) and names <= set(START_FILES)


def clear_failed_start(run_dir: Path) -> None:
    """Remove what a run wrote before its first checkpoint, and the folder once it is empty."""
    for name in START_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    with contextlib.suppress(OSError):
        run_dir.rmdir()  # only when empty


def start_mode(run_dir: Path, resume: bool, overwrite: bool) -> str:
    """How to start in ``run_dir``: ``resume``, ``overwrite``, ``clear`` (a failed start) or ``new``.

    Reads only, so that every process decides alike before the main one deletes anything;
    refuses to silently mix a new run into an old one.
    """
    if failed_start(run_dir):
        return "clear"  # also under --resume: there is nothing to resume
    if resume:
        if latest_checkpoint(run_dir) is None:
            raise HerbensError(f"--resume: {run_dir} has no checkpoint to resume from")
        return "resume"
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite and not (run_dir / "config.yaml").is_file():
            raise HerbensError(f"{run_dir} exists and is not a run (no config.yaml): --overwrite replaces only "
                               "a run's folder, never other files; choose another name=... or output_dir=...")
        if overwrite:
            return "overwrite"
        raise HerbensError(f"run directory {run_dir} already exists: pass --resume to continue it, "
                           f"--overwrite to start again, or choose another name=...")
    return "new"


def first_missing_folder(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what creating it would add)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def remove_created_folders(run_dir: Path, created: Path | None) -> None:
    """Remove the run folder and the parents this process created, as far as they are empty.

    Only empty folders go: another run started at the same time into a new output_dir keeps its own.
    """
    if created is None:
        return
    for folder in (run_dir, *run_dir.parents):
        with contextlib.suppress(OSError):
            folder.rmdir()
        if folder == created:
            break
