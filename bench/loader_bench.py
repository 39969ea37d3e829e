"""herbens' training loader against a naive timm loader, measured in the same run.

Images per second on one CPU core (one process, ``num_workers=0``, one torch thread) of a
whole pass over the same 1000 px specimen-like JPEGs (``herbens.data.synth.synthesize``):

* naive: ``PIL.Image.open(path).convert("RGB")`` at full size, then timm's ``create_transform``
  training pipeline (random-resized crop, flip, to tensor, normalise), collated by a DataLoader;
* herbens: ``herbens.data.loaders.train_loader`` (HerbariumDataset decoding at the reduced size
  ``train_decode_size`` allows, the recipe's timm train transform, dict samples, collate);
* herbens + prepared cache: the same loader over ``herbens prepare --size 2 x input``.

Passes are interleaved (naive, herbens, cached, naive, ...) after one warm-up pass each (the
page cache then holds every file), and the median pass is reported, with the ratios to naive.
Per-core throughput times the cores given to DataLoader workers is the loader's ceiling.

    python bench/loader_bench.py                          # recipes/_base.yaml: 224 x 224
    python bench/loader_bench.py --recipe demo_ce         # any recipe's input and augmentation
    python bench/loader_bench.py --images 200 --repeats 7 --cache-scale 2.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402
from timm.data import create_transform  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from herbens.config import load_config  # noqa: E402
from herbens.data.loaders import train_decode_size, train_loader  # noqa: E402
from herbens.data.metadata import load_train_metadata  # noqa: E402
from herbens.data.prepare import prepare_dataset  # noqa: E402
from herbens.data.synth import synthesize  # noqa: E402
from herbens.data.taxonomy import Taxonomy  # noqa: E402
from herbens.data.transforms import build_train_transform, model_data_config  # noqa: E402
from herbens.models.net import create_trunk  # noqa: E402


class NaiveDataset(Dataset):
    """What a first training script does: full-size PIL decode, timm transform, (image, label)."""

    def __init__(self, paths: list[str], labels: list[int], transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = Image.open(self.paths[index]).convert("RGB")
        return self.transform(image), self.labels[index]


def make_dataset(folder: Path, images: int) -> Path:
    """About ``images`` 1000 px training sheets in the Kaggle 2022 layout."""
    species = max(2, images // 8)
    synthesize(folder, species=species, seed=0, long_edge=1000, min_images=8, max_images=8,
               test_per_species=0, progress=False)
    return folder


def data_config_for(cfg: dict) -> dict:
    # Normalisation and interpolation of the recipe's backbone (only its data config is used).
    trunk = create_trunk(cfg["model"]["backbone"])
    from timm.data import resolve_model_data_config

    return model_data_config(resolve_model_data_config(trunk), cfg["input"])


def naive_loader(root: Path, data_config: dict, augment: dict, batch_size: int) -> DataLoader:
    meta = load_train_metadata(root / "train_metadata.json")
    paths = [str(meta.images_dir / f) for f in meta.images["file_name"]]
    labels = meta.images["category_id"].astype(int).tolist()
    transform = create_transform(
        input_size=data_config["input_size"], is_training=True, scale=tuple(augment["scale"]),
        ratio=tuple(augment["ratio"]), hflip=augment["hflip"], vflip=augment["vflip"],
        interpolation=data_config.get("interpolation", "bilinear"),
        mean=data_config["mean"], std=data_config["std"])
    return DataLoader(NaiveDataset(paths, labels, transform), batch_size=batch_size, shuffle=True,
                      num_workers=0)


def herbens_loader(root: Path, cfg: dict, data_config: dict) -> DataLoader:
    meta = load_train_metadata(root / "train_metadata.json")
    taxonomy = Taxonomy.from_metadata(meta)
    loader, _ = train_loader(meta.images, meta.images_dir, taxonomy,
                             build_train_transform(data_config, cfg["augment"]), cfg)
    return loader


def one_pass(loader: DataLoader) -> tuple[float, int]:
    """Seconds for a whole pass, and the images it delivered."""
    start = time.perf_counter()
    count = 0
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        count += len(images)
    return time.perf_counter() - start, count


def measure(loaders: dict[str, DataLoader], repeats: int) -> dict[str, float]:
    """Median images per second of each loader, passes interleaved after a warm-up each."""
    for loader in loaders.values():
        one_pass(loader)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            seconds, count = one_pass(loader)
            rates[name].append(count / seconds)
    return {name: statistics.median(values) for name, values in rates.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "_base.yaml"),
                        help="recipe whose input size, augmentation and backbone are used")
    parser.add_argument("--images", type=int, default=96, help="1000 px sheets to synthesise")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per loader")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-scale", type=float, default=2.0,
                        help="prepared cache long edge = this x the larger input side")
    parser.add_argument("--workdir", default=None, help="keep the synthetic data here (default: temp)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one core: the unit of DataLoader-worker scaling
    cfg = load_config(args.recipe, ["data.num_workers=0", f"train.batch_size={args.batch_size}",
                                    "model.pretrained=false"])
    data_config = data_config_for(cfg)
    _, height, width = data_config["input_size"]
    cache_size = int(round(args.cache_scale * max(height, width)))
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = make_dataset(Path(tmp) / "sheets", args.images)
        prepared = prepare_dataset(root, cache_size, Path(tmp) / f"sheets_{cache_size}", workers=1,
                                   progress=False)
        loaders = {
            "naive (full decode + timm)": naive_loader(root, data_config, cfg["augment"], args.batch_size),
            "herbens (reduced decode)": herbens_loader(root, cfg, data_config),
            f"herbens + prepared {cache_size} px": herbens_loader(Path(prepared["out"]), cfg, data_config),
        }
        n = len(loaders["naive (full decode + timm)"].dataset)
        print(f"recipe {args.recipe}: input {height}x{width}, augment.scale {cfg['augment']['scale']}, "
              f"ratio {cfg['augment']['ratio']}, backbone {cfg['model']['backbone']}")
        print(f"{n} synthetic 1000 px sheets; train decode size (h, w) >= {train_decode_size(cfg)}; "
              f"prepared cache: long edge {cache_size} px ({prepared['seconds']} s to write)")
        print(f"one process, num_workers=0, torch threads 1, batch {args.batch_size}; "
              f"median of {args.repeats} interleaved passes")
        rates = measure(loaders, args.repeats)
    base = rates["naive (full decode + timm)"]
    print(f"{'loader':<34} {'img/s/core':>10} {'vs naive':>9}")
    for name, rate in rates.items():
        print(f"{name:<34} {rate:10.1f} {rate / base:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
