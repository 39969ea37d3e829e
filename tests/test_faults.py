"""Fault tolerance: SIGKILL mid-training and mid-write, a full disk, an unwritable directory and
unreadable training images.

What must hold: a reader never accepts a partial file (it sees the old complete version or the
new complete one), rerunning completes what was interrupted, and a full disk or an unwritable
directory is a clear HerbensError that leaves earlier outputs intact.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OVERRIDES, train_tiny
from fault_writer import image_ids, write_generation
from herbens.config import RECIPES_DIR_ENV, SHIPPED_RECIPES_DIR, load_config
from herbens.data.dataset import BadImageWarning
from herbens.data.run_data import load_run_data
from herbens.data.taxonomy import Taxonomy
from herbens.ensemble.submission import read_submission, write_submission
from herbens.core.errors import HerbensError
from herbens.core.fileio import _renameat2, atomic_dir, read_json, write_json
from herbens.stores.logits import logits_dir, read_logits, write_logits
from herbens.training.checkpoint import POINTER, checkpoint_dir, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).with_name("fault_writer.py")
# Guards against a hung subprocess, not speed requirements.
HANG_TIMEOUT_S = 600
NOBODY = 65534


def kill_at_first_checkpoint(train_args: list[str], pointer, log) -> None:
    """Run ``herbens train *train_args`` in a child process and SIGKILL it as soon as
    ``pointer`` (the checkpoint pointer) appears; fail with its log if it ended otherwise."""
    with open(log, "wb") as handle:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen([sys.executable, "-m", "herbens", "train", *train_args], cwd=ROOT,
                                env=child_env(), stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + HANG_TIMEOUT_S
        while not pointer.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


# ----- readers: each returns the generation it found, and fails on anything partial ---------

def logits_generation(out: Path, rows: int, cols: int) -> int:
    split = read_logits(out / "run", "test", mmap=False)
    generation = split.meta["generation"]
    assert split.image_ids == image_ids(rows)
    species = split.level("species")
    assert species.shape == (rows, cols)
    assert (species == generation).all(), "logits mix two generations"
    return generation


def pointer_generation(out: Path) -> int:
    folder = latest_checkpoint(out / "run")
    info = read_json(checkpoint_dir(out / "run") / POINTER)
    assert folder.name == f"gen{info['step']:06d}"
    return info["step"]


def submission_generation(out: Path, rows: int) -> int:
    frame = read_submission(out / "submission.csv", expected_ids=image_ids(rows))
    values = frame["Predicted"].unique()
    assert len(values) == 1, "submission mixes two generations"
    return int(values[0])


def generations(out: Path, rows: int, cols: int) -> dict[str, int]:
    return {"logits": logits_generation(out, rows, cols), "pointer": pointer_generation(out),
            "submission": submission_generation(out, rows)}


def leftovers(folder: Path) -> list[str]:
    """Temporary siblings (``.name.tmp-PID``) that a writer left behind."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ----- SIGKILL during training ---------------------------------------------------------------

