"""Two-process CPU training (torchrun + gloo) against one process: same results, no lost images.

Each test starts ``python -m torch.distributed.run --standalone --nproc_per_node 2`` in a
subprocess on the tiny synthetic herbarium of ``conftest.py``. The global batch is the same in
both runs (2 x 5 against 1 x 10) and accelerate gives rank r every other batch of the same
seeded order, so the two runs train on the same images per step (BatchNorm statistics and the
ranks' augmentation draws are what differ).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from herbens.cli.main import main as cli_main
from herbens.config import load_config
from herbens.data.metadata import load_test_metadata, load_train_metadata
from herbens.data.taxonomy import Taxonomy
from herbens.stores.logits import read_logits
from herbens.train import main as train_main

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
INFER_BATCH = 4
COMMON = ["train.epochs=2", "input.size=[48,32]", "data.num_workers=0", "data.val_fraction=0.25",
          f"infer.batch_size={INFER_BATCH}", "train.log_every=1"]
# A generous guard against a hung process group, not a speed requirement.
HANG_TIMEOUT_S = 600


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU worker process: one thread, no progress bars, unbuffered."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def torchrun(script: Path, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with ``nproc`` CPU processes; fail with its output if it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(script), *args]
    proc = subprocess.run(command, cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                          timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def runs(tiny_herbarium, tmp_path_factory) -> dict[str, Path]:
    """The demo_ce recipe trained by one process (batch 10) and by two (batch 5 each)."""
    out = tmp_path_factory.mktemp("dist_runs")
    base = ["demo_ce", f"data.root={tiny_herbarium}", f"output_dir={out}", *COMMON]
    assert train_main([*base, "name=one", "train.batch_size=10"]) == 0
    torchrun(ROOT / "herbens" / "train.py", [*base, "name=two", "train.batch_size=5"])
    return {"one": out / "one", "two": out / "two"}


def test_val_and_test_sizes_would_show_padding(runs, tiny_herbarium):
    # The premise of the tests below: the last distributed batch of each split is padded.
    val = pd.read_csv(runs["one"] / "split.csv")
    test = load_test_metadata(tiny_herbarium / "test_metadata.json")
    for n in (len(val), len(test)):
        assert n % (2 * INFER_BATCH) != 0


def test_two_processes_form_one_process_group(runs):
    metrics = json.loads((runs["two"] / "metrics.json").read_text())
    assert metrics["cost"]["device_count"] == 2
    history = [json.loads(line) for line in (runs["two"] / "history.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (runs["one"] / "history.jsonl").read_text().splitlines()]
    # Same global batch, so the same number of optimizer steps per epoch.
    assert [h["step"] for h in history] == [h["step"] for h in one]


def test_same_taxonomy_and_split_as_one_process(runs):
    assert Taxonomy.load(runs["two"] / "taxonomy.json") == Taxonomy.load(runs["one"] / "taxonomy.json")
    assert (runs["two"] / "split.csv").read_text() == (runs["one"] / "split.csv").read_text()


@pytest.mark.parametrize("split", ["val", "test"])
def test_every_image_exactly_once(runs, tiny_herbarium, split):
    if split == "val":
        expected = pd.read_csv(runs["one"] / "split.csv", dtype=str)["image_id"].tolist()
    else:
        expected = load_test_metadata(tiny_herbarium / "test_metadata.json")["image_id"].tolist()
    two = read_logits(runs["two"], split)
    assert len(two.image_ids) == len(expected)           # no padding duplicates
    assert sorted(two.image_ids) == sorted(expected)     # no gaps
    assert two.level("species").shape[0] == len(expected)
    if split == "val":
        # Labels travel with the dataset index: each row must carry its own image's species.
        meta = load_train_metadata(tiny_herbarium / "train_metadata.json")
        taxonomy = Taxonomy.load(runs["two"] / "taxonomy.json")
        category = meta.images.set_index("image_id")["category_id"]
        truth = taxonomy.index_of(category.loc[two.image_ids].to_numpy())
        np.testing.assert_array_equal(np.asarray(two.labels), truth)


def test_rows_match_one_process_inference_of_the_same_weights(runs, tmp_path):
    """Gathering across ranks puts every image's logits in its own row."""
    copy = tmp_path / "two"
    shutil.copytree(runs["two"], copy)
    assert cli_main(["infer", str(copy), "--split", "val", "test"]) == 0
    for split in ("val", "test"):
        distributed, single = read_logits(runs["two"], split), read_logits(copy, split)
        order = {image_id: row for row, image_id in enumerate(single.image_ids)}
        rows = [order[image_id] for image_id in distributed.image_ids]
        for level in ("species", "genus", "family"):
            np.testing.assert_allclose(np.asarray(distributed.level(level), np.float32),
                                       np.asarray(single.level(level), np.float32)[rows],
                                       atol=2e-2, rtol=1e-2, err_msg=f"{split} {level}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_failed_write_on_the_main_process_ends_every_process(runs, tiny_herbarium, tmp_path):
    """Started one process per rank with no launcher to tear the others down (as ``srun`` does),
    the other rank must not wait for ever on a main process whose logits write failed."""
    data, run = tmp_path / "data", tmp_path / "two"
    shutil.copytree(tiny_herbarium, data)
    shutil.copytree(runs["two"], run)
    test = load_test_metadata(data / "test_metadata.json")
    bad = data / "test_images" / test["file_name"].iloc[-1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    before = read_logits(run, "test", mmap=False).level("species").copy()
    port = str(free_port())
    command = [sys.executable, "-m", "herbens", "infer", str(run), "--data-root", str(data),
               "--split", "test", "--bad-images", "fail"]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in range(2)]
    try:
        outputs = [proc.communicate(timeout=HANG_TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [2, 2], outputs
    assert "1 image(s) cannot be decoded" in outputs[0] and "no logits written" in outputs[0]
    assert "the main process failed writing the test logits" in outputs[1]
    np.testing.assert_array_equal(read_logits(run, "test").level("species"), before)  # old store kept


def test_validation_macro_f1_matches_one_process(runs):
    """Same data per step and the same global batch: only float reduction order and the
    ranks' own augmentation draws differ, so the scores agree within noise."""
    one = json.loads((runs["one"] / "metrics.json").read_text())["val"]
    two = json.loads((runs["two"] / "metrics.json").read_text())["val"]
    for level in ("species", "genus", "family"):
        assert 0.0 <= two[f"{level}_macro_f1"] <= 1.0
        # One of the 11 validation images changing class moves macro-F1 by up to ~0.2 here.
        assert abs(two[f"{level}_macro_f1"] - one[f"{level}_macro_f1"]) <= 0.2, (level, one, two)


# ----- per-rank state: Seesaw counts and sub-center ArcFace weights --------------------------

PROBE_EPOCHS = 10
# Mild augmentation and a higher learning rate: on 30 images the loss trend then shows clearly
# within a few dozen steps (sub-center ArcFace at scale 30 learns slowly otherwise).
PROBE_OVERRIDES = ["train.batch_size=5", "augment.hflip=0", "augment.scale=[0.9,1.0]", "optimizer.lr=0.01"]


@pytest.fixture(scope="module")
def probe(tiny_herbarium, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("probe")
    torchrun(ROOT / "tests" / "dist_probe.py",
             [str(out), "demo_seesaw", "demo_arcface", "--epochs", str(PROBE_EPOCHS), "--overrides",
              f"data.root={tiny_herbarium}", *COMMON, *PROBE_OVERRIDES])
    return out


def load_ranks(folder: Path) -> list[dict]:
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


def assert_loss_decreases(ranks: list[dict]) -> None:
    steps = np.mean([r["losses"] for r in ranks], axis=0)  # the global batch's loss per step
    per_epoch = steps.reshape(PROBE_EPOCHS, -1).mean(axis=1)
    assert np.isfinite(steps).all()
    assert per_epoch[-2:].mean() < 0.85 * per_epoch[:2].mean(), per_epoch


def test_seesaw_counts_identical_on_ranks_and_in_checkpoint(probe):
    ranks = load_ranks(probe / "demo_seesaw")
    assert ranks[0]["labels"]["species"] != ranks[1]["labels"]["species"]  # ranks saw other images
    saved = torch.load(next((probe / "demo_seesaw" / "checkpoints").glob("epoch*/custom_checkpoint_2.pkl")),
                       weights_only=False)
    for level in ("species", "genus"):
        key = f"losses.{level}.terms.0.cum_samples"  # the level's first (here only) loss term
        counts = [r["criterion"][key] for r in ranks]
        assert torch.equal(counts[0], counts[1])
        # All-reduced: every label seen by either rank is counted once, on both.
        seen = ranks[0]["labels"][level] + ranks[1]["labels"][level]
        expected = torch.bincount(torch.tensor(seen), minlength=len(counts[0]))
        assert torch.equal(counts[0], expected)
        assert torch.equal(saved[key], counts[0])
    assert_loss_decreases(ranks)


def test_parameters_identical_on_ranks(probe):
    for recipe in ("demo_seesaw", "demo_arcface"):
        ranks = load_ranks(probe / recipe)
        for name, value in ranks[0]["final"].items():
            assert torch.equal(value, ranks[1]["final"][name]), f"{recipe}: {name} differs between ranks"


def test_subcenter_arcface_weights_trained_and_identical(probe):
    ranks = load_ranks(probe / "demo_arcface")
    key = "heads.species.loss.W"
    assert torch.equal(ranks[0]["final"][key], ranks[1]["final"][key])
    assert not torch.equal(ranks[0]["final"][key], ranks[0]["initial"][key])  # it did train
    sub_centers = load_config("demo_arcface")["levels"]["species"]["head"]["sub_centers"]
    assert ranks[0]["final"][key].shape[1] == 6 * sub_centers  # 6 species in the tiny herbarium
    assert_loss_decreases(ranks)


def test_every_image_gets_its_own_teacher_row(tiny_herbarium, tmp_path):
    """Each sample's teacher targets travel with it through accelerate's sharding: the planted
    teacher encodes each image's id in its remaining mass, and each rank's samples must carry
    their own image's value."""
    from herbens.stores.targets import open_targets_writer

    meta = load_train_metadata(tiny_herbarium / "train_metadata.json")
    taxonomy = Taxonomy.from_metadata(meta)
    ids = meta.images["image_id"].astype(str).tolist()
    fingerprint = {image_id: (i + 1) / (4 * len(ids)) for i, image_id in enumerate(ids)}  # the rest mass
    c = taxonomy.num_classes("species")
    with open_targets_writer(tmp_path / "teacher", "train", ids, {"species": (1, c)},
                             {"taxonomy_hash": taxonomy.hash}) as writer:
        probs = np.full((len(ids), c), 0.0)
        rest = np.array([fingerprint[i] for i in ids])
        probs[:, 0] = 1 - rest
        probs[:, 1:] = (rest / (c - 1))[:, None]
        writer.write("species", 0, np.log(probs))
    torchrun(ROOT / "tests" / "dist_probe.py",
             [str(tmp_path / "out"), "demo_ce", "--epochs", "1", "--overrides", f"data.root={tiny_herbarium}",
              *COMMON, *PROBE_OVERRIDES, f"distill.teacher={tmp_path / 'teacher'}"])
    ranks = load_ranks(tmp_path / "out" / "demo_ce")
    seen = [pair for r in ranks for pair in r["taught"]]
    assert ranks[0]["taught"] and ranks[1]["taught"]
    assert {i for i, _ in ranks[0]["taught"]}.isdisjoint({i for i, _ in ranks[1]["taught"]})
    for image_id, value in seen:
        assert value == pytest.approx(fingerprint[image_id], abs=1e-6), image_id


def test_two_processes_give_every_image_its_own_online_teacher_scores(tiny_herbarium, tiny_run, tmp_path):
    """Each rank's online teacher scores that rank's own mixed batch (of 4: timm mixes even
    batches): the ranks' images are disjoint, and every recorded score is the bundle's softmax
    of exactly the images scored."""
    from herbens.bundle.load import load_bundle

    assert cli_main(["export", str(tiny_run), "-o", str(tmp_path / "bundle")]) == 0
    torchrun(ROOT / "tests" / "dist_probe.py",
             [str(tmp_path / "out"), "demo_ce", "--epochs", "1", "--overrides", f"data.root={tiny_herbarium}",
              *COMMON, *PROBE_OVERRIDES, "train.batch_size=4", "augment.mixup=0.8", f"distill.teacher={tmp_path / 'bundle'}",
              "distill.online=true"])
    ranks = load_ranks(tmp_path / "out" / "demo_ce")
    assert ranks[0]["scored"] and ranks[1]["scored"]
    ids = [{i for step in rank["scored"] for i in step[0]} for rank in ranks]
    assert ids[0].isdisjoint(ids[1])
    member = load_bundle(tmp_path / "bundle").members[0]
    for rank in ranks:
        for step_ids, images, logp in rank["scored"]:
            assert len(step_ids) == len(images) == len(logp)
            with torch.no_grad():
                expected = torch.log_softmax(member.model(images)["species"].double(), dim=1)
            torch.testing.assert_close(logp.double(), expected, rtol=1e-4, atol=1e-4)
