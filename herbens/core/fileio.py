"""Atomic file and directory writes, and JSON reading with errors that name the file.

Everything herbens writes (logits, checkpoints' metadata, submissions, reports) goes through
here so that a crash, a SIGKILL or a full disk never leaves a half-written file that a
reader would accept: data is written to a temporary sibling and renamed into place only
once complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy as np

from herbens.core.errors import HerbensError


def _tmp_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid at all: leave it alone
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporary siblings of ``path`` left by writers that were killed; returns them.

    A SIGKILL or a power cut inside a write leaves ``.<name>.tmp-<pid>`` (or ``.old-<pid>``)
    behind; for a logits directory that is gigabytes. Only those of processes that no longer
    run on this machine are removed, so a live writer's files are never touched. Every atomic
    write does this for its own path; a command with several outputs calls it for each at its
    start, so that an output it does not write this time is cleaned too.
    """
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for sibling in path.parent.glob(f".{path.name}.{kind}-*"):
            pid = sibling.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    sibling.unlink()
            if not sibling.exists():
                removed.append(sibling)
    return removed


def _discard(tmp: Path) -> None:
    # Cleaning up must not hide the error being reported: in a read-only directory even
    # unlinking a file that was never created fails (EACCES, not ENOENT).
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or the filesystem cannot do it; the caller then falls back to
    two renames, between which ``b`` briefly does not exist.
    """
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HerbensError(f"cannot create output directory {path.parent}: {exc.strerror}") from exc


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", durable: bool = True, **open_kwargs) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` keeps its old content.
    Errors from the operating system (read-only directory, disk full) become HerbensError.
    ``durable=False`` skips the fsyncs, for bulk copies that can simply be remade (a resized
    dataset): still never half-written, but possibly lost in a power cut.
    """
    path = Path(path)
    _ensure_parent(path)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path, "tmp")
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise HerbensError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _discard(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` once the block succeeds.

    A reader therefore sees either the old complete directory or the new complete one, never a
    mixture: on Linux the two are exchanged in one atomic step, elsewhere (two renames) ``path``
    is briefly absent. On failure the temporary directory is removed.
    """
    path = Path(path)
    _ensure_parent(path)
    remove_stale_temporaries(path)
    tmp = _tmp_sibling(path, "tmp")
    old = _tmp_sibling(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if path.exists() and _exchange(tmp, path):
            old = tmp  # the exchange left the previous directory under the temporary name
        else:
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


def read_text(path: str | os.PathLike, hint: str = "") -> str:
    """The text of a UTF-8 file; a missing file or another encoding raises HerbensError naming
    the file (and the first bad byte), with ``hint`` (what to do) appended."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HerbensError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise HerbensError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})"
                           + (f"; {hint}" if hint else "")) from None


def read_json(path: str | os.PathLike) -> object:
    """Read a JSON file; a missing file or malformed JSON raises HerbensError naming it."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise HerbensError(f"{Path(path)}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of a folder changed in place: a hidden sibling, so that replacing the folder
    atomically (and the bundle manifest, which lists every file inside) never touches it."""
    target = Path(target)
    return target.with_name(f".{target.name}.lock")


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``target`` (a bundle or a run) for the block.

    A second writer of the same target waits (saying so once through ``on_wait``) until the
    first is done, then reads the state the first one left: two enrolments end with both
    species. The kernel drops the lock when a holder dies, so a killed writer blocks nobody.
    """
    lock = lock_path(target)
    _ensure_parent(lock)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise HerbensError(f"cannot create the lock file {lock}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"{target} is being changed by another herbens process (lock file {lock}); "
                        "waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def one_writer(change: Callable) -> Callable:
    """Run a verb that changes the folder named by its first argument under that folder's lock
    (:func:`exclusive_lock`; a ``log`` keyword, else print, hears about a wait). The verb reads
    the folder inside the lock: a second enrol waits and builds on what the first wrote, instead
    of both starting from the same state and the later one erasing the earlier one's species.
    Under a multi-process launch only the main process (``RANK`` 0) writes, so only it locks:
    the others must not wait on it while it waits on them in a collective."""
    @functools.wraps(change)
    def locked(target, *args, **kwargs):
        if os.environ.get("RANK", "0") != "0":
            return change(target, *args, **kwargs)
        with exclusive_lock(target, on_wait=kwargs.get("log", print)):
            return change(target, *args, **kwargs)
    return locked


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_npy(path: str | os.PathLike, array) -> None:
    """Write a ``.npy`` file atomically (never in place: bundles are staged with hard links, so
    rewriting a file in place would change the original bundle's copy too)."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def load_npy(path: str | os.PathLike) -> np.ndarray:
    """A ``.npy`` file (no pickles), or a HerbensError naming it."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HerbensError(f"{path}: not a readable .npy file ({exc})") from None


def replaceable(folder: str | os.PathLike, marker: str) -> bool:
    """Whether an output may replace ``folder``: it is absent, an empty folder, or a folder that
    holds ``marker`` (the file every output of that kind writes). Never a plain file, nor a
    folder of other files: a verb replaces only what a verb of its kind wrote."""
    folder = Path(folder)
    if not folder.exists():
        return True
    return folder.is_dir() and (not any(folder.iterdir()) or (folder / marker).is_file())
