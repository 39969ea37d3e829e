"""Atomic file and directory writes, and JSON reading with errors that name the file.

Everything herbens writes (logits, checkpoints' metadata, submissions, reports) goes through
here so that a crash, a SIGKILL or a full disk never leaves a half-written file that a
reader would accept: data is written to a temporary sibling and renamed into place only
once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import IO, Iterator

from herbens.errors import HerbensError


def _tmp_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _fsync_dir(path: Path) -> None:
    # The rename itself must reach the disk, not only the file contents.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HerbensError(f"cannot create output directory {path.parent}: {exc.strerror}") from exc


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` keeps its old content.
    Errors from the operating system (read-only directory, disk full) become HerbensError.
    """
    path = Path(path)
    _ensure_parent(path)
    tmp = _tmp_sibling(path, "tmp")
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HerbensError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` once the block succeeds.

    A reader therefore sees either the old complete directory, or none, or the new complete
    one; never a mixture. On failure the temporary directory is removed.
    """
    path = Path(path)
    _ensure_parent(path)
    tmp = _tmp_sibling(path, "tmp")
    old = _tmp_sibling(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HerbensError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> object:
    """Read a JSON file; a missing file or malformed JSON raises HerbensError naming it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as exc:
        raise HerbensError(f"{path}: file not found") from exc
    except json.JSONDecodeError as exc:
        raise HerbensError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise HerbensError(f"{path}: not UTF-8 text ({exc.reason})") from exc
