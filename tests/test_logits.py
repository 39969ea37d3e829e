"""The logits store: round trip, atomicity, and refusal of broken directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from herbens.core.errors import HerbensError
from herbens.stores.logits import logits_dir, open_logits_writer, read_logits, write_logits

META = {"taxonomy_hash": "0123456789abcdef", "model": "test_model"}


def _logits(rng, n=6, species=5, genus=3):
    return {"species": rng.standard_normal((n, species)).astype(np.float32),
            "genus": rng.standard_normal((n, genus)).astype(np.float32)}


def test_round_trip_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    logits = _logits(rng)
    ids = [10, 11, 12, 13, 14, 15]
    labels = np.array([0, 4, -1, 2, 3, 1])
    write_logits(tmp_path, "val", ids, logits, META, labels=labels, chunk_rows=4)
    split = read_logits(tmp_path, "val")
    assert split.image_ids == [str(i) for i in ids]
    assert split.levels == ("species", "genus")
    assert isinstance(split.level("species"), np.memmap)
    assert split.level("species").dtype == np.float16
    np.testing.assert_array_equal(split.level("species"), logits["species"].astype(np.float16))
    np.testing.assert_array_equal(split.level("genus"), logits["genus"].astype(np.float16))
    np.testing.assert_array_equal(split.labels, labels)
    assert split.meta["levels"] == {"species": [6, 5], "genus": [6, 3]}
    assert split.meta["taxonomy_hash"] == META["taxonomy_hash"] and split.meta["model"] == "test_model"
    assert split.meta["split"] == "val" and split.meta["dtype"] == "float16"
    in_memory = read_logits(tmp_path, "val", mmap=False)
    assert not isinstance(in_memory.level("species"), np.memmap)
    with pytest.raises(HerbensError, match="no 'family' logits"):
        split.level("family")


def test_labels_are_optional(tmp_path):
    write_logits(tmp_path, "test", ["a", "b"], {"species": np.zeros((2, 3))}, META)
    assert read_logits(tmp_path, "test").labels is None


def test_views_are_averaged_and_kept_on_request(tmp_path):
    rng = np.random.default_rng(1)
    views = rng.standard_normal((4, 3, 5)).astype(np.float32)
    write_logits(tmp_path, "test", list("abcd"), {"species": views}, {**META, "views": ["a", "b", "c"]},
                 keep_views=True)
    split = read_logits(tmp_path, "test")
    np.testing.assert_array_equal(split.level("species"), views.mean(axis=1).astype(np.float16))
    np.testing.assert_array_equal(split.views("species"), views.astype(np.float16))
    assert split.meta["views"] == ["a", "b", "c"] and split.meta["view_levels"] == {"species": [4, 3, 5]}
    write_logits(tmp_path, "val", list("abcd"), {"species": views}, META)
    assert not read_logits(tmp_path, "val").has_views("species")


def test_block_writer_matches_write_logits(tmp_path):
    rng = np.random.default_rng(2)
    species = rng.standard_normal((7, 4))
    with open_logits_writer(tmp_path / "a", "test", range(7), {"species": 4}, META) as writer:
        writer.write("species", 4, species[4:])
        writer.write("species", 0, species[:4])
    write_logits(tmp_path / "b", "test", range(7), {"species": species}, META)
    np.testing.assert_array_equal(read_logits(tmp_path / "a", "test").level("species"),
                                  read_logits(tmp_path / "b", "test").level("species"))


def test_crash_inside_writer_keeps_older_complete_split(tmp_path):
    old = {"species": np.ones((3, 2))}
    write_logits(tmp_path, "val", ["a", "b", "c"], old, META)
    with pytest.raises(RuntimeError, match="simulated crash"):
        with open_logits_writer(tmp_path, "val", ["x", "y", "z"], {"species": 2}, META) as writer:
            writer.write("species", 0, np.zeros((2, 2)))
            raise RuntimeError("simulated crash")
    split = read_logits(tmp_path, "val")
    assert split.image_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(split.level("species"), np.ones((3, 2), np.float16))
    assert [p.name for p in (tmp_path / "logits").iterdir()] == ["val"]  # no temporary left behind


def test_crash_on_first_write_leaves_nothing_readable(tmp_path):
    with pytest.raises(RuntimeError):
        with open_logits_writer(tmp_path, "test", ["a"], {"species": 2}, META):
            raise RuntimeError("simulated crash")
    with pytest.raises(HerbensError, match=r"run '.*', split 'test': no logits directory"):
        read_logits(tmp_path, "test")


def test_rows_never_written_are_refused(tmp_path):
    with pytest.raises(HerbensError, match="never written"):
        with open_logits_writer(tmp_path, "test", ["a", "b", "c"], {"species": 2}, META) as writer:
            writer.write("species", 0, np.zeros((2, 2)))
    assert not logits_dir(tmp_path, "test").exists()


@pytest.mark.parametrize("value, dtype", [(np.inf, np.float32), (np.nan, np.float64), (1e6, np.float32),
                                          (np.inf, np.float16)])
def test_values_not_finite_in_float16_are_refused(tmp_path, value, dtype):
    species = np.zeros((3, 2), dtype=dtype)
    species[1, 1] = value
    with pytest.raises(HerbensError, match="species row 1 is not finite"):
        write_logits(tmp_path, "test", ["a", "b", "c"], {"species": species}, META)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(HerbensError, match="duplicate image ids"):
        write_logits(tmp_path, "test", ["a", "a"], {"species": np.zeros((2, 2))}, META)
    with pytest.raises(HerbensError, match="taxonomy_hash"):
        write_logits(tmp_path, "test", ["a"], {"species": np.zeros((1, 2))}, {"model": "x"})
    with pytest.raises(HerbensError, match="shape"):
        write_logits(tmp_path, "test", ["a", "b"], {"species": np.zeros((3, 2))}, META)
    with pytest.raises(HerbensError, match="labels"):
        write_logits(tmp_path, "test", ["a", "b"], {"species": np.zeros((2, 2))}, META, labels=[0, 2])
    with pytest.raises(HerbensError, match="species logits are required"):
        write_logits(tmp_path, "test", ["a"], {"genus": np.zeros((1, 2))}, META)


@pytest.fixture
def written(tmp_path):
    run = tmp_path / "run7"
    write_logits(run, "val", ["a", "b", "c"], {"species": np.zeros((3, 4)), "genus": np.zeros((3, 2))}, META,
                 labels=[0, 1, 2])
    return run, logits_dir(run, "val")


def test_missing_meta_is_refused_naming_run_and_split(written):
    run, path = written
    (path / "meta.json").unlink()
    with pytest.raises(HerbensError, match=r"run '.*run7', split 'val': .*meta.json is missing"):
        read_logits(run, "val")


def test_truncated_matrix_is_refused_naming_run_and_split(written):
    run, path = written
    data = (path / "species.npy").read_bytes()
    (path / "species.npy").write_bytes(data[:-5])
    with pytest.raises(HerbensError, match=r"run '.*run7', split 'val': species.npy .*\(truncated\)"):
        read_logits(run, "val")


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("changes, message", [
    ({"levels": {"species": [3, 5], "genus": [3, 2]}}, "shape"),
    ({"levels": {"genus": [3, 2]}}, "no species logits"),
    ({"levels": {"species": [3, 4], "order": [3, 2]}}, "unknown level"),
    ({"dtype": "float32"}, "dtype"),
    ({"format_version": 9}, "format_version"),
    ({"split": "test"}, "says split"),
])
def test_inconsistent_meta_is_refused(written, changes, message):
    run, path = written
    _edit_meta(path, **changes)
    with pytest.raises(HerbensError, match=message):
        read_logits(run, "val")


def test_ids_must_match_rows_and_be_unique(written):
    run, path = written
    (path / "image_ids.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(HerbensError, match="3 rows for 2 image ids"):
        read_logits(run, "val")
    (path / "image_ids.json").write_text(json.dumps(["a", "b", "a"]))
    with pytest.raises(HerbensError, match="duplicate image ids"):
        read_logits(run, "val")


def test_bad_labels_file_is_refused(written):
    run, path = written
    np.save(path / "labels.npy", np.array([0, 1, 9]))
    with pytest.raises(HerbensError, match="labels.npy has species indices outside"):
        read_logits(run, "val")


def test_taxonomy_check(written):
    from herbens.data.taxonomy import Taxonomy

    run, _ = written
    tax = Taxonomy([1, 2, 3, 4], list("ABCD"), ["g0", "g1"], ["f0"], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1])
    with pytest.raises(HerbensError, match="written for taxonomy 0123456789abcdef"):
        read_logits(run, "val", taxonomy=tax)
