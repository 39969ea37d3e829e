"""Shared fixtures: one tiny synthetic herbarium and one tiny trained run per test session."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Two cores in CI: one torch thread per process keeps parallel data workers from thrashing.
torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")
# torch.compile's inductor caches compiled kernels under /tmp, shared by every process of the
# user; a process killed while writing one leaves a truncated file that later runs load and
# fail on ("file too short"). Each test session compiles into a cache of its own.
_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="herbens-inductor-")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _INDUCTOR_CACHE)
atexit.register(shutil.rmtree, _INDUCTOR_CACHE, ignore_errors=True)

TINY_OVERRIDES = [
    "train.epochs=2", "train.batch_size=8", "input.size=[48,32]", "data.num_workers=0",
    "infer.batch_size=16", "data.val_fraction=0.25", "train.log_every=1",
]


@pytest.fixture
def taxonomy():
    """6 species in 3 genera and 2 families, with long-tailed counts."""
    from herbens.data.taxonomy import Taxonomy

    return Taxonomy(category_ids=[3, 8, 10, 12, 20, 21], species_names=list("abcdef"),
                    genus_names=["g0", "g1", "g2"], family_names=["f0", "f1"],
                    species_to_genus=[0, 0, 1, 1, 2, 2], species_to_family=[0, 0, 0, 1, 1, 1],
                    counts=[30, 5, 8, 2, 1, 4])


@pytest.fixture(scope="session")
def tiny_herbarium(tmp_path_factory) -> Path:
    """A Kaggle-2022-format synthetic herbarium: 6 species, 64 px sheets."""
    from herbens.data.synth import synthesize

    root = tmp_path_factory.mktemp("herbarium")
    synthesize(root, species=6, seed=3, long_edge=64, min_images=4, max_images=12,
               test_per_species=2, progress=False)
    return root


def train_tiny(root: Path, out: Path, recipe: str = "demo_ce", extra: list[str] | None = None,
               flags: list[str] | None = None) -> int:
    """Train a recipe on the tiny herbarium through ``herbens.train.main``."""
    from herbens.train import main

    argv = [recipe, f"data.root={root}", f"output_dir={out}", *TINY_OVERRIDES, *(extra or []), *(flags or [])]
    return main(argv)


def planted_teacher(root, out, drop: int = 0, taxonomy_hash: str | None = None):
    """A teacher folder (what ``herbens teach`` writes) with species and genus targets for every
    training-metadata image: 90 % on the true class, the rest spread."""
    import numpy as np

    from herbens.data.metadata import load_train_metadata
    from herbens.data.taxonomy import Taxonomy
    from herbens.stores.targets import open_targets_writer

    meta = load_train_metadata(root / "train_metadata.json")
    taxonomy = Taxonomy.from_metadata(meta)
    ids = meta.images["image_id"].astype(str).tolist()[drop:]
    species = taxonomy.index_of(meta.images["category_id"].to_numpy())[drop:]
    shapes = {level: (3, taxonomy.num_classes(level)) for level in ("species", "genus")}
    with open_targets_writer(out, "train", ids, shapes, {"taxonomy_hash": taxonomy_hash or taxonomy.hash}) as writer:
        for level, (_, c) in shapes.items():
            probs = np.full((len(ids), c), 0.1 / c)
            probs[np.arange(len(ids)), taxonomy.level_indices(level, species)] += 0.9
            writer.write(level, 0, np.log(probs))
    return out


@pytest.fixture(scope="session")
def tiny_run(tiny_herbarium, tmp_path_factory) -> Path:
    """A finished run directory of the demo_ce recipe on the tiny herbarium."""
    out = tmp_path_factory.mktemp("runs")
    assert train_tiny(tiny_herbarium, out, extra=["name=tiny"]) == 0
    return out / "tiny"
