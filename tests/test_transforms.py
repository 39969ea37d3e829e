"""Training transform and test-time views: shapes, geometry and determinism."""

import numpy as np
import pytest
import torch
from PIL import Image

from herbens.data.transforms import (build_train_transform, build_tta_views, model_data_config, parse_view,
                                     view_row_names)
from herbens.core.errors import HerbensError

CONFIG = {"input_size": (3, 32, 24), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
          "crop_pct": 1.0, "interpolation": "bilinear"}


def gradient_sheet(width=60, height=80) -> Image.Image:
    """Red grows left to right, green top to bottom: flips and crops are visible in values."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))


def view(name, image=None):
    return build_tta_views([name], CONFIG)[0][1](image or gradient_sheet())


@pytest.mark.parametrize("name, rows", [("center", 1), ("hflip", 1), ("vflip", 1), ("full", 1),
                                        ("letterbox", 1), ("fivecrop", 5), ("tencrop@1.2", 10),
                                        ("rrc3", 3), ("center@1.14", 1)])
def test_every_view_has_the_input_size(name, rows):
    out = view(name)
    shape = (3, 32, 24) if rows == 1 else (rows, 3, 32, 24)
    assert tuple(out.shape) == shape


def test_flips_mirror_the_centre_view():
    centre = view("center")
    assert torch.allclose(view("hflip"), centre.flip(-1), atol=1e-6)
    assert torch.allclose(view("vflip"), centre.flip(-2), atol=1e-6)


def test_full_view_keeps_the_whole_sheet_and_letterbox_pads_with_paper():
    full = view("full")
    # The squashed sheet spans the whole red gradient; a centre crop would not.
    assert full[0, :, 0].mean() < 0.05 and full[0, :, -1].mean() > 0.95
    wide = Image.new("RGB", (80, 20), (0, 0, 0))
    boxed = view("letterbox", wide)
    assert torch.all(boxed[:, 0, :] == 1.0)  # white padding above a wide image
    assert torch.all(boxed[:, 16, :] == 0.0)  # the black image in the middle


def test_tencrop_is_fivecrop_plus_mirrors():
    five = view("fivecrop")
    ten = view("tencrop")
    assert torch.allclose(ten[:5], five)
    assert torch.allclose(ten[5:], five.flip(-1), atol=1e-6)


def test_random_resized_views_are_seeded_and_differ_from_each_other():
    first, second = view("rrc4"), view("rrc4")
    assert torch.equal(first, second)
    assert not torch.allclose(first[0], first[1])


def test_unknown_view_names_are_errors():
    with pytest.raises(HerbensError, match="sevencrop"):
        build_tta_views(["sevencrop"], CONFIG)
    with pytest.raises(HerbensError, match="scale"):
        build_tta_views(["center@big"], CONFIG)


def test_train_transform_with_rotation_and_non_square_size():
    config = model_data_config(CONFIG, {"size": [40, 28], "crop_pct": None})
    augment = {"scale": [0.5, 1.0], "ratio": [0.6, 0.8], "hflip": 0.5, "vflip": 0.0, "rotation": 15,
               "auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "re_prob": 0.25}
    out = build_train_transform(config, augment)(gradient_sheet())
    assert tuple(out.shape) == (3, 40, 28) and torch.isfinite(out).all()
    # A bad input.size never gets here: the recipe schema refuses it at load (test_config.py).


def test_view_names_parse_once_into_typed_values():
    assert parse_view("tencrop@1.14") == ("tencrop", 1.14, None)
    assert parse_view("rrc8") == ("rrc", None, 8)
    assert parse_view("center") == ("center", None, None)
    with pytest.raises(HerbensError, match=r"'centre' \(did you mean center\?\)"):
        parse_view("centre")
    with pytest.raises(HerbensError, match="rrc needs its number of crops"):
        parse_view("rrc")
    with pytest.raises(HerbensError, match="positive number"):
        parse_view("center@x")


def test_view_row_names_match_the_rows_each_view_gives():
    names = ["center", "fivecrop", "rrc3", "tencrop@1.2"]
    rows = view_row_names(names)
    assert len(rows) == sum(v(gradient_sheet()).reshape(-1, 3, 32, 24).shape[0]
                            for _, v in build_tta_views(names, CONFIG))
    assert rows[:3] == ["center", "fivecrop/0", "fivecrop/1"]