# Seesaw (checkpointed class counts), EMA and step checkpoints: everything resume must restore.
RESUME_ARGS = ["train.batch_size=2", "train.checkpoint_every_steps=1", "train.ema=true",
               "train.ema_decay=0.9", "train.deterministic=true"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(tiny_herbarium, tmp_path):
    args = ["demo_seesaw", f"data.root={tiny_herbarium}", f"output_dir={tmp_path}", "name=killed",
            *TINY_OVERRIDES, *RESUME_ARGS]
    pointer = tmp_path / "killed" / "checkpoints" / POINTER
    # Killed after the first of ~30 step checkpoints, long before the end of training.
    kill_at_first_checkpoint(args, pointer, tmp_path / "train.log")
    assert not (tmp_path / "killed" / "metrics.json").exists()
    saved = read_json(pointer)
    assert saved["step"] >= 1 and saved["batch_in_epoch"] >= 1  # a mid-epoch checkpoint

    assert train_tiny(tiny_herbarium, tmp_path, recipe="demo_seesaw", extra=["name=killed", *RESUME_ARGS],
                      flags=["--resume"]) == 0
    run = tmp_path / "killed"
    for name in ("config.yaml", "taxonomy.json", "split.csv", "metrics.json", "model.pt"):
        assert (run / name).exists(), name
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    steps_per_epoch = history[0]["step"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["step"] == 2 * steps_per_epoch > saved["step"]
    assert read_json(pointer)["step"] == history[-1]["step"]
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    for split in ("val", "test"):
        read_logits(run, split, taxonomy=taxonomy)

    # Same sample order, augmentation, RNG, optimizer, schedule, EMA and Seesaw counts:
    # the resumed weights equal an uninterrupted run's bit for bit.
    assert train_tiny(tiny_herbarium, tmp_path, recipe="demo_seesaw", extra=["name=straight", *RESUME_ARGS]) == 0
    for weights in ("model.pt", "model_ema.pt"):
        resumed = torch.load(run / weights, weights_only=True)
        straight = torch.load(tmp_path / "straight" / weights, weights_only=True)
        assert resumed.keys() == straight.keys()
        different = [k for k in resumed if not torch.equal(resumed[k], straight[k])]
        assert not different, f"{weights}: {len(different)} tensors differ, e.g. {different[:3]}"


# ----- SIGKILL inside a writer ----------------------------------------------------------------

KILL_ROWS, KILL_COLS = 20_000, 800  # 32 MB of float16 logits per generation


def temporary_of(out: Path, what: str, pid: int) -> Path:
    """The temporary sibling that writer ``what`` of process ``pid`` fills before its rename."""
    final = {"logits": logits_dir(out / "run", "test"),
             "pointer": checkpoint_dir(out / "run") / POINTER,
             "submission": out / "submission.csv"}[what]
    return final.with_name(f".{final.name}.tmp-{pid}")


def stop_inside_the_write(proc: subprocess.Popen, temporary: Path) -> None:
    """SIGSTOP the writer at a moment when its temporary file exists, i.e. mid-write.

    Polls for the file, stops the process, waits until it is stopped, and checks the file is
    still there; otherwise lets it run on and tries again with a later generation.
    """
    deadline = time.monotonic() + HANG_TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        if temporary.exists():
            proc.send_signal(signal.SIGSTOP)
            os.waitpid(proc.pid, os.WUNTRACED)
            if temporary.exists():
                return
            proc.send_signal(signal.SIGCONT)
    pytest.fail(f"never caught the writer inside a write (status {proc.poll()})")


READERS = {
    "logits": lambda out: logits_generation(out, KILL_ROWS, KILL_COLS),
    "pointer": pointer_generation,
    "submission": lambda out: submission_generation(out, KILL_ROWS),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", ["logits", "pointer", "submission"])
def test_sigkill_inside_a_writer_leaves_the_old_or_the_new_complete_file(tmp_path, what):
    write_generation(tmp_path, 1, KILL_ROWS, KILL_COLS, (what,))
    command = [sys.executable, str(WRITER), str(tmp_path), "--start", "2", "--count", "0",
               "--rows", str(KILL_ROWS), "--cols", str(KILL_COLS), "--what", what]
    proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stop_inside_the_write(proc, temporary_of(tmp_path, what, proc.pid))
        proc.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=HANG_TIMEOUT_S)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    step, generation = stdout.split()[-2:]
    generation = int(generation)
    assert step == what and generation >= 2
    folder = temporary_of(tmp_path, what, proc.pid).parent
    assert leftovers(folder) != []  # killed with a half-written temporary file

    found = READERS[what](tmp_path)  # fails on a partial or missing file
    if what == "logits":
        # The directory swap is one atomic exchange; the old directory then sits under the
        # temporary name until it is deleted, so the kill may come just after the swap.
        assert found in (generation - 1, generation)
    else:
        assert found == generation - 1  # the temporary file was never renamed into place

    # Rerunning completes it, and removes what the killed writer left behind.
    write_generation(tmp_path, generation + 1, KILL_ROWS, KILL_COLS, (what,))
    assert READERS[what](tmp_path) == generation + 1
    assert leftovers(folder) == []


@pytest.mark.skipif(_renameat2 is None, reason="no renameat2(RENAME_EXCHANGE) on this system")
def test_directory_swap_is_one_step(tmp_path, monkeypatch):
    """A crash between 'move the old directory aside' and 'move the new one in' would leave no
    directory at all; the swap must not consist of two renames."""
    target = tmp_path / "split"
    with atomic_dir(target) as tmp:
        (tmp / "value").write_text("old")

    def crash(*_args):
        raise KeyboardInterrupt("killed between two renames")

    monkeypatch.setattr("herbens.core.fileio.os.replace", crash)
    with atomic_dir(target) as tmp:
        (tmp / "value").write_text("new")
    assert (target / "value").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


# ----- full disk --------------------------------------------------------------------------------

DISK_BYTES = 1 << 20


class SmallDisk:
    """A directory with 1 MiB of room: a tmpfs, or (without mount rights) a file-size limit.

    ``run(command, full=...)`` runs a subprocess that writes there; ``full=True`` leaves it no
    room at all. With a tmpfs the space really runs out (ENOSPC); with ``RLIMIT_FSIZE`` (SIGXFSZ
    ignored) every file the child writes is capped (EFBIG). Both reach herbens as OSError from a
    write, which is what the tests exercise.
    """

    def __init__(self, root: Path, tmpfs: bool):
        self.root = root
        self.tmpfs = tmpfs
        # What the operating system says; herbens' message must pass it on.
        self.reason = os.strerror(errno.ENOSPC if tmpfs else errno.EFBIG)

    def run(self, command: list[str], full: bool = False) -> subprocess.CompletedProcess:
        if self.tmpfs and full:
            self._fill()
        limit = None if self.tmpfs else (0 if full else DISK_BYTES)
        return subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                              timeout=HANG_TIMEOUT_S,
                              preexec_fn=None if limit is None else (lambda: _limit_file_size(limit)))

    def _fill(self) -> None:
        fd = os.open(self.root / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            for chunk in (1 << 16, 1 << 12, 1):
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * chunk)
        finally:
            os.close(fd)


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _mount_tmpfs(mount: Path) -> bool:
    if os.geteuid() != 0 or not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture(params=["tmpfs", "fsize_limit"])
def small_disk(request, tmp_path):
    root = tmp_path / "disk"
    root.mkdir()
    if request.param == "fsize_limit":
        yield SmallDisk(root, tmpfs=False)
        return
    if not _mount_tmpfs(root):
        pytest.skip("cannot mount a tmpfs (needs root with CAP_SYS_ADMIN on Linux); "
                    "the fsize_limit variant covers the same errors")
    try:
        yield SmallDisk(root, tmpfs=True)
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)


