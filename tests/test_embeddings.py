"""The embeddings store: round trip, normalisation, refusals that name the file, and
``herbens infer RUN --embeddings`` on a tiny trained run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from herbens.cli.main import main
from herbens.data.taxonomy import Taxonomy
from herbens.core.errors import HerbensError
from herbens.infer.loop import combine_embedding_views
from herbens.stores.embeddings import embeddings_dir, iter_chunks, open_embeddings_writer, read_embeddings, write_embeddings

# Four species, as the stored labels below.
TAX = Taxonomy([1, 2, 3, 4], list("ABCD"), ["g0", "g1"], ["f0"], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1])
META = {"taxonomy_hash": TAX.hash, "model": "m", "views": ["center"]}


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def stored(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)) * rng.uniform(0.5, 3.0, (50, 1))
    labels = rng.integers(0, 4, 50)
    write_embeddings(tmp_path, "train", [f"a{i}" for i in range(50)], x, META, labels=labels, num_species=4,
                     chunk_rows=7)
    return tmp_path, x, labels


def test_round_trip_normalised_fp16(stored):
    run, x, labels = stored
    split = read_embeddings(run, "train", taxonomy=TAX)
    assert split.matrix.dtype == np.float16 and split.matrix.shape == (50, 8)
    assert split.image_ids == [f"a{i}" for i in range(50)]
    np.testing.assert_array_equal(split.labels, labels)
    np.testing.assert_allclose(np.asarray(split.matrix, np.float32), unit(x), atol=1e-3)
    assert split.meta["kind"] == "embeddings" and split.meta["normalised"] and split.meta["views"] == ["center"]
    blocks = [b for _, _, b in iter_chunks(split, 16)]
    assert [len(b) for b in blocks] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.concatenate(blocks), np.asarray(split.matrix, np.float32))


def test_views_are_normalised_then_averaged_then_normalised(tmp_path):
    rng = np.random.default_rng(1)
    views = rng.standard_normal((6, 3, 5)) * np.array([1.0, 10.0, 0.1])[None, :, None]
    write_embeddings(tmp_path, "val", list("abcdef"), views, META)
    got = np.asarray(read_embeddings(tmp_path, "val").matrix, np.float32)
    want = unit(unit(views).mean(axis=1))
    np.testing.assert_allclose(got, want, atol=1e-3)
    # The model-side combination (engine.predict_batches) is the same function.
    np.testing.assert_allclose(combine_embedding_views(torch.tensor(views)).numpy(), want, atol=1e-6)


def test_reader_refusals_name_the_problem(stored):
    run, _, _ = stored
    path = embeddings_dir(run, "train")
    other = Taxonomy([1, 2, 3], list("ABC"), ["g0"], ["f0"], [0, 0, 0], [0, 0, 0], [1, 1, 1])
    with pytest.raises(HerbensError, match="written for taxonomy"):
        read_embeddings(run, "train", taxonomy=other)
    with pytest.raises(HerbensError, match="no embeddings directory"):
        read_embeddings(run, "val")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "kind": "logits"}))
    with pytest.raises(HerbensError, match="kind"):
        read_embeddings(run, "train")
    (path / "meta.json").write_text(json.dumps({**meta, "split": "val"}))
    with pytest.raises(HerbensError, match="renamed"):
        read_embeddings(run, "train")
    (path / "meta.json").write_text(json.dumps(meta))
    data = (path / "embeddings.npy").read_bytes()
    (path / "embeddings.npy").write_bytes(data[:-10])
    with pytest.raises(HerbensError, match="embeddings.npy.*truncated"):
        read_embeddings(run, "train")
    # A row that is not unit length (e.g. written by something else) is refused while streaming.
    arr = np.lib.format.open_memmap(path / "tmp.npy", mode="w+", dtype=np.float16, shape=(50, 8))
    arr[:] = 0.5
    arr.flush()
    del arr
    (path / "tmp.npy").replace(path / "embeddings.npy")
    split = read_embeddings(run, "train")
    with pytest.raises(HerbensError, match="row 0 has norm"):
        list(iter_chunks(split, 10))
    (path / "meta.json").unlink()
    with pytest.raises(HerbensError, match="meta.json is missing"):
        read_embeddings(run, "train")


def test_writer_refusals_publish_nothing(tmp_path):
    ids = ["a", "b", "c"]
    with pytest.raises(HerbensError, match="duplicate"):
        write_embeddings(tmp_path, "train", ["a", "a", "b"], np.ones((3, 4)), META)
    with pytest.raises(HerbensError, match="zero or non-finite"):
        write_embeddings(tmp_path, "train", ids, np.array([[1.0, 0], [0, 0], [0, 1]]), META)
    with pytest.raises(HerbensError, match="non-finite"):
        write_embeddings(tmp_path, "train", ids, np.array([[1.0, 0], [np.nan, 1], [0, 1]]), META)
    with pytest.raises(HerbensError, match="labels"):
        write_embeddings(tmp_path, "train", ids, np.ones((3, 4)), META, labels=[0, 1, 9], num_species=4)
    with pytest.raises(HerbensError, match="never written"):
        with open_embeddings_writer(tmp_path, "train", ids, 4, META) as writer:
            writer.write(0, np.ones((2, 4)))
    with pytest.raises(HerbensError, match="does not fit"):
        with open_embeddings_writer(tmp_path, "train", ids, 4, META) as writer:
            writer.write(2, np.ones((2, 4)))
    assert not embeddings_dir(tmp_path, "train").exists()


@pytest.mark.slow
def test_infer_embeddings_on_a_trained_run(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    taxonomy = Taxonomy.load(run / "taxonomy.json")
    assert main(["infer", str(run), "--embeddings", "--no-logits", "--tta", "center", "hflip"]) == 0
    split_ids = set(json.loads((run / "logits" / "val" / "image_ids.json").read_text()))
    sizes = {}
    for split in ("train", "val", "test"):
        emb = read_embeddings(run, split, taxonomy=taxonomy)
        block = np.asarray(emb.matrix, np.float32)
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, atol=2e-3)
        assert emb.meta["views"] == ["center", "hflip"]
        assert (emb.labels is None) == (split == "test")
        sizes[split] = len(emb)
    assert set(read_embeddings(run, "val").image_ids) == split_ids
    assert sizes["train"] == int(taxonomy.counts.sum())  # counts are the training rows
    assert main(["infer", str(run), "--no-logits"]) == 2  # nothing to do


@pytest.mark.slow
def test_training_writes_embeddings_and_retrieval_joins_the_ensemble(tiny_herbarium, tmp_path):
    from conftest import train_tiny

    from herbens.ensemble.pipeline import ensemble_runs

    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=emb", "infer.embeddings=true"]) == 0
    run = tmp_path / "emb"
    for split in ("train", "val", "test"):
        assert read_embeddings(run, split, taxonomy=Taxonomy.load(run / "taxonomy.json")).dim > 0
    assert main(["retrieval", str(run), "--method", "prototype", "--no-progress"]) == 0
    summary = ensemble_runs([run, tmp_path / "emb_prototype"], tmp_path / "both.csv", progress=False,
                            log=lambda *_: None)
    assert [r["name"] for r in summary["runs"]] == ["emb", "emb_prototype"]


def test_fewshot_hold_out_removes_species_from_training(tiny_herbarium, tmp_path):
    import importlib.util
    from pathlib import Path

    from herbens.data.metadata import load_test_metadata, load_train_metadata

    spec = importlib.util.spec_from_file_location(
        "fewshot_eval", Path(__file__).resolve().parents[1] / "bench" / "fewshot_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    held = bench.hold_out(tiny_herbarium, tmp_path / "known", 0.1, seed=0)
    full = load_train_metadata(tiny_herbarium / "train_metadata.json")
    known = load_train_metadata(tmp_path / "known" / "train_metadata.json")
    test = load_test_metadata(tmp_path / "known" / "test_metadata.json")
    gone = set(full.categories["category_id"]) - set(known.categories["category_id"])
    assert len(gone) == 2 and not known.images["category_id"].isin(gone).any()  # max(2, 10 % of 6)
    assert len(test) == int(full.images["category_id"].isin(gone).sum()) == len(held)
    assert sorted(set(held.values())) == [0, 1]
    assert all((Path(test.attrs["images_dir"]) / f).exists() for f in test["file_name"])
