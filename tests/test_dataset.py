"""HerbariumDataset and load_rgb: labels, odd image modes, reduced decoding, bad files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from herbens.data.dataset import (DEFAULT_MAX_IMAGE_PIXELS, BadImageWarning, HerbariumDataset,
                                  ImageTooLargeError, load_rgb)
from herbens.data.metadata import load_train_metadata
from herbens.data.taxonomy import Taxonomy
from herbens.core.errors import HerbensError

import kaggle_fixtures as kf


def to_tensor(img: Image.Image) -> torch.Tensor:
    assert img.mode == "RGB"
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def pixel(img: Image.Image, xy=(2, 2)) -> tuple[int, int, int]:
    return tuple(int(v) for v in img.getpixel(xy))


def close(a, b, tol=6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.fixture
def kaggle(tmp_path):
    root = kf.write_kaggle2022(tmp_path / "h22")
    meta = load_train_metadata(root / "train_metadata.json")
    return meta, Taxonomy.from_metadata(meta)


# ----- labels and samples -------------------------------------------------------------------

def test_samples_carry_taxonomy_labels(kaggle):
    meta, tax = kaggle
    ds = HerbariumDataset(meta.images, meta.images_dir, tax, to_tensor)
    assert len(ds) == 14
    for i in (0, 5, 13):
        sample = ds[i]
        cid = meta.images["category_id"].iloc[i]
        species = int(tax.index_of([cid])[0])
        assert sample["species"] == species and sample["index"] == i
        assert sample["genus"] == tax.species_to_genus[species]
        assert sample["family"] == tax.species_to_family[species]
        assert sample["image"].shape == (3, 16, 24) and sample["image"].dtype == torch.uint8
    zizia = int(np.flatnonzero(meta.images["category_id"].to_numpy() == 15505)[0])
    assert ds[zizia]["species"] == 3 and ds[zizia]["genus"] == 2 and ds[zizia]["family"] == 0


def test_image_content_matches_its_file(kaggle):
    meta, tax = kaggle
    ds = HerbariumDataset(meta.images, meta.images_dir, tax, None)
    # The fixture paints image k (in metadata order) with colour(k).
    order = {r["file_name"]: k for k, r in enumerate(kf.kaggle2022_metadata()["images"])}
    for i in (0, 7):
        expected = kf.colour(order[meta.images["file_name"].iloc[i]])
        assert close(pixel(ds[i]["image"]), expected)


def test_unlabelled_frame_gives_minus_one(kaggle):
    meta, tax = kaggle
    ds = HerbariumDataset(meta.images.drop(columns="category_id"), meta.images_dir, tax, to_tensor)
    sample = ds[3]
    assert (sample["species"], sample["genus"], sample["family"]) == (-1, -1, -1)
    assert HerbariumDataset(meta.images, meta.images_dir, None, to_tensor)[0]["species"] == -1


def test_dataloader_collates_dicts(kaggle):
    meta, tax = kaggle
    ds = HerbariumDataset(meta.images, meta.images_dir, tax, to_tensor)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 24)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["species"].dtype == torch.int64


def test_views_stack(kaggle):
    meta, tax = kaggle
    flip = lambda im: to_tensor(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # noqa: E731
    ds = HerbariumDataset(meta.images, meta.images_dir, tax, None, views=[to_tensor, flip])
    image = ds[0]["image"]
    assert image.shape == (2, 3, 16, 24)
    assert torch.equal(image[1], image[0].flip(-1))
    pair = lambda im: torch.stack([to_tensor(im), to_tensor(im)])  # noqa: E731 - a five-crop-like view
    assert HerbariumDataset(meta.images, meta.images_dir, tax, None, views=[to_tensor, pair])[0]["image"].shape == (
        3, 3, 16, 24)


def test_bad_arguments(kaggle):
    meta, tax = kaggle
    with pytest.raises(HerbensError, match="unknown bad_image_policy 'ignore'"):
        HerbariumDataset(meta.images, meta.images_dir, tax, to_tensor, bad_image_policy="ignore")
    with pytest.raises(HerbensError, match="no file_name column"):
        HerbariumDataset(meta.images.drop(columns="file_name"), meta.images_dir, tax, to_tensor)
    with pytest.raises(HerbensError, match="unknown category_id 77"):
        HerbariumDataset(meta.images.assign(category_id=77), meta.images_dir, tax, to_tensor)
    with pytest.raises(IndexError):
        HerbariumDataset(meta.images, meta.images_dir, tax, to_tensor)[14]


# ----- image modes decoded to correct RGB ---------------------------------------------------

def save(tmp_path, name, img, **kwargs):
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def test_grayscale(tmp_path):
    path = save(tmp_path, "g.jpg", Image.new("L", (8, 8), 90))
    assert close(pixel(load_rgb(path)), (90, 90, 90), tol=2)


def test_cmyk_jpeg(tmp_path):
    path = save(tmp_path, "c.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    img = load_rgb(path)
    assert img.mode == "RGB" and close(pixel(img), (255, 0, 0), tol=8)


def test_sixteen_bit_png_scaled_not_clipped(tmp_path):
    values = np.tile(np.array([0, 257 * 64, 257 * 128, 65535], dtype=np.uint16), (4, 1))
    path = save(tmp_path, "16.png", Image.fromarray(values))
    assert Image.open(path).mode.startswith("I")
    img = load_rgb(path)
    assert [pixel(img, (x, 1)) for x in range(4)] == [(0, 0, 0), (64, 64, 64), (128, 128, 128), (255, 255, 255)]


def test_palette_png(tmp_path):
    pal = Image.new("P", (4, 4))
    pal.putpalette([200, 10, 30, 5, 220, 40] + [0] * 762)
    pal.putpixel((1, 1), 1)
    path = save(tmp_path, "p.png", pal)
    img = load_rgb(path)
    assert pixel(img, (0, 0)) == (200, 10, 30) and pixel(img, (1, 1)) == (5, 220, 40)


def test_palette_transparency_becomes_white(tmp_path):
    pal = Image.new("P", (4, 4))
    pal.putpalette([200, 10, 30, 5, 220, 40] + [0] * 762)
    pal.putpixel((1, 1), 1)
    path = save(tmp_path, "pt.png", pal, transparency=0)
    img = load_rgb(path)
    assert pixel(img, (0, 0)) == (255, 255, 255) and pixel(img, (1, 1)) == (5, 220, 40)


@pytest.mark.parametrize("mode,colour", [("RGBA", (10, 20, 30, 0)), ("LA", (10, 0))])
def test_transparent_pixels_become_white(tmp_path, mode, colour):
    img = Image.new(mode, (4, 4), colour)
    img.putpixel((1, 1), (10, 20, 30, 255) if mode == "RGBA" else (10, 255))
    out = load_rgb(save(tmp_path, "a.png", img))
    assert pixel(out, (0, 0)) == (255, 255, 255)
    assert pixel(out, (1, 1)) == ((10, 20, 30) if mode == "RGBA" else (10, 10, 10))


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # left quarter red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = save(tmp_path, "rot.jpg", img, exif=exif.tobytes())
    out = load_rgb(path)
    assert out.size == (10, 20)
    assert close(pixel(out, (5, 1)), (255, 0, 0), tol=12)  # the left edge is now the top
    assert close(pixel(out, (5, 18)), (0, 0, 255), tol=12)


# ----- reduced-size decoding ----------------------------------------------------------------

def test_decode_size_uses_reduced_scale_but_never_too_small(tmp_path):
    path = save(tmp_path, "big.jpg", Image.new("RGB", (1000, 800), (120, 60, 30)))
    out = load_rgb(path, decode_size=(200, 200))
    assert 200 <= out.height < 400 and 200 <= out.width < 500
    assert load_rgb(path, decode_size=(800, 300)).size == (1000, 800)  # height needs full scale
    assert close(pixel(out), (120, 60, 30))


def test_decode_size_respects_rotation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, "rot.jpg", Image.new("RGB", (800, 400), (1, 2, 3)), exif=exif.tobytes())
    out = load_rgb(path, decode_size=(100, 400))  # displayed 400 x 800: full width needed
    assert out.width >= 400 and out.height >= 100 and out.height > out.width


def test_jpeg_draft_requested_in_file_coordinates(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    calls = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append((mode, tuple(size)))
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    plain = save(tmp_path, "plain.jpg", Image.new("RGB", (1000, 1000), (1, 2, 3)))
    # Draft scales by powers of two only: 1/2 covers 300 px, so 500 px (a 3x box-reduce
    # without draft would give 334 px).
    assert load_rgb(plain, decode_size=(300, 200)).size == (500, 500)
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = save(tmp_path, "rot.jpg", Image.new("RGB", (1000, 1000), (1, 2, 3)), exif=exif.tobytes())
    load_rgb(rotated, decode_size=(300, 200))
    assert calls == [("RGB", (200, 300)), ("RGB", (300, 200))]
    load_rgb(plain)
    assert len(calls) == 2  # no decode_size: full-size decode


def test_decode_size_reduces_other_formats(tmp_path):
    path = save(tmp_path, "big.png", Image.new("RGB", (900, 600), (9, 99, 199)))
    out = load_rgb(path, decode_size=(100, 100))
    assert out.size == (150, 100) and pixel(out) == (9, 99, 199)


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    # 108 megapixels: above Pillow's default warning limit. A flat grey image compresses to ~1 MB
    # and encodes in a fraction of a second.
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.new("L", (12000, 9000), 200).save(path, quality=50)
    return path


def test_huge_image_is_not_a_decompression_bomb(huge_jpeg):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        out = load_rgb(huge_jpeg, decode_size=(224, 224))
    assert out.mode == "RGB" and 224 <= min(out.size) and max(out.size) <= 12000 // 8
    assert close(pixel(out), (200, 200, 200), tol=2)


def test_huge_image_through_dataset(huge_jpeg):
    frame = pd.DataFrame({"file_name": [huge_jpeg.name]})
    ds = HerbariumDataset(frame, huge_jpeg.parent, None, to_tensor, decode_size=(224, 224))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert min(ds[0]["image"].shape[1:]) >= 224


def bomb_png(path: Path, size=(400, 300)) -> Path:
    """A PNG whose header declares ``size`` but whose pixel data is cut off: decoding it would
    fail, so a refusal that names the size proves the check came before decoding."""
    Image.new("L", size, 128).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:60])  # signature, IHDR, the start of IDAT
    return path


def test_pixel_limit_refuses_before_decoding(tmp_path):
    path = bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ImageTooLargeError, match=r"bomb.png is 400 x 300 = 120,000 pixels, over the limit of "
                                                 r"100,000 \(data.max_image_pixels"):
        load_rgb(path, max_pixels=100_000)
    with pytest.raises(HerbensError, match="cannot decode"):  # under the limit it is decoded (and fails)
        load_rgb(path, max_pixels=120_000)
    assert DEFAULT_MAX_IMAGE_PIXELS == 2 * 89_478_485  # Pillow's own hard limit


def test_pixel_limit_in_the_dataset_and_the_loader(tmp_path):
    kf.write_image(tmp_path / "big.jpg", 3)
    Image.new("RGB", (16, 16), (90, 120, 60)).save(tmp_path / "good.jpg")
    frame = pd.DataFrame({"file_name": ["big.jpg", "good.jpg"]})
    limit = Image.open(tmp_path / "big.jpg").size[0] * Image.open(tmp_path / "big.jpg").size[1] - 1
    with pytest.raises(ImageTooLargeError, match="big.jpg"):
        HerbariumDataset(frame, tmp_path, None, to_tensor, max_pixels=limit)[0]
    skipping = HerbariumDataset(frame, tmp_path, None, to_tensor, bad_image_policy="skip", max_pixels=limit)
    with pytest.warns(BadImageWarning, match="over the limit"):
        assert skipping[0]["unreadable"] is True
    assert HerbariumDataset(frame, tmp_path, None, to_tensor)[0]["unreadable"] is False
    from herbens.data.loaders import predict_loader
    from herbens.data.transforms import build_tta_views

    cfg = {"data": {"bad_images": "error", "num_workers": 0, "max_image_pixels": limit},
           "infer": {"batch_size": 2}}
    views = build_tta_views(["center"], {"input_size": (3, 32, 32), "interpolation": "bilinear",
                                         "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0})
    with pytest.raises(ImageTooLargeError, match="big.jpg"):
        next(iter(predict_loader(frame, tmp_path, None, views, cfg)))


# ----- bad files ----------------------------------------------------------------------------

def make_bad(tmp_path, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "corrupt":
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    elif kind == "truncated":
        buffer = tmp_path / "whole.jpg"
        noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buffer, quality=95)
        data = buffer.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    return path  # "missing": never written


BAD_KINDS = ["corrupt", "truncated", "empty", "text", "missing"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_file_raises_naming_it(tmp_path, kind):
    path = make_bad(tmp_path, kind)
    with pytest.raises(HerbensError, match=f"{kind}.jpg"):
        load_rgb(path)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_policy_error_raises(tmp_path, kind):
    bad = make_bad(tmp_path, kind)
    kf.write_image(tmp_path / "good.jpg", 3)
    frame = pd.DataFrame({"file_name": [bad.name, "good.jpg"]})
    ds = HerbariumDataset(frame, tmp_path, None, to_tensor, bad_image_policy="error")
    with pytest.raises(HerbensError, match=bad.name):
        ds[0]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_policy_skip_returns_next_readable(tmp_path, kind):
    bad = make_bad(tmp_path, kind)
    kf.write_image(tmp_path / "good.jpg", 3)
    kf.write_image(tmp_path / "other.jpg", 9)
    frame = pd.DataFrame({"file_name": ["other.jpg", bad.name, "good.jpg"], "category_id": [42, 3, 7]})
    tax = Taxonomy([3, 7, 42], ["a a", "b b", "c c"], ["a", "b", "c"], ["f"], [0, 1, 2], [0, 0, 0], [1, 1, 1])
    ds = HerbariumDataset(frame, tmp_path, tax, to_tensor, bad_image_policy="skip")
    with pytest.warns(BadImageWarning, match=bad.name):
        sample = ds[1]
    assert sample["index"] == 1
    assert sample["species"] == 1  # the labels travel with the substitute image (good.jpg)
    assert close(tuple(sample["image"][:, 2, 2].tolist()), kf.colour(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no new warning
        ds[1]
    assert ds.bad_images == [str(bad)]
    assert ds[0]["species"] == 2 and ds[2]["species"] == 1


def test_skip_wraps_around_and_fails_when_nothing_readable(tmp_path):
    make_bad(tmp_path, "empty")
    kf.write_image(tmp_path / "good.jpg", 1)
    ds = HerbariumDataset(pd.DataFrame({"file_name": ["good.jpg", "empty.jpg"]}), tmp_path, None, to_tensor,
                          bad_image_policy="skip")
    with pytest.warns(BadImageWarning):
        assert close(tuple(ds[1]["image"][:, 0, 0].tolist()), kf.colour(1))
    nothing = HerbariumDataset(pd.DataFrame({"file_name": ["empty.jpg", "missing.jpg"]}), tmp_path, None,
                               to_tensor, bad_image_policy="skip")
    with pytest.warns(BadImageWarning), pytest.raises(HerbensError, match="no readable image"):
        nothing[0]