def writer(out: Path, generation: int, rows: int, cols: int, what: str) -> list[str]:
    return [sys.executable, str(WRITER), str(out), "--start", str(generation), "--rows", str(rows),
            "--cols", str(cols), "--what", what]


def assert_clear_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, f"status {done.returncode}:\n{done.stderr[-3000:]}"
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("herbens: error:"), done.stderr[-3000:]
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_disk_full_while_writing_logits(small_disk):
    out = small_disk.root
    write_generation(out, 1, 10, 10, ("logits",))
    # 8 MB of logits for a 1 MB disk. Writing through a memory map into a file the disk has no
    # room for would kill the process with SIGBUS; it must be a clear error instead.
    done = small_disk.run(writer(out, 2, 2000, 2000, "logits"))
    assert_clear_error(done, small_disk.reason, str(out / "run"))
    assert logits_generation(out, 10, 10) == 1
    assert leftovers(logits_dir(out / "run", "test").parent) == []


def test_disk_full_while_writing_a_submission(small_disk):
    out = small_disk.root
    write_generation(out, 1, 10, 10, ("submission",))
    done = small_disk.run(writer(out, 2, 200_000, 1, "submission"))  # ~2.6 MB of CSV
    assert_clear_error(done, small_disk.reason, f"cannot write {out / 'submission.csv'}")
    assert submission_generation(out, 10) == 1
    assert leftovers(out) == []


