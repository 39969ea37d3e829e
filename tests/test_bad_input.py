"""Bad input refused early and in the user's terms (issue 23): duplicate recipe keys, text that is
not UTF-8, predict's numeric options, a folder where prepare expects a file, empty training
metadata, a misspelt recipe name.

Each test reproduces one finding; README.md's reliability table names them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from herbens.bundle.inputs import collect_inputs
from herbens.cli.main import main
from herbens.config import load_config
from herbens.data.prepare import prepare_dataset
from herbens.core.errors import HerbensError


@pytest.mark.parametrize("text, key, lines", [
    ("defaults: demo_ce\ntrain: {epochs: 1, epochs: 3}\n", "epochs", (2, 2)),
    ("defaults: demo_ce\ntrain:\n  epochs: 1\nmodel:\n  backbone: x\ntrain:\n  lr: 0.1\n", "train", (2, 6)),
    ("defaults: demo_ce\ntrain:\n  epochs: 1\n  lr: 0.1\n  epochs: 3\n", "epochs", (3, 5)),
])
def test_duplicate_recipe_key_names_file_key_and_both_lines(tmp_path, text, key, lines):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text(text)
    with pytest.raises(HerbensError, match=rf"{recipe}: key '{key}' appears twice, on lines {lines[0]} and {lines[1]}"):
        load_config(recipe)


def test_same_key_in_different_sections_is_fine(tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("train: {epochs: 3}\ninfer: {batch_size: 7}\ndata: {num_workers: 0}\n")
    cfg = load_config(recipe)
    assert cfg["train"]["epochs"] == 3 and cfg["infer"]["batch_size"] == 7


def test_recipe_that_is_not_utf8_is_a_clear_error(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("defaults: demo_ce\nname: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(HerbensError, match=rf"{recipe}: not UTF-8 text"):
        load_config(recipe)


@pytest.mark.parametrize("suffix", [".txt", ".lst", ".csv"])
def test_list_that_is_not_utf8_is_a_clear_error(tmp_path, suffix):
    listing = tmp_path / f"list{suffix}"
    listing.write_bytes("path\nherbier/\u00e9chantillon.jpg\n".encode("latin-1"))
    with pytest.raises(HerbensError, match=str(listing)):
        collect_inputs(listing)


def test_utf8_list_names_its_images(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# sheets\nherbier/\u00e9chantillon.jpg\n", encoding="utf-8")
    assert collect_inputs(listing)[0] == [str(tmp_path / "herbier" / "\u00e9chantillon.jpg")]


def test_misspelt_recipe_name_gets_the_closest_name():
    with pytest.raises(HerbensError, match=r"recipe 'demo_arcfce' not found.*did you mean demo_arcface\?"):
        load_config("demo_arcfce")


@pytest.mark.parametrize("option, value, fragment", [
    ("--batch-size", "0", "batch_size (--batch-size) must be an integer of at least 1, got 0"),
    ("--workers", "-1", "workers (--workers) must be an integer of at least 0, got -1"),
    ("--top-k", "0", "top_k (--top-k) must be an integer of at least 1, got 0"),
    ("--max-image-pixels", "0", "max_pixels (--max-image-pixels) must be an integer of at least 1"),
])
def test_predict_numeric_options_are_checked(tmp_path, capsys, option, value, fragment):
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    out = tmp_path / "p.csv"
    assert main(["predict", str(tmp_path / "bundle"), str(image), "-o", str(out), option, value]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not out.exists()


def _first_train_image(root):
    meta = json.loads((root / "train_metadata.json").read_text())
    return root / "train_images" / meta["images"][0]["file_name"]


def test_prepare_names_a_folder_where_an_image_is_listed(tiny_herbarium, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_herbarium, data)
    image = _first_train_image(data)
    image.unlink()
    image.mkdir()
    for _ in range(2):  # the rerun too
        with pytest.raises(HerbensError, match=rf"{image} is listed in the metadata as an image but is a folder"):
            prepare_dataset(data, 32, tmp_path / "out", workers=1, progress=False)


def test_prepare_names_a_folder_where_the_copy_goes(tiny_herbarium, tmp_path):
    out = tmp_path / "out"
    prepare_dataset(tiny_herbarium, 32, out, workers=1, progress=False)
    source = _first_train_image(tiny_herbarium)
    copy = out / source.relative_to(tiny_herbarium)
    copy.unlink()
    copy.mkdir()
    with pytest.raises(HerbensError, match=rf"a folder {copy} stands where the copy of {source} goes"):
        prepare_dataset(tiny_herbarium, 32, out, workers=1, progress=False)


def test_empty_training_metadata_is_reported_in_the_users_terms(tiny_herbarium, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_herbarium, data)
    meta = json.loads((data / "train_metadata.json").read_text())
    meta["images"], meta["annotations"] = [], []
    (data / "train_metadata.json").write_text(json.dumps(meta))
    assert main(["train", "demo_ce", f"data.root={data}", f"output_dir={tmp_path / 'runs'}", "data.num_workers=0"]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'train_metadata.json'}: no training images (the metadata lists none)" in err
    assert "sampler" not in err


def test_image_under_the_minimum_size_is_refused_like_an_unreadable_one(tmp_path):
    import pandas as pd
    from PIL import Image

    from herbens.data.dataset import BadImageWarning, HerbariumDataset, ImageTooSmallError

    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (24, 16), (90, 120, 60)).save(tmp_path / "sheet.png")
    frame = pd.DataFrame({"file_name": ["dot.png", "sheet.png"]})
    with pytest.raises(ImageTooSmallError, match=r"dot.png is 1 x 1 pixels: too small to be a specimen image"):
        HerbariumDataset(frame, tmp_path, None, None)[0]
    with pytest.warns(BadImageWarning, match="too small"):
        assert HerbariumDataset(frame, tmp_path, None, None, bad_image_policy="skip")[0]["unreadable"] is True
    assert HerbariumDataset(frame, tmp_path, None, None, min_side=0)[0]["image"].size == (1, 1)
    with pytest.raises(ImageTooSmallError, match="sheet.png is 24 x 16"):
        HerbariumDataset(frame, tmp_path, None, None, min_side=20)[1]
    assert load_config("demo_ce", ["data.min_image_size=64"])["data"]["min_image_size"] == 64


def test_worker_errors_read_like_main_process_errors(tmp_path):
    import pandas as pd
    from PIL import Image
    from torch.utils.data import DataLoader

    from herbens.data.dataset import HerbariumDataset, ImageTooLargeError

    Image.new("RGB", (40, 60), (90, 120, 60)).save(tmp_path / "sheet.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    frame = pd.DataFrame({"file_name": ["sheet.png", "broken.jpg"]})
    loader = DataLoader(HerbariumDataset(frame, tmp_path, None, None), batch_size=2, num_workers=1,
                        collate_fn=lambda items: items)
    with pytest.raises(HerbensError) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert message.startswith(f"cannot decode image {tmp_path / 'broken.jpg'}: ") and "\n" not in message
    assert "Traceback" not in message and "DataLoader worker" not in message
    big = DataLoader(HerbariumDataset(frame.head(1), tmp_path, None, None, max_pixels=100), num_workers=1,
                     collate_fn=lambda items: items)
    with pytest.raises(ImageTooLargeError, match=r"^image .*sheet.png is 40 x 60 = 2,400 pixels, over the limit"):
        next(iter(big))



def _run_data(tmp_path, tiny_herbarium):
    data = tmp_path / "data"
    shutil.copytree(tiny_herbarium, data)
    return data


def _train(data, tmp_path, *extra):
    return main(["train", "demo_ce", f"data.root={data}", f"output_dir={tmp_path / 'runs'}", "data.num_workers=0",
                 "train.epochs=1", "train.batch_size=8", "input.size=[48,32]", "data.val_fraction=0.25",
                 "name=pre", *extra])


def test_check_finds_a_missing_training_image(tiny_herbarium, tmp_path, capsys):
    data = _run_data(tmp_path, tiny_herbarium)
    image = _first_train_image(data)
    image.unlink()
    assert _train(data, tmp_path, "--check") == 2
    err = capsys.readouterr().err
    assert f"train image {image}: No such file or directory" in err and "found before training" in err


def test_check_decodes_a_truncated_test_image(tiny_herbarium, tmp_path, capsys):
    from herbens.data.metadata import load_test_metadata

    data = _run_data(tmp_path, tiny_herbarium)
    test = load_test_metadata(data / "test_metadata.json")
    image = Path(test.attrs["images_dir"]) / test["file_name"].iloc[-1]
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])
    assert _train(data, tmp_path, "--check") == 2
    err = capsys.readouterr().err
    assert f"test image cannot decode image {image}" in err


def test_sample_decodes_first_random_and_small_files():
    from herbens.data.file_sample import SMALL_BYTES, _sampled

    sizes = np.full(2000, 10 * SMALL_BYTES)
    sizes[[5, 1500]] = 100  # small: always decoded
    sizes[7] = -1  # missing: reported by the stat, not decoded
    chosen = _sampled(sizes, seed=0, sample=50)
    assert {0, 5, 1500} <= set(chosen) and 7 not in chosen and 50 <= len(chosen) <= 53
    assert _sampled(sizes, seed=0, sample=50) == chosen  # seeded


def test_skip_policy_trains_past_an_empty_test_file_it_will_not_read(tiny_herbarium, tmp_path):
    from herbens.data.metadata import load_test_metadata

    data = _run_data(tmp_path, tiny_herbarium)
    test = load_test_metadata(data / "test_metadata.json")
    (Path(test.attrs["images_dir"]) / test["file_name"].iloc[0]).write_bytes(b"")
    assert _train(data, tmp_path, "data.bad_images=skip", "infer.splits=[val]") == 0
    assert (tmp_path / "runs" / "pre" / "logits" / "val").is_dir()


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tiny_herbarium, tmp_path, capsys):
    data = _run_data(tmp_path, tiny_herbarium)
    keep = tmp_path / "runs" / "pre"
    keep.mkdir(parents=True)
    (keep / "thesis.tex").write_text("years of work")
    assert _train(data, tmp_path, "--overwrite") == 2
    assert f"{keep} exists and is not a run (no config.yaml)" in capsys.readouterr().err
    assert (keep / "thesis.tex").read_text() == "years of work"
