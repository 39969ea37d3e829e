"""Predicting a whole collection (issue 25): the input in blocks, resumable Parquet shards, a
refusal when bundle, input or options change, several processes, a capped page, Parquet output."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import numpy as np

import herbens.bundle.collection as collection
from herbens.bundle.collection import MANIFEST, parts_dir
from herbens.bundle.export import export_bundle
from herbens.bundle.load import load_bundle, write_manifest
from herbens.bundle.sheet_embeddings import MARKER, SPLIT
from herbens.cli.main import main
from herbens.data.metadata import load_test_metadata
from herbens.infer.run import infer_run
from herbens.stores.embeddings import read_embeddings

ROOT = Path(__file__).resolve().parents[1]
KILLER = Path(__file__).with_name("predict_killer.py")
STANDIN = Path(__file__).with_name("predict_standin.py")
HANG_TIMEOUT_S = 600  # guards against a hung child, not a speed requirement
BLOCK = "4"


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory) -> Path:
    return export_bundle(tiny_run, tmp_path_factory.mktemp("collection") / "bundle", log=lambda _: None)


@pytest.fixture(scope="module")
def listing(tiny_herbarium, tmp_path_factory) -> Path:
    """The tiny herbarium's 12 test images as a text list: 3 blocks of 4."""
    test = load_test_metadata(tiny_herbarium / "test_metadata.json")
    out = tmp_path_factory.mktemp("lists") / "images.txt"
    out.write_text("".join(f"{test.attrs['images_dir'] / f}\n" for f in test["file_name"]))
    return out


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def predict(bundle, source, out, *extra) -> int:
    return main(["predict", str(bundle), str(source), "-o", str(out), "--block", BLOCK, "--no-progress", *extra])


