"""Bundles and runs changed in place keep their record true (issue 23): one writer at a time (a
lock file), export never replaces a folder it did not write, the manifest covers every file and
is itself checked against a hash, a full disk during export is one line.

Each test reproduces one finding; README.md's reliability table names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import train_tiny
from herbens.bundle.export import export_bundle
from herbens.bundle.load import load_bundle
from herbens.bundle.predict import predict_command
from herbens.cli.main import main
from herbens.data.metadata import load_test_metadata
from herbens.core.errors import HerbensError
from herbens.core.fileio import exclusive_lock

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundled(tiny_herbarium, tmp_path_factory):
    """A run with embeddings and its bundle (it can enrol species): ``(run, bundle, shots)``."""
    work = tmp_path_factory.mktemp("writers")
    assert train_tiny(tiny_herbarium, work / "runs", extra=["name=emb", "train.epochs=1", "infer.embeddings=true"]) == 0
    run = work / "runs" / "emb"
    bundle = export_bundle(run, work / "bundle", log=lambda _: None)
    test = load_test_metadata(tiny_herbarium / "test_metadata.json")
    shots = work / "shots"
    shots.mkdir()
    for name in test["file_name"][:2]:
        shutil.copy(Path(test.attrs["images_dir"]) / name, shots / Path(name).name)
    return run, bundle, shots


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _enrol(bundle: Path, shots: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "herbens", "enrol", str(bundle), "--images", str(shots),
                             "--name", name, "--family", "Novaceae"], env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _says_it_waits(proc: subprocess.Popen) -> bool:
    """Read the child's output until it says it waits for the lock (True) or ends (False)."""
    for line in proc.stdout:
        if "being changed by another herbens process" in line:
            return True
    return False


def test_two_enrolments_at_once_keep_both_species(bundled, tmp_path):
    _, source, shots = bundled
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    with exclusive_lock(bundle):  # both start while a writer holds the bundle: both must wait
        procs = [_enrol(bundle, shots, name) for name in ("Novum alpha", "Novum beta")]
        waited = [_says_it_waits(proc) for proc in procs]
    for proc in procs:
        proc.wait()
    errors = [proc.stderr.read() for proc in procs]
    assert waited == [True, True], errors
    assert [proc.returncode for proc in procs] == [0, 0], errors
    names = load_bundle(bundle).names
    assert {"Novum alpha", "Novum beta"} <= set(names.scientific_name)
    assert names.category_id.is_unique


def test_export_refuses_a_folder_it_did_not_write(bundled, tmp_path, capsys):
    run, _, _ = bundled
    target = tmp_path / "runcopy"
    shutil.copytree(run, target)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    assert main(["export", str(run), "-o", str(target)]) == 2
    assert f"{target} exists and is not a herbens bundle" in capsys.readouterr().err
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before  # the run is whole

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(run), "-o", str(empty)]) == 0
    assert main(["export", str(run), "-o", str(empty)]) == 2
    assert "already holds a bundle; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "-o", str(empty), "--overwrite"]) == 0
    load_bundle(empty)


def _rehash_manifest(bundle: Path) -> None:
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    (bundle / "manifest.sha256").write_text(f"{digest}  manifest.json\n")


def test_manifest_covers_every_file_and_is_itself_checked(bundled, tmp_path):
    _, source, _ = bundled
    copies = {}
    for case in ("unlisted_record", "extra_file", "no_hash_file", "edited_manifest"):
        copies[case] = tmp_path / case
        shutil.copytree(source, copies[case])

    bundle = copies["unlisted_record"]  # the case: bundle.json left out, thresholds edited
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["bundle.json"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _rehash_manifest(bundle)
    record = json.loads((bundle / "bundle.json").read_text())
    record["thresholds"]["thresholds"] = {k: 0.0 for k in record["thresholds"]["thresholds"]}
    (bundle / "bundle.json").write_text(json.dumps(record))
    with pytest.raises(HerbensError, match="file bundle.json is not in the manifest"):
        load_bundle(bundle)

    (copies["extra_file"] / "members" / "notes.txt").write_text("left here")
    with pytest.raises(HerbensError, match="file members/notes.txt is not in the manifest"):
        load_bundle(copies["extra_file"])

    (copies["no_hash_file"] / "manifest.sha256").unlink()
    with pytest.raises(HerbensError, match="manifest.sha256 is missing"):
        load_bundle(copies["no_hash_file"])

    with open(copies["edited_manifest"] / "manifest.json", "a") as handle:
        handle.write("\n")
    with pytest.raises(HerbensError, match="file manifest.json was altered"):
        load_bundle(copies["edited_manifest"])
    load_bundle(source)


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_export_on_a_full_disk_says_so_in_one_line(bundled, tmp_path):
    run, source, _ = bundled
    target = tmp_path / "bundle"
    shutil.copytree(source, target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    weights = next(target.glob("members/*/model.safetensors")).stat().st_size
    done = subprocess.run([sys.executable, "-m", "herbens", "export", str(run), "-o", str(target), "--overwrite"],
                          env={**child_env(), "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True,
                          preexec_fn=lambda: _limit_file_size(weights // 2))
    assert done.returncode == 2, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("herbens: error: cannot write ") and "model.safetensors" in message, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "SafetensorError" not in done.stderr
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


def test_predict_refuses_an_image_too_small_to_be_a_specimen(bundled, tmp_path, capsys):
    from PIL import Image

    _, bundle, shots = bundled
    folder = tmp_path / "sheets"
    folder.mkdir()
    good = next(shots.iterdir())
    shutil.copy(good, folder / good.name)
    Image.new("RGB", (1, 1), (200, 180, 150)).save(folder / "dot.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(bundle), str(folder), "-o", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"failed {folder / 'dot.png'}: image {folder / 'dot.png'} is 1 x 1 pixels: too small to be a specimen" in err
    assert out.read_text().count("\n") == 2  # the header and the real sheet
    # --min-image-size sets the minimum: 0 turns it off, a negative one is refused before any work
    again = tmp_path / "q.csv"
    assert main(["predict", str(bundle), str(folder), "-o", str(again), "--no-progress", "--min-image-size", "0"]) == 0
    assert again.read_text().count("\n") == 3
    with pytest.raises(HerbensError, match=r"min_side \(--min-image-size\) must be an integer of at least 0"):
        predict_command(bundle, folder, tmp_path / "r.csv", min_side=-1, progress=False)
