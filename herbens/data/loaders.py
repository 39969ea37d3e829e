"""DataLoaders for training and prediction, built from a tidy frame and the recipe."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from herbens.data.dataset import HerbariumDataset
from herbens.data.samplers import build_sampler
from herbens.data.taxonomy import Taxonomy


def _loader_kwargs(num_workers: int) -> dict:
    # Workers stay alive across epochs: re-forking them each epoch costs seconds per epoch.
    return {"num_workers": num_workers, "persistent_workers": num_workers > 0,
            "pin_memory": False}


def train_loader(frame, images_dir: Path, taxonomy: Taxonomy, transform, cfg: dict):
    """Shuffled (or re-balanced) training loader; returns (loader, sampler with set_epoch)."""
    labels = taxonomy.index_of(frame["category_id"].to_numpy())
    sampler_cfg = dict(cfg["sampler"])
    name = sampler_cfg.pop("name")
    batch_size = int(cfg["train"]["batch_size"])
    dataset = HerbariumDataset(frame, images_dir, taxonomy, transform,
                               bad_image_policy=cfg["data"]["bad_images"])
    if name == "pk":
        sampler = build_sampler(name, labels, seed=cfg["seed"],
                                classes_per_batch=sampler_cfg["classes_per_batch"],
                                images_per_class=sampler_cfg["images_per_class"])
        loader = DataLoader(dataset, batch_sampler=sampler, **_loader_kwargs(cfg["data"]["num_workers"]))
        return loader, sampler
    params = {"alpha": sampler_cfg["alpha"]} if name in ("sqrt", "power") else {}
    sampler = build_sampler(name, labels, seed=cfg["seed"], **params)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        **_loader_kwargs(cfg["data"]["num_workers"]))
    return loader, sampler


def predict_loader(frame, images_dir: Path, taxonomy: Taxonomy | None, views, cfg: dict,
                   batch_size: int | None = None):
    """Ordered loader over every row of ``frame``; one stacked tensor of views per image."""
    dataset = HerbariumDataset(frame, images_dir, taxonomy, transform=None,
                               bad_image_policy="error", views=[fn for _, fn in views])
    return DataLoader(dataset, batch_size=batch_size or int(cfg["infer"]["batch_size"]), shuffle=False,
                      **_loader_kwargs(cfg["data"]["num_workers"]))

