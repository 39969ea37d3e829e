"""Kaggle submission writer and validator."""

from __future__ import annotations

import numpy as np
import pytest

from herbens.ensemble.submission import read_submission, write_submission
from herbens.core.errors import HerbensError

IDS = ["0", "1", "2", "3"]
VALID = [1, 5, 9, 15505]


def test_round_trip(tmp_path):
    path = write_submission(tmp_path / "sub.csv", [0, 1, 2, 3], np.array([5, 9, 1, 15505]))
    assert path.read_text().splitlines() == ["Id,Predicted", "0,5", "1,9", "2,1", "3,15505"]
    frame = read_submission(path, expected_ids=IDS, valid_category_ids=VALID)
    assert frame["Id"].tolist() == IDS and frame["Predicted"].tolist() == [5, 9, 1, 15505]
    assert frame["Predicted"].dtype == np.int64


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(HerbensError, match="duplicate ids"):
        write_submission(tmp_path / "s.csv", ["a", "a"], [1, 2])
    with pytest.raises(HerbensError, match="integer"):
        write_submission(tmp_path / "s.csv", ["a", "b"], [1.5, 2.0])
    with pytest.raises(HerbensError, match="2 ids"):
        write_submission(tmp_path / "s.csv", ["a", "b"], [1])
    assert not (tmp_path / "s.csv").exists()


def _csv(tmp_path, text):
    path = tmp_path / "sub.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("id,predicted\n0,5\n", "header"),
    ("Id,Predicted,Extra\n0,5,1\n", "header"),
    ("Id,Predicted\n0,5\n1,abc\n2,\n", r"2 predictions are not integers.*Id '1' -> 'abc'; Id '2' -> ''"),
    ("Id,Predicted\n0,5\n1,5.5\n", r"not integers.*Id '1'"),
    ("Id,Predicted\n0,5\n1,9\n0,1\n2,1\n3,1\n", r"duplicate ids: '0'"),
    ("Id,Predicted\n0,5\n1,9\n", r"2 test ids are missing: '2', '3'"),
    ("Id,Predicted\n0,5\n1,9\n2,1\n3,1\n7,1\n", r"1 ids are not test ids: '7'"),
    ("Id,Predicted\n0,5\n1,6\n2,1\n3,0\n", r"2 predictions are not valid category_ids.*Id '1' -> 6; Id '3' -> 0"),
    ("", "empty file"),
])
def test_validator_names_file_and_offending_ids(tmp_path, text, message):
    path = _csv(tmp_path, text)
    with pytest.raises(HerbensError, match=message) as info:
        read_submission(path, expected_ids=IDS, valid_category_ids=VALID)
    assert str(path) in str(info.value)


def test_validator_checks_only_what_it_is_given(tmp_path):
    path = _csv(tmp_path, "Id,Predicted\n0,123456\n")
    assert read_submission(path)["Predicted"].tolist() == [123456]


def test_missing_file(tmp_path):
    with pytest.raises(HerbensError, match="file not found"):
        read_submission(tmp_path / "nope.csv")
