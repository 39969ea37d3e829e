"""``herbens prepare`` (resized dataset copy) and the loaders' reduced-size decoding rule."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from herbens.cli.main import main as cli_main
from herbens.config import load_config
from herbens.data.dataset import HerbariumDataset
from herbens.data.loaders import train_decode_size
from herbens.data.metadata import find_dataset, load_test_metadata, load_train_metadata
from herbens.data.prepare import default_output, prepare_dataset
from herbens.data.transforms import eval_decode_size
from herbens.core.errors import HerbensError

SIZE = 40  # the tiny herbarium's sheets are 64 px high


@pytest.fixture
def herbarium(tiny_herbarium, tmp_path):
    """A private copy of the tiny herbarium (tests modify it)."""
    root = tmp_path / "h22"
    shutil.copytree(tiny_herbarium, root)
    return root


def all_images(root):
    meta = load_train_metadata(root / "train_metadata.json")
    test = load_test_metadata(root / "test_metadata.json")
    return ([meta.images_dir / f for f in meta.images["file_name"]]
            + [test.attrs["images_dir"] / f for f in test["file_name"]])


def test_writes_a_resized_drop_in_copy(herbarium, tmp_path):
    out = tmp_path / "small"
    summary = prepare_dataset(herbarium, SIZE, out, workers=1, progress=False)
    sources = all_images(herbarium)
    assert summary["images"] == summary["resized"] == len(sources)
    for src in sources:
        dst = out / src.relative_to(herbarium)
        with Image.open(src) as a, Image.open(dst) as b:
            assert max(b.size) == SIZE and b.format == "JPEG" and b.mode == "RGB"
            # Aspect ratio kept (to the rounding of one pixel).
            assert abs(b.size[0] / b.size[1] - a.size[0] / a.size[1]) < 2 / SIZE
    for name in ("train_metadata.json", "test_metadata.json", "sample_submission.csv", "test_solution.csv"):
        assert (out / name).read_bytes() == (herbarium / name).read_bytes()
    # The copy is a dataset in its own right, with the same tables.
    train, test = find_dataset(out)
    assert load_train_metadata(train).images.equals(load_train_metadata(herbarium / "train_metadata.json").images)
    assert load_test_metadata(test)["file_name"].tolist() == load_test_metadata(herbarium / "test_metadata.json")["file_name"].tolist()
    assert not [p for p in out.rglob(".*tmp-*")]


def test_content_is_the_downscaled_image(herbarium, tmp_path):
    out = tmp_path / "small"
    prepare_dataset(herbarium, SIZE, out, workers=1, progress=False)
    src = all_images(herbarium)[0]
    dst = out / src.relative_to(herbarium)
    with Image.open(src) as a, Image.open(dst) as b:
        reference = np.asarray(a.convert("RGB").resize(b.size, Image.Resampling.LANCZOS), np.float32)
        got = np.asarray(b.convert("RGB"), np.float32)
    assert np.abs(reference - got).mean() < 6  # JPEG quality 90 noise, not another picture


def test_rerun_skips_what_is_done_and_redoes_what_changed(herbarium, tmp_path):
    out = tmp_path / "small"
    prepare_dataset(herbarium, SIZE, out, workers=1, progress=False)
    again = prepare_dataset(herbarium, SIZE, out, workers=1, progress=False)
    assert again["done"] == again["images"] and again["resized"] == 0
    sources = all_images(herbarium)
    (out / sources[0].relative_to(herbarium)).unlink()          # lost output
    later = os.stat(out / sources[1].relative_to(herbarium)).st_mtime + 10
    os.utime(sources[1], (later, later))                         # source changed since
    Image.new("RGB", (20, 7)).save(out / sources[2].relative_to(herbarium))  # wrong size
    third = prepare_dataset(herbarium, SIZE, out, workers=1, progress=False)
    assert third["resized"] == 3 and third["done"] == third["images"] - 3


def test_parallel_workers_write_the_same_bytes(herbarium, tmp_path):
    prepare_dataset(herbarium, SIZE, tmp_path / "one", workers=1, progress=False)
    summary = prepare_dataset(herbarium, SIZE, tmp_path / "two", workers=2, progress=False)
    assert summary["resized"] == summary["images"]
    for src in all_images(herbarium):
        rel = src.relative_to(herbarium)
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()


def test_exif_rotation_is_applied_once(herbarium, tmp_path):
    src = all_images(herbarium)[0]
    with Image.open(src) as image:
        width, height = image.size
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        image.save(src, exif=exif.tobytes(), quality=95)
    out = tmp_path / "small"
    prepare_dataset(herbarium, SIZE, out, workers=1, progress=False)
    with Image.open(out / src.relative_to(herbarium)) as image:
        assert image.getexif().get(0x0112, 1) == 1
        assert image.size == (SIZE, round(width * SIZE / height))  # upright: landscape now


def test_small_and_unreadable_images_are_copied_unchanged(herbarium, tmp_path):
    sources = all_images(herbarium)
    bad = sources[3]
    bad.write_bytes(b"not a jpeg")
    missing = sources[4]
    missing.unlink()
    out = tmp_path / "big"
    summary = prepare_dataset(herbarium, 1000, out, workers=1, progress=False)
    assert summary["copied"] == len(sources) - 2 and summary["unreadable"] == 1 and summary["missing"] == 1
    assert (out / sources[0].relative_to(herbarium)).read_bytes() == sources[0].read_bytes()
    assert (out / bad.relative_to(herbarium)).read_bytes() == b"not a jpeg"
    assert not (out / missing.relative_to(herbarium)).exists()


def test_default_output_and_cli(herbarium, capsys):
    assert default_output(herbarium, 96) == herbarium.resolve().parent / "h22_96"
    assert cli_main(["prepare", str(herbarium), "--size", str(SIZE), "--workers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    out = herbarium.parent / f"h22_{SIZE}"
    assert f"data.root={out}" in printed and (out / "train_metadata.json").exists()


def test_bad_arguments(herbarium, tmp_path, capsys):
    with pytest.raises(HerbensError, match="is the dataset itself"):
        prepare_dataset(herbarium, SIZE, herbarium, workers=1, progress=False)
    with pytest.raises(HerbensError, match="--size"):
        prepare_dataset(herbarium, 4, tmp_path / "x", workers=1, progress=False)
    assert cli_main(["prepare", str(tmp_path / "nowhere"), "--size", "64"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_prepared_copy_trains(herbarium, tmp_path):
    from conftest import train_tiny

    out = tmp_path / "small"
    prepare_dataset(herbarium, SIZE, out, workers=1, progress=False)
    assert train_tiny(out, tmp_path / "runs", extra=["name=p", "train.epochs=1", "infer.splits=[]"]) == 0


# ----- the decode-size rule ---------------------------------------------------------------

def crop_extremes(cfg, image_hw):
    """Narrowest crop width and shortest crop height RandomResizedCrop can cut (in pixels)."""
    area = image_hw[0] * image_hw[1] * min(cfg["augment"]["scale"])
    low, high = sorted(cfg["augment"]["ratio"])
    return math.sqrt(area * low), math.sqrt(area / high)


@pytest.mark.parametrize("recipe", ["demo_ce", "_base", "convnext_b", "paper_vit_b16"])
@pytest.mark.parametrize("aspect", [0.5, 0.68, 1.0, 1.5])
def test_train_decode_size_never_upsamples_the_smallest_crop(recipe, aspect):
    cfg = load_config(recipe)
    height, width = cfg["input"]["size"] if isinstance(cfg["input"]["size"], list) else [cfg["input"]["size"]] * 2
    decode = train_decode_size(cfg)
    # The decoder returns the smallest image covering `decode` in both dimensions; check the
    # worst case, an image exactly that small in its binding dimension.
    rows = max(decode[0], decode[1] / aspect)
    narrowest, shortest = crop_extremes(cfg, (rows, rows * aspect))
    assert narrowest >= width - 1e-6 and shortest >= height - 1e-6


def test_train_decode_size_is_tight_for_a_matching_aspect():
    cfg = load_config("demo_ce", ["input.size=[100,100]", "augment.scale=[0.25,1.0]", "augment.ratio=[1.0,1.0]"])
    assert train_decode_size(cfg) == (200, 200)  # a quarter of the area: half of each side
    cfg = load_config("demo_ce", ["augment.scale=[0.0,1.0]"])
    assert train_decode_size(cfg) is None


def test_eval_decode_size_covers_every_view():
    square = {"input_size": (3, 224, 224), "crop_pct": 0.875}
    assert eval_decode_size(square) == (256, 256)  # shorter side resized to 224 / 0.875
    portrait = {"input_size": (3, 128, 88), "crop_pct": None}
    assert eval_decode_size(portrait, ["center", "hflip"]) == (101, 101)
    assert eval_decode_size(portrait, ["center", "full"]) == (128, 101)
    assert eval_decode_size(square, ["tencrop@1.5", "letterbox"]) == (336, 336)
    assert eval_decode_size(square, ["center", "rrc8"]) is None  # not covered: full size


def test_eval_views_see_the_same_pixels_with_reduced_decoding(tmp_path):
    from herbens.data.transforms import build_tta_views

    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (1000, 680, 3), dtype=np.uint8))
    image.save(tmp_path / "sheet.jpg", quality=90)
    frame = pd.DataFrame({"file_name": ["sheet.jpg"]})
    data_config = {"input_size": (3, 96, 64), "crop_pct": 0.9, "interpolation": "bilinear",
                   "mean": (0.5,) * 3, "std": (0.5,) * 3}
    names = ["center", "full", "fivecrop"]
    views = [fn for _, fn in build_tta_views(names, data_config)]
    full = HerbariumDataset(frame, tmp_path, None, None, views=views)[0]["image"]
    reduced = HerbariumDataset(frame, tmp_path, None, None, views=views,
                               decode_size=eval_decode_size(data_config, names))[0]["image"]
    assert reduced.shape == full.shape
    # Downscaling from a DCT-reduced decode instead of the full image: the same picture.
    assert (reduced - full).abs().mean() < 0.05


def test_reduced_decoding_shrinks_big_jpegs_but_never_below_the_rule(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1000, 680, 3), dtype=np.uint8))
    image.save(tmp_path / "sheet.jpg", quality=90)
    frame = pd.DataFrame({"file_name": ["sheet.jpg"]})
    # 128 x 88 input, crops down to half the area
    cfg = load_config("demo_ce", ["input.size=[128,88]", "augment.scale=[0.5,1.0]",
                                  "augment.ratio=[0.75,1.3333]"])
    decode = train_decode_size(cfg)
    decoded = HerbariumDataset(frame, tmp_path, None, None, decode_size=decode)[0]["image"]
    assert decoded.size == (340, 500)  # 1/2 DCT scale; 1/4 would be too small
    assert decoded.size[1] >= decode[0] and decoded.size[0] >= decode[1]
