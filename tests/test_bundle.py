"""Bundles: export, load from a moved folder with the runs gone, predict exactly what
``herbens infer`` + ``herbens ensemble`` predict, refuse altered bundles, survive bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import train_tiny
from herbens.bundle.export import export_bundle
from herbens.bundle.load import load_bundle
from herbens.cli.main import main
from herbens.data.metadata import load_test_metadata
from herbens.ensemble.pipeline import ensemble_runs
from herbens.core.errors import HerbensError
from herbens.stores.logits import read_logits

FP16_TOL = 2e-3  # the store keeps float16 logits; probabilities agree to about this


@pytest.fixture(scope="module")
def exported(tiny_herbarium, tiny_run, tmp_path_factory):
    """A two-run ensemble exported to a bundle that is then moved, with its runs deleted.

    Returns ``(bundle_dir, submission_csv, topk_csv, single_run_bundle, single_run_test_logits)``.
    """
    work = tmp_path_factory.mktemp("bundle_work")
    runs = work / "runs"
    shutil.copytree(tiny_run, runs / "tiny")
    assert train_tiny(tiny_herbarium, runs, recipe="demo_seesaw", extra=["name=tiny2", "train.epochs=1", "seed=5"]) == 0
    assert main(["infer", str(runs / "tiny"), "--data-root", str(tiny_herbarium)]) == 0  # what `herbens infer` writes
    submission = work / "out" / "ens.csv"
    ensemble_runs([runs / "tiny", runs / "tiny2"], submission, top_k=3, progress=False, log=lambda _: None)
    export_bundle(submission.with_suffix(".json"), work / "bundles" / "ens", log=lambda _: None)
    export_bundle(runs / "tiny", work / "bundles" / "single", onnx=True, log=lambda _: None)
    single_logits = np.asarray(read_logits(runs / "tiny", "test").level("species"), dtype=np.float32)
    single_ids = read_logits(runs / "tiny", "test").image_ids
    moved = tmp_path_factory.mktemp("elsewhere")
    shutil.move(str(work / "bundles"), str(moved / "bundles"))
    shutil.rmtree(runs)
    return (moved / "bundles" / "ens", submission, submission.with_suffix(".topk.csv"),
            moved / "bundles" / "single", (single_ids, single_logits))


def _test_paths(root: Path) -> dict[str, str]:
    test = load_test_metadata(root / "test_metadata.json")
    images = Path(test.attrs["images_dir"])
    return {str(images / f): i for i, f in zip(test["image_id"], test["file_name"])}


def test_moved_bundle_predicts_what_infer_and_ensemble_predict(exported, tiny_herbarium, tmp_path):
    bundle, submission, topk, _, _ = exported
    out = tmp_path / "pred.csv"
    assert main(["predict", str(bundle), str(tiny_herbarium / "test_images"), "-o", str(out), "--top-k", "3",
                 "--no-progress"]) == 0
    pred = pd.read_csv(out)
    ids = _test_paths(tiny_herbarium)
    pred["Id"] = pred["path"].map(ids)
    assert pred["Id"].notna().all() and len(pred) == len(ids)
    expected = pd.read_csv(submission, dtype={"Id": str}).merge(pd.read_csv(topk, dtype={"Id": str}), on="Id")
    both = pred.merge(expected, on="Id")
    assert len(both) == len(ids)
    assert (both["category_id_1"] == both["Predicted"]).all()
    for j in (1, 2, 3):
        np.testing.assert_allclose(both[f"probability_{j}"], both[f"Score_{j}"], atol=FP16_TOL)
    # Genus and family probabilities are the species probabilities summed within them.
    assert (both["genus_probability"] >= both["probability_1"] - 1e-6).all()
    assert (both["family_probability"] >= both["genus_probability"] - 1e-6).all()
    assert set(pred["decision"]) <= {"species", "genus", "family", "unknown"}


def test_single_run_bundle_predicts_the_runs_own_logits(exported, tiny_herbarium, tmp_path):
    _, _, _, single, (ids, logits) = exported
    out = tmp_path / "single.json"
    assert main(["predict", str(single), str(tiny_herbarium / "test_images"), "-o", str(out), "--format", "json",
                 "--no-progress"]) == 0
    record = json.loads(out.read_text())
    by_id = {_test_paths(tiny_herbarium)[p["path"]]: p for p in record["predictions"]}
    tax = load_bundle(single).taxonomy
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for row, image_id in enumerate(ids):
        best = by_id[image_id]["species"][0]
        assert best["category_id"] == int(tax.category_ids[logits[row].argmax()])
        assert abs(best["probability"] - probs[row].max()) < FP16_TOL
    assert by_id[ids[0]]["species"][0]["authors"]  # authors come from the metadata's categories


def test_onnx_member_is_listed_in_the_manifest(exported):
    single = load_bundle(exported[3])
    assert single.members[0].onnx_path is not None
    manifest = json.loads((exported[3] / "manifest.json").read_text())
    assert "members/m0_tiny/model.onnx" in manifest["files"]
    card = (exported[3] / "README.md").read_text()
    assert "## ONNX graphs" in card and "Input `images`: float32 `[batch, 3, H, W]`" in card
    assert "| m0_tiny |" in card.split("## ONNX graphs")[1] and "every threshold (back-off, OOD)" in card
    assert "## ONNX graphs" not in (exported[0] / "README.md").read_text()  # exported without --onnx


def test_onnx_without_its_extra_is_refused_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    # The source does not even exist: the extra is checked first, so that is not what is reported.
    with pytest.raises(HerbensError, match=r"--onnx needs onnxscript .*pip install -e '\.\[onnx\]'"):
        export_bundle(tmp_path / "no_such_run", tmp_path / "b", onnx=True, log=lambda _: None)
    assert not (tmp_path / "b").exists()


def test_onnx_export_keeps_the_exporters_chatter_out(tmp_path, capfd, taxonomy):
    from herbens.bundle.onnx_export import export_onnx
    from herbens.config import load_config
    from herbens.models.net import build_model

    cfg = load_config("demo_ce", ["model.backbone=test_resnet", "input.size=[32,32]"])
    model = build_model(cfg, taxonomy).eval()
    capfd.readouterr()
    levels = [lv for lv in ("species", "genus", "family") if lv in cfg["levels"]]
    export_onnx(model, levels, {"input_size": (3, 32, 32)}, tmp_path / "m.onnx")  # checked against PyTorch
    out, err = capfd.readouterr()
    assert "torch.onnx" not in out + err and "Obtain model graph" not in out + err, out + err


def test_bundle_records_what_it_needs(exported, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("loading a bundle tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    bundle = load_bundle(exported[0])
    assert len(bundle.members) == 2
    assert bundle.params.alpha == bundle.record["ensemble"]["alpha"]
    member = bundle.members[0]
    assert member.views == ["center", "hflip"] and member.data_config["input_size"] == (3, 48, 32)
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(member.data_config)
    def refuse(constant):
        raise AssertionError(f"bundle.json holds {constant}: not strict JSON")

    json.loads((exported[0] / "bundle.json").read_text(), parse_constant=refuse)
    card = (exported[0] / "README.md").read_text()
    assert "Intended use" in card and "Limits" in card and "macro-F1" in card
    prov = bundle.record["provenance"]["members"][0]
    assert prov["backbone"] == "test_resnet" and "species_macro_f1" in prov["val"]
    names = pd.read_csv(exported[0] / "names.csv")
    assert list(names.columns) == ["category_id", "scientific_name", "authors", "genus", "family"]


@pytest.mark.parametrize("victim", ["names.csv", "members/m0_tiny/model.safetensors", "bundle.json"])
def test_missing_or_altered_file_is_refused_by_name(exported, tmp_path, victim):
    for change in ("delete", "alter"):
        copy = tmp_path / change
        shutil.copytree(exported[0], copy)
        target = copy / victim
        if change == "delete":
            target.unlink()
        else:
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
        with pytest.raises(HerbensError, match=f"file {victim} (is missing|was altered)"):
            load_bundle(copy)


def _good_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 64), (200, 180, 150)).save(path)
    return path


def test_bad_input_is_reported_per_file_and_the_rest_predicted(exported, tmp_path, capsys):
    folder = tmp_path / "sheets"
    _good_image(folder / "a.jpg")
    _good_image(folder / "deep" / "b.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "p.csv"
    assert main(["predict", str(exported[0]), str(folder), "-o", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"failed {folder / 'broken.jpg'}: cannot decode image" in err
    assert f"skipped {folder / 'notes.txt'}: not an image file" in err
    assert sorted(Path(p).name for p in pd.read_csv(out)["path"]) == ["a.jpg", "b.png"]

    listing = tmp_path / "list.csv"
    listing.write_text("path\nsheets/a.jpg\nsheets/missing.jpg\n")
    assert main(["predict", str(exported[0]), str(listing), "-o", str(tmp_path / "l.csv"), "--no-progress"]) == 1
    assert "failed" in capsys.readouterr().err and len(pd.read_csv(tmp_path / "l.csv")) == 1


def test_empty_folder_and_missing_input_are_errors(exported, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(exported[0]), str(tmp_path / "empty"), "-o", str(tmp_path / "x.csv")]) == 2
    assert "no image files found" in capsys.readouterr().err
    assert main(["predict", str(exported[0]), str(tmp_path / "nope"), "-o", str(tmp_path / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_outputs_name_the_decision_and_a_run_with_nothing_readable_writes_nothing(exported, tmp_path, capsys):
    folder = tmp_path / "sheets"
    _good_image(folder / "a.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "p.json"
    assert main(["predict", str(exported[0]), str(folder), "-o", str(out), "--format", "json", "--html",
                 "--no-progress"]) == 1
    (item,) = json.loads(out.read_text())["predictions"]
    assert item["rank"] == item["decision"] and item["reason"]
    names = pd.read_csv(exported[0] / "names.csv", keep_default_na=False)
    top = item["species"][0]
    expected = {"species": f"{top['scientific_name']} {top['authors']}".strip(), "genus": item["genus"],
                "family": item["family"], "unknown": "unknown"}[item["decision"]]
    assert item["name"] == expected and top["enrolled"] is False and len(names) >= 1
    page = out.with_suffix(".html").read_text()
    assert "2 files:" in page and "1 failed" in page and "broken.jpg" in page and "Thresholds (" in page
    csv = tmp_path / "p.csv"
    assert main(["predict", str(exported[0]), str(folder), "-o", str(csv), "--no-progress"]) == 1
    assert list(pd.read_csv(csv).columns[:5]) == ["path", "name", "rank", "reason", "decision"]
    capsys.readouterr()

    listing = tmp_path / "gone.txt"
    listing.write_text("missing1.jpg\nmissing2.jpg\n")
    assert main(["predict", str(exported[0]), str(listing), "-o", str(tmp_path / "none.csv"), "--no-progress"]) == 2
    assert "none of the 2 image(s) could be read" in capsys.readouterr().err
    assert not (tmp_path / "none.csv").exists()
    headerless = tmp_path / "list.csv"
    headerless.write_text("sheets/a.jpg\nsheets/a.jpg\n")
    assert main(["predict", str(exported[0]), str(headerless), "-o", str(tmp_path / "h.csv"), "--no-progress"]) == 2
    assert "needs a header row naming its path column" in capsys.readouterr().err


def test_decompression_bomb_is_refused_per_file(exported, tmp_path, capsys):
    folder = tmp_path / "bomb"
    _good_image(folder / "small.png")
    Image.new("RGB", (400, 400)).save(folder / "huge.png")
    assert main(["predict", str(exported[0]), str(folder), "-o", str(tmp_path / "b.csv"), "--no-progress",
                 "--max-image-pixels", "10000"]) == 1
    assert "huge.png" in (err := capsys.readouterr().err) and "over the limit of 10,000" in err
    assert len(pd.read_csv(tmp_path / "b.csv")) == 1


def test_html_page_is_self_contained_and_renders_one_card_per_image(exported, tiny_herbarium, tmp_path):
    out = tmp_path / "p.csv"
    main(["predict", str(exported[0]), str(tiny_herbarium / "test_images"), "-o", str(out), "--html", "--no-progress"])
    page = out.with_suffix(".html").read_text()
    count = len(pd.read_csv(out))
    assert page.count('class="card"') == count
    assert "http://" not in page and "https://" not in page and page.count("data:image/jpeg;base64,") == count
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium): page not rendered")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          out.with_suffix(".html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="card"') == count and 'id="f-unknown"' in dom and 'id="f-genus"' in dom


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "test_vit"])
def test_onnx_graph_matches_pytorch(backbone, tmp_path):
    pytest.importorskip("onnxruntime")
    import torch

    from herbens.bundle.onnx_export import check_inputs, export_onnx, run_onnx
    from herbens.data.transforms import model_data_config
    from herbens.models.net import HierarchicalNet

    torch.manual_seed(0)
    model = HierarchicalNet(backbone, {"species": 7, "genus": 3}, {}).eval()
    size = [64, 64] if backbone == "test_vit" else [48, 32]
    data_config = model_data_config(model.data_config, {"size": size, "crop_pct": None})
    exporter = export_onnx(model, ["species", "genus"], data_config, tmp_path / "m.onnx")
    assert exporter in ("dynamo", "torchscript")
    images = check_inputs(data_config, count=5, seed=7)  # other inputs, another batch size than the export's
    with torch.no_grad():
        expected = model(images)
    species, genus = run_onnx(tmp_path / "m.onnx", images.numpy())
    np.testing.assert_allclose(species, expected["species"].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(genus, expected["genus"].numpy(), atol=1e-4, rtol=1e-4)


def test_export_refuses_what_it_cannot_bundle(tmp_path, capsys):
    from herbens.bundle.scoring import fitted_params

    (tmp_path / "not_a_run").mkdir()
    assert main(["export", str(tmp_path / "not_a_run"), "-o", str(tmp_path / "b")]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err
    record = {"weights": [1.0], "temperatures": [1.0], "tau": 0, "alpha": 0, "beta": 0}
    with pytest.raises(HerbensError, match="mode 'vote' cannot be exported"):
        fitted_params({**record, "mode": "vote"}, 1)
    with pytest.raises(HerbensError, match="1 weights for 2 members"):
        fitted_params(record, 2)
    with pytest.raises(HerbensError, match="missing key 'tau'"):
        fitted_params({k: v for k, v in record.items() if k != "tau"}, 1)
    assert not (tmp_path / "b").exists()


def test_record_run_paths_resolve_from_the_project_folder_of_the_record(tmp_path, monkeypatch):
    from herbens.bundle.sources import _run_path

    project = tmp_path / "project"
    (project / "runs" / "r1").mkdir(parents=True)
    (project / "runs" / "r1" / "config.yaml").write_text("{}\n")
    (project / "submissions").mkdir()
    record = project / "submissions" / "final.json"
    monkeypatch.chdir(tmp_path)  # not the folder `herbens ensemble` ran in
    assert _run_path("runs/r1", record) == project / "runs" / "r1"
    with pytest.raises(HerbensError, match=r"run runs/gone not found \(no config\.yaml in runs/gone, .*"
                                           r"submissions/runs/gone, .*project/runs/gone\); run from the folder"):
        _run_path("runs/gone", record)
