"""The training epoch reads loss parts back only every ``log_every`` steps, with the same numbers.

Reference: what the epoch used to do, a ``float()`` of every loss part after every step summed
in Python; the device-side sums must give exactly those means, progress-bar values and
unreadable-image indices.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

import herbens.training.engine as engine
from herbens.losses import build_criterion
from herbens.models.net import build_model
from herbens.optim.optimizers import build_optimizer
from herbens.optim.schedules import build_schedule
from herbens.training.engine import DeviceTotals, TrainParts, TrainState, train_one_epoch
from test_models import make_cfg

STEPS, LOG_EVERY, BATCH = 5, 2, 4


def test_float64_device_sums_equal_python_sums_of_float32_values():
    values = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 10
    totals = DeviceTotals()
    for value in values:
        totals.add({"loss": value}, {})
    expected = 0.0
    for value in values:
        expected += float(value)
    assert totals.read() == {"loss": expected / len(values)}


def _parts(taxonomy, device: str = "cpu") -> TrainParts:
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=device == "cpu")
    cfg = make_cfg()
    model = build_model(cfg, taxonomy)
    criterion = build_criterion(cfg["levels"], taxonomy).to(accelerator.device)
    optimizer = build_optimizer(model, list(criterion.parameters()), cfg["optimizer"], 1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = build_schedule(optimizer, {"name": "none"}, 1, STEPS, 1e-3)
    return TrainParts(accelerator, model, criterion, optimizer, schedule, ("species", "genus", "family"))


def _batches(taxonomy, device) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for step in range(STEPS):
        species = torch.randint(0, taxonomy.num_classes("species"), (BATCH,), generator=gen)
        batch = {"image": torch.randn(BATCH, 3, 32, 32, generator=gen), "index": torch.arange(BATCH) + BATCH * step,
                 "unreadable": torch.tensor([step == 1, False, step in (1, 3), False])}
        batch.update({level: taxonomy.level_indices(level, species) for level in ("species", "genus", "family")})
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


class _Bar:
    """Stands in for the progress bar (herbens.core.progress.progress_bar) and keeps the values shown."""

    shown: list[dict] = []

    def __init__(self, *args, **kwargs):
        pass

    def update(self, n):
        pass

    def set_postfix(self, **values):
        _Bar.shown.append(values)

    def close(self):
        pass


def test_epoch_means_bar_and_unreadable_equal_a_per_step_readback(taxonomy, monkeypatch):
    parts = _parts(taxonomy)
    read_back, step = [], engine.train_step

    def recording_step(*args):
        losses = step(*args)
        read_back.append({k: float(v) for k, v in losses.items()})  # the old per-step float()
        return losses

    monkeypatch.setattr(engine, "train_step", recording_step)
    monkeypatch.setattr(engine, "progress_bar", _Bar)
    _Bar.shown = []
    out = train_one_epoch(parts, _batches(taxonomy, "cpu"), TrainState(), STEPS, log_every=LOG_EVERY)

    assert len(read_back) == STEPS and {"loss", "species", "genus", "family"} <= set(read_back[0])
    for key in read_back[0]:
        total = 0.0
        for record in read_back:
            total += record[key]
        assert out[key] == total / STEPS, key  # bit for bit, not approximately
    bar_losses = [values["loss"] for values in _Bar.shown]
    expected = []
    for count in range(LOG_EVERY, STEPS + 1, LOG_EVERY):
        total = 0.0
        for record in read_back[:count]:
            total += record["loss"]
        expected.append(f"{total / count:.3f}")
    assert bar_losses == expected
    assert out["unreadable"] == [4, 6, 14]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_steps_do_not_synchronise_with_the_host(taxonomy, monkeypatch):
    """Between read-backs no step waits for the GPU (CUDA's sync debug mode raises if one does)."""
    parts = _parts(taxonomy, "cuda")
    batches = _batches(taxonomy, "cuda")
    engine.train_step(parts, batches[0], TrainState())  # first step: lazy CUDA initialisation
    totals, state = DeviceTotals(), TrainState()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            totals.add(engine.train_step(parts, batch, state), batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert set(totals.read()) >= {"loss", "species"} and totals.unreadable == {4, 6, 14}