@pytest.fixture(scope="module")
def uninterrupted(bundle, listing, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "pred.csv"
    assert predict(bundle, listing, out) == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted_embeddings(bundle, listing, tmp_path_factory) -> Path:
    """The embeddings folder of one uninterrupted process (``pred.embeddings``)."""
    out = tmp_path_factory.mktemp("whole_embeddings") / "pred.csv"
    assert predict(bundle, listing, out, "--embeddings") == 0
    return out.with_suffix(".embeddings")


def stores(folder: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """Member -> (ids, float16 matrix) of a predict embeddings folder."""
    members = json.loads((folder / MARKER).read_text())["members"]
    return {m: (s.image_ids, np.asarray(s.matrix)) for m in members
            for s in [read_embeddings(folder / m, SPLIT, mmap=False)]}


def assert_same_stores(folder: Path, reference: Path) -> None:
    got, want = stores(folder), stores(reference)
    assert got.keys() == want.keys()
    for member, (ids, matrix) in want.items():
        assert got[member][0] == ids
        np.testing.assert_array_equal(got[member][1], matrix)


def test_a_killed_run_resumes_from_its_shards_and_ends_as_an_uninterrupted_one(bundle, listing, uninterrupted,
                                                                               uninterrupted_embeddings, tmp_path,
                                                                               monkeypatch):
    out = tmp_path / "pred.csv"
    command = [sys.executable, str(KILLER), "1", "predict", str(bundle), str(listing), "-o", str(out),
               "--block", BLOCK, "--no-progress", "--embeddings"]
    proc = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    work = parts_dir(out)
    assert not out.exists() and sorted(p.name for p in work.glob("block-*.parquet")) == ["block-00000000.parquet"]
    member = load_bundle(bundle).members[0].name
    assert [p.name for p in work.glob("block-*.npy")] == [f"block-00000000.embeddings-{member}.npy"]
    made_from = json.loads((work / MANIFEST).read_text())["made_from"]
    assert made_from["input"] and made_from["bundle"] and made_from["block"] == int(BLOCK)

    written = []
    real = collection.write_shard
    monkeypatch.setattr(collection, "write_shard", lambda path, table: (written.append(path.name), real(path, table)))
    assert predict(bundle, listing, out, "--embeddings") == 0
    assert written == ["block-00000001.parquet", "block-00000002.parquet"]  # block 0 not predicted again
    assert out.read_bytes() == uninterrupted.read_bytes()
    assert_same_stores(out.with_suffix(".embeddings"), uninterrupted_embeddings)
    assert not work.exists()


def _killed_after_one_block(bundle, listing, out) -> None:
    command = [sys.executable, str(KILLER), "1", "predict", str(bundle), str(listing), "-o", str(out),
               "--block", BLOCK, "--no-progress"]
    proc = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def _refused(capsys, status: int, pattern: str) -> None:
    assert status == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_another_bundle_input_or_option_with_the_same_output_is_refused(bundle, listing, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    _killed_after_one_block(bundle, listing, out)
    other_list = tmp_path / "other.txt"
    other_list.write_text("".join(reversed(listing.read_text().splitlines(keepends=True))))
    _refused(capsys, predict(bundle, other_list, out), r"pred\.csv\.parts holds the shards of another prediction \(input: ")
    other_bundle = tmp_path / "other_bundle"
    shutil.copytree(bundle, other_bundle)
    frame = pd.read_csv(other_bundle / "names.csv", keep_default_na=False)
    frame.loc[0, "authors"] = "Someone Else"
    frame.to_csv(other_bundle / "names.csv", index=False)
    write_manifest(other_bundle)
    _refused(capsys, predict(other_bundle, listing, out), r"another prediction \(bundle: ")
    _refused(capsys, predict(bundle, listing, out, "--top-k", "3"), r"another prediction \(top_k: 5 there, 3 now\)")
    _refused(capsys, predict(bundle, listing, out, "--embeddings"), r"another prediction \(embeddings: None there, True now\)")
    assert not out.exists() and len(list(parts_dir(out).glob("block-*"))) == 1  # nothing touched


def test_json_and_parquet_outputs_hold_the_csv_rows(bundle, listing, uninterrupted, tmp_path):
    csv = pd.read_csv(uninterrupted)
    assert predict(bundle, listing, tmp_path / "pred.parquet", "--format", "parquet") == 0
    parquet = pd.read_parquet(tmp_path / "pred.parquet")
    pd.testing.assert_frame_equal(parquet[["path", "decision", "category_id_1"]], csv[["path", "decision", "category_id_1"]])
    assert (parquet["probability_1"] - csv["probability_1"]).abs().max() < 1e-6
    assert predict(bundle, listing, tmp_path / "pred.json", "--format", "json") == 0
    record = json.loads((tmp_path / "pred.json").read_text())
    assert [p["path"] for p in record["predictions"]] == csv["path"].tolist() and record["failed"] == []


def test_the_page_of_a_large_run_is_capped_and_says_what_it_left_out(bundle, listing, tmp_path):
    page = tmp_path / "pred.html"
    assert predict(bundle, listing, tmp_path / "pred.csv", "--html", str(page), "--page-cap", "5") == 0
    text = page.read_text()
    assert text.count('<div class="card" ') == 5
    assert text.count('data-decision="unknown"') == 5  # all 5 unknown sheets first
    assert "12 files:" in text and "This page shows 5 of 12 predicted sheets" in text
    assert "every sheet is in pred.csv" in text
    assert predict(bundle, listing, tmp_path / "all.csv", "--html", str(tmp_path / "all.html")) == 0
    full = (tmp_path / "all.html").read_text()
    assert full.count('<div class="card" ') == 12 and "This page shows" not in full


@pytest.mark.distributed
@pytest.mark.slow
def test_two_processes_write_exactly_the_rows_of_one(bundle, listing, uninterrupted, uninterrupted_embeddings,
                                                     tmp_path):
    out = tmp_path / "pred.csv"
    env = {**child_env(), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "herbens",
               "predict", str(bundle), str(listing), "-o", str(out), "--block", BLOCK, "--no-progress",
               "--embeddings", str(tmp_path / "sheets")]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert out.read_bytes() == uninterrupted.read_bytes()
    assert_same_stores(tmp_path / "sheets", uninterrupted_embeddings)


@pytest.mark.distributed
@pytest.mark.slow
def test_a_process_that_fails_stops_every_process_instead_of_a_hang(bundle, listing, tmp_path):
    out = tmp_path / "pred.csv"
    env = {**child_env(), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(KILLER),
               "fail-rank-1", "predict", str(bundle), str(listing), "-o", str(out), "--block", BLOCK, "--no-progress"]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode != 0 and not out.exists()
    assert "injected failure writing block-00000001.parquet" in proc.stderr
    assert "another process failed predicting its blocks" in proc.stderr
    assert sorted(p.name for p in parts_dir(out).glob("block-*")) == ["block-00000000.parquet",
                                                                      "block-00000002.parquet"]


def test_the_embeddings_beside_the_names_are_the_infer_embeddings_of_the_same_sheets(
        bundle, listing, uninterrupted, uninterrupted_embeddings, tiny_run, tiny_herbarium, tmp_path):
    assert (uninterrupted_embeddings.parent / "pred.csv").read_bytes() == uninterrupted.read_bytes()
    member = load_bundle(bundle).members[0]
    store = read_embeddings(uninterrupted_embeddings / member.name, SPLIT)
    assert store.image_ids == listing.read_text().splitlines()
    assert store.meta["views"] == member.views and store.meta["tta_space"] == member.tta_space
    assert store.meta["model"] == member.name and store.labels is None
    marker = json.loads((uninterrupted_embeddings / MARKER).read_text())
    assert marker["rows"] == 12 and marker["output"] == "pred.csv" and marker["members"] == [member.name]

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # Batches of the same sheets as predict's blocks: a CPU kernel may round a sheet's features
    # differently in a batch of another size (1 fp16 ulp seen on an AMD EPYC), so bit for bit
    # holds for the same batches, which is what the same listing and block give.
    infer_run(run, ["test"], views=member.views, tta_space=member.tta_space, data_root=str(tiny_herbarium),
              batch_size=int(BLOCK), embeddings=True)
    inferred = read_embeddings(run, "test")
    test = load_test_metadata(tiny_herbarium / "test_metadata.json")
    order = [inferred.image_ids.index(str(i)) for i in test["image_id"]]
    np.testing.assert_array_equal(np.asarray(store.matrix), np.asarray(inferred.matrix)[order])


def test_a_sheet_listed_twice_has_one_row_and_an_unreadable_one_none(bundle, listing, uninterrupted_embeddings,
                                                                     tmp_path):
    paths = listing.read_text().splitlines()
    twice = tmp_path / "twice.txt"
    twice.write_text("\n".join([paths[0], paths[1], str(tmp_path / "missing.jpg"), paths[0], paths[2]]) + "\n")
    assert predict(bundle, twice, tmp_path / "pred.csv", "--embeddings") == 1  # the missing image
    assert len(pd.read_csv(tmp_path / "pred.csv")) == 4
    (ids, matrix), = stores(tmp_path / "pred.embeddings").values()
    (_, all_matrix), = stores(uninterrupted_embeddings).values()
    assert ids == paths[:3]
    np.testing.assert_array_equal(matrix, all_matrix[:3])


def test_embeddings_never_replace_a_folder_predict_did_not_write(bundle, listing, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    _refused(capsys, predict(bundle, listing, tmp_path / "pred.csv", "--embeddings", str(folder)),
             r"--embeddings .*mine: exists and was not written by herbens predict")
    assert (folder / "notes.txt").read_text() == "keep me" and not (tmp_path / "pred.csv").exists()
    assert not parts_dir(tmp_path / "pred.csv").exists()


@pytest.mark.slow
def test_a_million_paths_take_the_memory_of_ten_thousand(bundle, listing, tmp_path):
    """Peak RSS of the whole command over 1,000,000 distinct paths within 1.5x of 10,000: the list
    streamed, one block of records at a time, shards merged one by one (the forward pass, one
    batch whatever the count, is done once by tests/predict_standin.py)."""
    peak = {}
    for count in (10_000, 1_000_000):
        names, out = tmp_path / f"list_{count}.txt", tmp_path / f"pred_{count}.csv"
        with open(names, "w") as handle:
            handle.writelines(f"/collection/sheet-{i:07d}.jpg\n" for i in range(count))
        command = [sys.executable, str(STANDIN), str(listing), "predict", str(bundle), str(names), "-o", str(out),
                   "--no-progress", "--html"]
        proc = subprocess.run(command, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                              timeout=HANG_TIMEOUT_S * 3)
        assert proc.returncode == 0, proc.stderr[-3000:]
        peak[count] = int(proc.stdout.split("RSS")[-1].split()[0])
        with open(out) as handle:
            rows = sum(1 for _ in handle) - 1
            assert rows == count
        assert f"{count - 1:07d}.jpg" in pd.read_csv(out, skiprows=range(1, count)).path[0]
    assert peak[1_000_000] <= 1.5 * peak[10_000], peak
