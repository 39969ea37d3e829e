"""``herbens check``: every kind of problem is found, reported and reflected in the exit status."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from herbens.cli.main import main
from herbens.data.check import PROBLEMS, check_dataset, format_report

import kaggle_fixtures as kf


def test_clean_dataset(tmp_path, capsys):
    root = kf.write_kaggle2022(tmp_path / "h22")
    report = check_dataset(root, progress=False)
    assert report["ok"] is True
    assert set(report["problems"]) == set(PROBLEMS) and not any(report["problems"].values())
    assert report["counts"] == {"train_images": 14, "categories": 4, "genera": 3, "families": 3,
                                "test_images": 3, "files_checked": 17}
    assert main(["check", str(root), "--workers", "1", "--no-progress"]) == 0
    assert "OK: no problems found" in capsys.readouterr().out


@pytest.fixture
def dirty(tmp_path):
    """A Kaggle 2022 dataset with one problem of every kind."""
    meta = kf.kaggle2022_metadata(counts={3: 4, 7: 3, 42: 5})  # Zizia (15505): no images
    meta["images"].append(dict(meta["images"][0]))  # duplicate image id 00003__000
    meta["annotations"][0]["category_id"] = 999  # unknown category (last image listed)
    meta["annotations"].append({"image_id": "ghost", "category_id": 3})  # unknown image
    meta["annotations"] = [a for a in meta["annotations"] if a["image_id"] != "00007__002"]  # unannotated
    root = kf.write_kaggle2022(tmp_path / "h22", meta=meta)
    train = root / "train_images"
    (train / kf.kaggle2022_file_name(3, "00003__001")).unlink()  # missing
    (train / kf.kaggle2022_file_name(3, "00003__002")).write_bytes(b"\xff\xd8\xff garbage")  # corrupt
    data = (train / kf.kaggle2022_file_name(42, "00042__000")).read_bytes()
    (train / kf.kaggle2022_file_name(42, "00042__003")).write_bytes(data)  # duplicate bytes
    (root / "test_images" / "000" / "test-000001.jpg").unlink()
    (root / "test_images" / "000" / "test-000002.jpg").write_text("not an image")
    test = kf.kaggle2022_test_metadata(3) + [{"image_id": 2, "file_name": "000/test-000000.jpg"}]
    (root / "test_metadata.json").write_text(json.dumps(test))
    return root


def test_every_problem_found(dirty):
    report = check_dataset(dirty, workers=2, progress=False)
    p = report["problems"]
    assert report["ok"] is False
    assert p["duplicate_image_ids"] == ["00003__000"]
    assert p["unknown_images"] == ["ghost"]
    assert p["unknown_categories"] == ["00042__004 (category_id 999)"]
    assert p["unannotated_images"] == ["00007__002"]
    assert p["empty_classes"] == ["15505 (Zizia aurea)"]
    assert p["missing_images"] == ["train_images/000/03/00003__001.jpg"]
    assert len(p["unreadable_images"]) == 1 and p["unreadable_images"][0].startswith(
        "train_images/000/03/00003__002.jpg: ")
    assert p["duplicate_images"] == ["train_images/000/42/00042__000.jpg = train_images/000/42/00042__003.jpg"]
    assert p["duplicate_test_ids"] == ["2"]
    assert p["missing_test_images"] == ["test_images/000/test-000001.jpg"]
    assert p["unreadable_test_images"][0].startswith("test_images/000/test-000002.jpg: ")
    assert p["duplicate_annotations"] == [] and p["duplicate_category_ids"] == []
    # in-process and pool scans agree
    assert check_dataset(dirty, workers=1, progress=False) == report


def test_cli_reports_problems_with_status_1(dirty, capsys, tmp_path):
    out_json = tmp_path / "report.json"
    assert main(["check", str(dirty), "--workers", "1", "--no-progress", "--json", str(out_json)]) == 1
    out = capsys.readouterr().out
    assert "training image file missing [missing_images]: 1" in out
    assert "train_images/000/03/00003__001.jpg" in out
    assert "category without any training image [empty_classes]: 1" in out
    assert "PROBLEMS:" in out
    assert json.loads(out_json.read_text())["problems"]["unknown_images"] == ["ghost"]


def test_report_lists_first_few_only():
    report = {"root": "r", "train_metadata": "t", "test_metadata": None,
              "counts": {"train_images": 9, "categories": 1, "genera": 1, "families": 1,
                         "test_images": 0, "files_checked": 9},
              "problems": {kind: [] for kind in PROBLEMS}, "ok": False}
    report["problems"]["missing_images"] = [f"img{i}.jpg" for i in range(9)]
    text = format_report(report, limit=3)
    assert "img2.jpg" in text and "img3.jpg" not in text and "... and 6 more" in text


def test_truncated_jpeg_is_unreadable(tmp_path):
    root = kf.write_kaggle2022(tmp_path / "h22", counts={3: 2, 7: 2, 42: 2, 15505: 2})
    path = root / "train_images" / kf.kaggle2022_file_name(7, "00007__001")
    # A noisy image (plenty of entropy-coded data) with its end cut off.
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-400])
    report = check_dataset(root, progress=False)
    assert [u.split(":")[0] for u in report["problems"]["unreadable_images"]] == [
        "train_images/000/07/00007__001.jpg"]
    assert "truncated" in report["problems"]["unreadable_images"][0]


def test_images_over_the_pixel_limit_are_reported(tmp_path, capsys):
    root = kf.write_kaggle2022(tmp_path / "h22", counts={3: 2, 7: 2})
    path = root / "train_images" / kf.kaggle2022_file_name(7, "00007__001")
    width, height = Image.open(path).size
    report = check_dataset(root, progress=False, max_pixels=width * height - 1)
    oversized = report["problems"]["oversized_images"]
    assert len(oversized) == 4 and not report["ok"]  # every training image is that size here
    assert (f"train_images/000/07/00007__001.jpg: {width} x {height} = {width * height:,} pixels, "
            f"over {width * height - 1:,}") in oversized
    assert not report["problems"]["unreadable_images"]
    assert check_dataset(root, progress=False)["problems"]["oversized_images"] == []  # default limit
    assert main(["check", str(root), "--workers", "2", "--no-progress",
                 "--max-image-pixels", str(width * height - 1)]) == 1
    assert "oversized_images" in capsys.readouterr().out


def test_kaggle2021_layout(tmp_path):
    root = kf.write_kaggle2021(tmp_path / "h21")
    report = check_dataset(root, progress=False)
    assert report["ok"] is True and report["counts"]["train_images"] == 7
    assert report["counts"]["test_images"] == 2 and report["counts"]["files_checked"] == 9


def test_unreadable_metadata_is_exit_2(tmp_path, capsys):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "train_metadata.json").write_text("{not json")
    assert main(["check", str(root), "--no-progress"]) == 2
    assert "herbens: error:" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "nowhere"), "--no-progress"]) == 2
