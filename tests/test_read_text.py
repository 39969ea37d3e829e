"""fileio.read_text: the one reader of UTF-8 text files behind read_json and the recipe loader."""

from __future__ import annotations

import pytest

from herbens.config.loading import read_yaml
from herbens.core.errors import HerbensError
from herbens.core.fileio import read_json, read_text


def test_text_json_and_yaml_share_one_reading_of_a_missing_or_non_utf8_file(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"é": 1}', encoding="utf-8")
    assert read_text(good) == '{"é": 1}' and read_json(good) == {"é": 1}
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 1\nname: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(HerbensError, match=rf"{latin}: not UTF-8 text \(byte 17: invalid continuation byte\); "
                                           r"save the recipe as UTF-8"):
        read_yaml(latin)
    with pytest.raises(HerbensError, match=rf"{latin}: not UTF-8 text \(byte 17: [^)]*\)$"):
        read_json(latin)
    for read in (read_text, read_json, read_yaml):
        with pytest.raises(HerbensError, match=rf"{tmp_path / 'absent'}: file not found"):
            read(tmp_path / "absent")
