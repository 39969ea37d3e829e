"""Samplers: target class distributions, determinism from (seed, epoch), rank shards, P x K batches."""

from __future__ import annotations

import numpy as np
import pytest

from herbens.config import base_recipe, load_config
from herbens.data.samplers import PKBatchSampler, build_sampler
from herbens.core.errors import HerbensError

COUNTS = np.array([200, 50, 20, 8, 2, 1])
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(len(COUNTS)), COUNTS))


def class_frequencies(indices, labels=LABELS):
    return np.bincount(labels[np.asarray(indices)], minlength=len(COUNTS)) / len(indices)


@pytest.mark.parametrize("name,alpha,expected", [
    ("class_balanced", None, np.full(len(COUNTS), 1 / len(COUNTS))),
    ("sqrt", 0.5, np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()),
    ("power", 0.25, COUNTS ** 0.25 / (COUNTS ** 0.25).sum()),
    ("power", 1.0, COUNTS / COUNTS.sum()),
])
def test_class_frequencies_converge_to_target(name, alpha, expected):
    params = {} if alpha is None else {"alpha": alpha}
    sampler = build_sampler(name, LABELS, seed=1, num_samples=60_000, **params)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 60_000
    np.testing.assert_allclose(class_frequencies(indices), expected, atol=0.01)


def test_class_balanced_is_uniform_within_a_class():
    sampler = build_sampler("class_balanced", LABELS, seed=2, num_samples=60_000)
    picks = np.asarray(list(sampler))
    of_class0 = picks[LABELS[picks] == 0]
    per_image = np.bincount(of_class0, minlength=len(LABELS))[LABELS == 0]
    assert per_image.min() > 0 and per_image.std() / per_image.mean() < 0.5


def test_random_is_a_permutation():
    sampler = build_sampler("random", LABELS, seed=3)
    assert sorted(sampler) == list(range(len(LABELS)))


PK = {"classes_per_batch": 3, "images_per_class": 2}


@pytest.mark.parametrize("name", ["random", "class_balanced", "sqrt", "pk"])
def test_deterministic_from_seed_and_epoch(name):
    params = PK if name == "pk" else {}

    def draw(seed, epoch):
        sampler = build_sampler(name, LABELS, seed=seed, **params)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert draw(7, 0) == draw(7, 0)
    assert draw(7, 5) == draw(7, 5)
    assert draw(7, 0) != draw(7, 1)
    assert draw(7, 0) != draw(8, 0)
    sampler = build_sampler(name, LABELS, seed=7, **params)
    sampler.set_epoch(1)
    assert list(sampler) == list(sampler)  # iterating twice replays the epoch


@pytest.mark.parametrize("name", ["random", "class_balanced", "sqrt"])
@pytest.mark.parametrize("world", [2, 3, 7])
def test_rank_shards_are_disjoint_and_cover(name, world):
    full = build_sampler(name, LABELS, seed=4)
    full.set_epoch(2)
    epoch = full.epoch_indices()
    shards = []
    for rank in range(world):
        sampler = build_sampler(name, LABELS, seed=4, num_replicas=world, rank=rank)
        sampler.set_epoch(2)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == -(-len(LABELS) // world)
    # Rank r takes positions r, r + world, ... of the one epoch list, padded by wrapping around.
    interleaved = [shards[r][i] for i in range(len(shards[0])) for r in range(world)]
    padded = np.resize(epoch, len(interleaved)).tolist()
    assert interleaved == padded
    if name == "random":
        assert set(interleaved) == set(range(len(LABELS)))


def test_pk_batches_have_p_classes_of_k_images():
    sampler = build_sampler("pk", LABELS, seed=5, classes_per_batch=4, images_per_class=3)
    assert sampler.is_batch_sampler and sampler.batch_size == 12
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(LABELS) // 12
    for batch in batches:
        classes, per_class = np.unique(LABELS[batch], return_counts=True)
        assert len(classes) == 4 and (per_class == 3).all()
    # Large classes are walked through without repeats inside a batch; the one-image class repeats.
    for batch in batches:
        for c in np.unique(LABELS[batch]):
            picked = [i for i in batch if LABELS[i] == c]
            assert len(set(picked)) == min(3, COUNTS[c])
    # Classes are chosen uniformly.
    freq = np.bincount(LABELS[np.concatenate(batches)], minlength=len(COUNTS)) / (len(batches) * 12)
    np.testing.assert_allclose(freq, 1 / len(COUNTS), atol=0.05)


def test_pk_rank_shards_are_disjoint_batches_of_one_epoch():
    full = PKBatchSampler(LABELS, seed=6, classes_per_batch=2, images_per_class=2, num_batches=9)
    full.set_epoch(3)
    epoch = full.epoch_batches()
    got = []
    for rank in range(2):
        sampler = build_sampler("pk", LABELS, seed=6, classes_per_batch=2, images_per_class=2,
                                num_batches=9, num_replicas=2, rank=rank)
        sampler.set_epoch(3)
        assert len(sampler) == 5
        got.append(list(sampler))
    # 9 batches padded to 10 by wrapping: rank r takes batches r, r + 2, ... of the same epoch.
    padded = np.concatenate([epoch, epoch[:1]])
    assert got[0] == padded[0::2].tolist() and got[1] == padded[1::2].tolist()


def test_errors_are_loud():
    with pytest.raises(HerbensError, match="unknown sampler 'balanced'"):
        build_sampler("balanced", LABELS, seed=0)
    with pytest.raises(HerbensError, match="sampler pk: .*'classes_per_batc'"):
        build_sampler("pk", LABELS, seed=0, classes_per_batc=2)
    with pytest.raises(HerbensError, match="only 6 classes"):
        build_sampler("pk", LABELS, seed=0, classes_per_batch=7)
    with pytest.raises(HerbensError, match="rank"):
        build_sampler("random", LABELS, seed=0, num_replicas=2, rank=2)
    with pytest.raises(HerbensError, match="labels"):
        build_sampler("random", np.array([0, -1, 2]), seed=0)


@pytest.mark.parametrize("name", ["random", "class_balanced", "sqrt", "power", "pk"])
def test_every_sampler_builds_from_its_resolved_recipe_node(name):
    node = load_config(base_recipe(), [f"sampler={name}", "sampler.classes_per_batch=2"] if name == "pk" else
                       [f"sampler={name}"])["sampler"]
    params = {k: v for k, v in node.items() if k != "name"}
    assert set(params) == ({"alpha"} if name in ("sqrt", "power") else
                           {"classes_per_batch", "images_per_class"} if name == "pk" else set())
    sampler = build_sampler(node["name"], LABELS, seed=0, **params)
    sampler.set_epoch(1)
    assert len(list(sampler)) == len(sampler)
