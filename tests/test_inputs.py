"""Input lists of ``herbens predict`` / ``enrol``: no path is ever dropped silently."""

from __future__ import annotations


import pytest

from herbens.bundle.inputs import collect_inputs
from herbens.core.errors import HerbensError


def test_headerless_csv_is_refused_naming_the_rule(tmp_path):
    listing = tmp_path / "list.csv"
    listing.write_text("a.jpg\nb.jpg\nc.jpg\n")  # before: a.jpg became the header and was lost
    with pytest.raises(HerbensError, match=r"list\.csv: a \.csv list needs a header row naming its path column"):
        collect_inputs(listing)


def test_csv_with_a_named_path_column_keeps_every_row_relative_to_its_folder(tmp_path):
    (tmp_path / "lists").mkdir()
    listing = tmp_path / "lists" / "list.csv"
    listing.write_text("id,File_Name\n1,a.jpg\n2,sub/b.jpg\n3,/abs/c.jpg\n")
    paths, skipped = collect_inputs(listing)
    assert paths == [str(tmp_path / "lists" / "a.jpg"), str(tmp_path / "lists" / "sub" / "b.jpg"), "/abs/c.jpg"]
    assert skipped == []


def test_text_list_keeps_every_line_but_comments(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# sheets\na.jpg\n\nb.jpg\nc.jpg\n")
    assert collect_inputs(listing)[0] == [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg")]


@pytest.mark.parametrize("text", ["", "path\n"])
def test_empty_csv_list_is_an_error(tmp_path, text):
    listing = tmp_path / "list.csv"
    listing.write_text(text)
    with pytest.raises(HerbensError, match="names no image"):
        collect_inputs(listing)