def test_disk_full_while_moving_the_checkpoint_pointer(small_disk):
    out = small_disk.root
    write_generation(out, 1, 10, 10, ("pointer",))
    (checkpoint_dir(out / "run") / "gen000002").mkdir()  # the checkpoint itself was saved
    done = small_disk.run(writer(out, 2, 10, 10, "pointer"), full=True)
    assert_clear_error(done, small_disk.reason, f"cannot write {checkpoint_dir(out / 'run') / POINTER}")
    assert pointer_generation(out) == 1
    assert leftovers(checkpoint_dir(out / "run")) == []


@pytest.mark.slow
def test_disk_full_while_saving_a_training_checkpoint(small_disk, tiny_herbarium):
    out = small_disk.root / "runs"
    command = [sys.executable, "-m", "herbens", "train", "demo_ce", f"data.root={tiny_herbarium}",
               f"output_dir={out}", "name=full", *TINY_OVERRIDES, "train.epochs=1"]
    done = small_disk.run(command)
    run = out / "full"
    if small_disk.tmpfs:
        # A disk without room for the run's checkpoints is refused by the preflight, before epoch 1.
        assert_clear_error(done, f"output_dir: {run} has", "free, but the run needs about")
    else:
        # Room on the disk but a cap on every file: the first checkpoint fails to save.
        # torch reports a failed write only as an internal assertion; herbens adds the free space.
        assert_clear_error(done, f"cannot save checkpoint {run / 'checkpoints'}", "free on that disk")
    # A start that failed before its first checkpoint leaves nothing in the way of a retry.
    assert not run.exists()


# ----- unwritable directory ---------------------------------------------------------------

