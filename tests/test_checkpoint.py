"""The checkpoint pointer read in one place: latest_checkpoint and resume_checkpoint agree on
which folders are complete and on what a bad pointer is (no training: folders made by hand)."""

from __future__ import annotations

import json

import pytest

from herbens.core.errors import HerbensError
from herbens.training.checkpoint import (POINTER, DamagedCheckpointWarning, checkpoint_dir, latest_checkpoint,
                                         resume_checkpoint)


class LoadingAccelerator:
    """Records what it was asked to load; refuses the folders named in ``broken``."""

    def __init__(self, broken=()):
        self.loaded, self.broken = [], set(broken)

    def load_state(self, path):
        if path in self.broken:
            raise RuntimeError("truncated file")
        self.loaded.append(path)


def _run(tmp_path, folders, pointer):
    root = checkpoint_dir(tmp_path / "run")
    root.mkdir(parents=True)
    for name in folders:
        (root / name).mkdir()
    if pointer is not None:
        (root / POINTER).write_text(json.dumps(pointer))
    return tmp_path / "run", root


def test_the_newest_folder_the_pointer_names_wins_and_newer_unfinished_saves_are_ignored(tmp_path):
    run, root = _run(tmp_path, ["epoch0001-step00000010", "epoch0002-step00000020", "epoch0003-step00000030"],
                     {"checkpoint": "epoch0002-step00000020"})
    assert latest_checkpoint(run) == root / "epoch0002-step00000020"
    acc = LoadingAccelerator()
    assert resume_checkpoint(acc, run) == root / "epoch0002-step00000020"
    assert acc.loaded == [str(root / "epoch0002-step00000020")]


def test_no_pointer_means_no_checkpoint(tmp_path):
    run, _ = _run(tmp_path, ["epoch0001-step00000010"], None)
    assert latest_checkpoint(run) is None
    with pytest.raises(HerbensError, match="no complete checkpoint"):
        resume_checkpoint(LoadingAccelerator(), run)


def test_a_pointer_to_a_vanished_folder_falls_back_to_the_older_one_in_both_readers(tmp_path):
    run, root = _run(tmp_path, ["epoch0001-step00000010"], {"checkpoint": "epoch0002-step00000020"})
    assert latest_checkpoint(run) == root / "epoch0001-step00000010"
    acc = LoadingAccelerator()
    with pytest.warns(DamagedCheckpointWarning, match=r"older checkpoint epoch0001-step00000010: .*"
                                                      r"epoch0002-step00000020: missing"):
        assert resume_checkpoint(acc, run) == root / "epoch0001-step00000010"
    assert acc.loaded == [str(root / "epoch0001-step00000010")]


def test_a_damaged_newest_checkpoint_falls_back(tmp_path):
    run, root = _run(tmp_path, ["epoch0001-step00000010", "epoch0002-step00000020"],
                     {"checkpoint": "epoch0002-step00000020", "epoch": 2})
    acc = LoadingAccelerator(broken={str(root / "epoch0002-step00000020")})
    with pytest.warns(DamagedCheckpointWarning, match="RuntimeError: truncated file"):
        assert resume_checkpoint(acc, run) == root / "epoch0001-step00000010"


@pytest.mark.parametrize("pointer", [["epoch0001-step00000010"], {"epoch": 1}, {"checkpoint": 3}, {"checkpoint": ""},
                                     {"checkpoint": "../elsewhere"}])
def test_a_pointer_naming_no_checkpoint_folder_is_one_error_naming_the_file(tmp_path, pointer):
    run, root = _run(tmp_path, ["epoch0001-step00000010"], pointer)
    for read in (latest_checkpoint, lambda r: resume_checkpoint(LoadingAccelerator(), r)):
        with pytest.raises(HerbensError, match=rf"{root / POINTER}: expected .*naming a checkpoint folder"):
            read(run)