@pytest.fixture
def shared_tmp():
    """A temporary directory that an unprivileged user may enter (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="herbens-faults-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def unwritable(folder: Path):
    """Make ``folder`` unwritable for this process (readable and searchable by everyone).

    chmod does not stop root, so as root the effective uid also drops to ``nobody`` for the
    duration (``os.seteuid``; the real uid stays root, which allows switching back).
    """
    folder.chmod(0o555)
    dropped = False
    try:
        if os.geteuid() == 0:
            try:
                os.seteuid(NOBODY)
                dropped = True
            except OSError as exc:
                pytest.skip(f"running as root and cannot drop privileges ({exc}): chmod does not "
                            "stop root's writes")
        yield
    finally:
        if dropped:
            os.seteuid(0)
        folder.chmod(0o755)


def test_unwritable_directory_keeps_earlier_outputs(shared_tmp):
    out = shared_tmp
    write_generation(out, 1, 10, 10, ("logits", "pointer", "submission"))
    logits_parent = logits_dir(out / "run", "test").parent
    (checkpoint_dir(out / "run") / "gen000002").mkdir()
    attempts = {
        logits_parent: lambda: write_logits(out / "run", "test", image_ids(10),
                                            {"species": np.full((10, 10), 2.0)},
                                            {"taxonomy_hash": "0" * 16, "generation": 2}),
        checkpoint_dir(out / "run"): lambda: write_json(checkpoint_dir(out / "run") / POINTER,
                                                        {"checkpoint": "gen000002", "step": 2}),
        out: lambda: write_submission(out / "submission.csv", image_ids(10), np.full(10, 2)),
    }
    for folder, attempt in attempts.items():
        with unwritable(folder):
            with pytest.raises(HerbensError, match=re.escape(f"cannot write {folder}")) as caught:
                attempt()
            assert os.strerror(errno.EACCES) in str(caught.value)
    assert generations(out, 10, 10) == {"logits": 1, "pointer": 1, "submission": 1}
    for folder in attempts:
        assert leftovers(folder) == []


def readable_copy(source: Path, target: Path) -> Path:
    """Copy a file tree where every user can read it (folders 0755, files 0644)."""
    shutil.copytree(source, target)
    for folder, _, files in os.walk(target):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)
    return target


def test_training_into_an_unwritable_output_directory(tiny_herbarium, shared_tmp, capsys, monkeypatch):
    data = readable_copy(tiny_herbarium, shared_tmp / "herbarium")
    # As root the run goes on as `nobody`, who may not enter the checkout at all (a clone inside a
    # private 0700 folder): the recipes, base included, come from a readable copy, and what
    # training imports is imported first (this Python's own files may be under /root too).
    recipes = readable_copy(SHIPPED_RECIPES_DIR, shared_tmp / "recipes")
    monkeypatch.setenv(RECIPES_DIR_ENV, str(recipes))
    out = shared_tmp / "runs"
    out.mkdir()
    importlib.import_module("herbens.training.fit")
    with unwritable(out):
        status = train_tiny(data, out, recipe=str(recipes / "demo_ce.yaml"),
                            extra=["name=denied", "train.epochs=1"])
    assert status == 2
    message = capsys.readouterr().err
    assert f"cannot create run directory {out / 'denied'}" in message
    assert os.strerror(errno.EACCES) in message


# ----- unreadable training images --------------------------------------------------------------

BAD_FILES = {
    "corrupt": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8,   # a JPEG header, then garbage
    "empty": b"",
    "text": b"not an image, just text\n",
}


@pytest.fixture
def dirty_herbarium(tiny_herbarium, tmp_path):
    """A copy of the tiny herbarium with three of its training-split images made unreadable."""
    root = tmp_path / "dirty"
    shutil.copytree(tiny_herbarium, root)
    cfg = load_config("demo_ce", [f"data.root={root}", *TINY_OVERRIDES])
    data = load_run_data(cfg, tmp_path / "no-run", reuse_split=False)
    chosen = data.train["file_name"].iloc[[0, 7, 13]].tolist()
    for name, content in zip(chosen, BAD_FILES.values()):
        (data.images_dir / name).write_bytes(content)
    return root, [str(data.images_dir / name) for name in chosen], len(data.train)


def batch_size_covering(n: int, most: int = 10) -> int:
    """A batch size that divides ``n``, so that ``drop_last`` leaves no image unvisited."""
    return max(b for b in range(1, most + 1) if n % b == 0)


def test_skip_policy_trains_through_bad_images_and_counts_them(dirty_herbarium, tmp_path):
    root, bad, n_train = dirty_herbarium
    extra = ["name=skip", "data.bad_images=skip", "train.epochs=1",
             f"train.batch_size={batch_size_covering(n_train)}"]
    with pytest.warns(BadImageWarning) as record:
        assert train_tiny(root, tmp_path, extra=extra) == 0
    messages = [str(w.message) for w in record]
    summary = [m for m in messages if "unreadable training image(s)" in m]
    assert len(summary) == 1, messages
    assert summary[0].startswith("epoch 1: 3 unreadable training image(s) skipped")
    assert all(any(path in m for m in messages) for path in bad)  # each file is named somewhere
    history = [json.loads(line) for line in (tmp_path / "skip" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1] and np.isfinite(history[0]["train_loss"])
    assert (tmp_path / "skip" / "metrics.json").exists()


def test_error_policy_stops_naming_the_file(dirty_herbarium, tmp_path, capsys):
    root, bad, n_train = dirty_herbarium
    extra = ["name=error", "data.bad_images=error", "train.epochs=1",
             f"train.batch_size={batch_size_covering(n_train)}"]
    assert train_tiny(root, tmp_path, extra=extra) == 2
    err = capsys.readouterr().err  # may hold a progress bar before the message
    assert "herbens: error: train image" in err and "found before training" in err, err[-2000:]  # the preflight
    message = err[err.index("herbens: error:"):].splitlines()[0]
    assert any(path in message for path in bad), message
    assert not (tmp_path / "error" / "metrics.json").exists()
