"""Linear probe, then fine-tune: ``train.freeze_trunk_epochs`` and ``train.unfreeze_warmup_epochs``.

What must hold: during the frozen epochs the trunk (weights and BatchNorm statistics) stays
bit-identical while the heads train; afterwards every trunk parameter trains, after a fresh
warm-up; and a run killed in the frozen phase and resumed across the switch ends bitwise equal
to an uninterrupted one.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_OVERRIDES, train_tiny
from herbens.config import load_config
from herbens.core.errors import HerbensError
from herbens.core.fileio import read_json
from herbens.models.net import build_model
from herbens.optim.optimizers import build_optimizer
from herbens.optim.schedules import ProbeThenFinetuneSchedule, build_schedule, build_training_schedule
from herbens.training import preflight, setup as training_setup
from herbens.training.checkpoint import POINTER, checkpoint_dir
from test_faults import kill_at_first_checkpoint

PROBE = ["train.freeze_trunk_epochs=1", "train.unfreeze_warmup_epochs=0.5", "train.batch_size=4",
         "optimizer.layer_decay=0.8", "train.deterministic=true"]


def prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def checkpoint_weights(run, epochs_done: int) -> dict:
    """Model weights of the checkpoint written at the end of epoch ``epochs_done``."""
    (folder,) = checkpoint_dir(run).glob(f"epoch{epochs_done:04d}-step*")
    return load_file(folder / "model.safetensors")


def test_frozen_epochs_train_only_the_heads_then_everything(tiny_herbarium, tmp_path, monkeypatch):
    built = []

    def spy(cfg, taxonomy):  # the model as training starts, before any step
        built.append(build_model(cfg, taxonomy))
        built.append(copy.deepcopy(built[-1].state_dict()))
        return built[0]

    monkeypatch.setattr(training_setup, "build_model", spy)
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=probe", "infer.splits=[]", *PROBE]) == 0
    initial = built[1]
    run = tmp_path / "probe"
    after_probe = checkpoint_weights(run, 1)
    final = torch.load(run / "model.pt", weights_only=True)

    trunk0, trunk1, trunk2 = (prefixed(s, "trunk.") for s in (initial, after_probe, final))
    assert trunk0.keys() == trunk1.keys() and any("running_mean" in k for k in trunk0)
    changed = [k for k in trunk0 if not torch.equal(trunk0[k], trunk1[k])]
    assert not changed, f"the frozen trunk changed: {changed[:3]}"  # weights and BN statistics
    for level in ("species", "genus", "family"):
        key = f"heads.{level}.fc.weight"
        assert not torch.equal(initial[key], after_probe[key]), f"{level} head did not train"
    params = {name for name, _ in built[0].trunk.named_parameters()}
    still = [k for k in params if torch.equal(trunk1[k], trunk2[k])]
    assert not still, f"trunk parameters that did not train after the switch: {still[:3]}"


def test_schedule_restarts_with_its_own_warm_up_at_the_switch(taxonomy):
    cfg = load_config("demo_ce", ["train.epochs=3", "train.freeze_trunk_epochs=1",
                                  "train.unfreeze_warmup_epochs=1", "optimizer.layer_decay=0.5",
                                  "scheduler.warmup_epochs=0", "scheduler.warmup_lr=1e-5",
                                  "scheduler.min_lr=1e-6"])
    model = build_model(cfg, taxonomy)
    optimizer = build_optimizer(model, [], cfg["optimizer"], 1e-2)
    schedule = build_training_schedule(optimizer, cfg["scheduler"], cfg["train"], 10, 1e-2)
    heads = optimizer.param_groups[-1]  # the heads' group: full LR
    scales = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    assert min(scales) < 1.0  # layer decay on the trunk

    def lrs_at(step):
        schedule.step(step)
        return [g["lr"] for g in optimizer.param_groups]

    assert heads["lr"] == pytest.approx(1e-2)  # the probe starts at the peak (no warm-up there)
    assert lrs_at(9)[-1] < 1e-3  # ... and anneals to min_lr over the frozen epoch
    assert lrs_at(10) == pytest.approx([1e-5 * s for s in scales])  # switch: a fresh warm-up
    # From the switch on: exactly a plain 2-epoch schedule with a 1-epoch warm-up (timm's cosine).
    reference_cfg = dict(cfg["scheduler"], warmup_epochs=1)
    reference_opt = build_optimizer(build_model(cfg, taxonomy), [], cfg["optimizer"], 1e-2)
    reference = build_schedule(reference_opt, reference_cfg, 2, 10, 1e-2)
    for t in (1, 5, 10, 15, 20):
        reference.step(t)
        assert lrs_at(10 + t) == pytest.approx([g["lr"] for g in reference_opt.param_groups]), t
    # A checkpointed schedule resumes where it was.
    state = copy.deepcopy(schedule.state_dict())
    other = build_training_schedule(optimizer, cfg["scheduler"], cfg["train"], 10, 1e-2)
    other.load_state_dict(state)
    other.step(15)
    expected = [g["lr"] for g in optimizer.param_groups]
    assert expected == lrs_at(15)


@pytest.mark.parametrize("override, message", [
    ("train.freeze_trunk_epochs=5", "train.freeze_trunk_epochs=5 is more than train.epochs=3"),
    ("scheduler.name=onecycle", "train.freeze_trunk_epochs=1 .*got onecycle")])
def test_bad_probe_settings_are_refused_when_the_recipe_loads(override, message):
    with pytest.raises(HerbensError, match=message):
        load_config("demo_ce", ["train.epochs=3", "train.freeze_trunk_epochs=1", override])


def test_preflight_steps_the_probe_then_fine_tune_schedule(taxonomy, monkeypatch):
    # The preflight must check the schedule training will use, not a plain one of train.epochs.
    cfg = load_config("demo_ce", ["train.epochs=3", "train.freeze_trunk_epochs=1", "train.unfreeze_warmup_epochs=1",
                                  "optimizer.layer_decay=0.5"])
    optimizer = build_optimizer(build_model(cfg, taxonomy), [], cfg["optimizer"], 1e-2)
    before = copy.deepcopy(optimizer.state_dict()["param_groups"])
    stepped = []

    def recording(*args):
        schedule = build_training_schedule(*args)
        step = schedule.step
        schedule.step = lambda n: (stepped.append(n), step(n))
        stepped.append(schedule)
        return schedule

    monkeypatch.setattr(preflight, "build_training_schedule", recording)
    preflight.check_schedule(optimizer, cfg["scheduler"], cfg["train"], 10, 1e-2)
    assert isinstance(stepped[0], ProbeThenFinetuneSchedule) and stepped[1:] == list(range(1, 31))
    assert optimizer.state_dict()["param_groups"] == before  # the stand-in took the steps


def test_a_probe_over_every_epoch_may_use_onecycle():
    # No switch, so one schedule: nothing for onecycle to conflict with.
    cfg = load_config("demo_ce", ["train.epochs=2", "train.freeze_trunk_epochs=2", "scheduler.name=onecycle"])
    assert cfg["train"]["freeze_trunk_epochs"] == 2


@pytest.mark.slow
def test_kill_in_the_probe_then_resume_across_the_switch_is_bitwise_exact(tiny_herbarium, tmp_path):
    args = [*PROBE, "train.checkpoint_every_steps=1", "infer.splits=[]"]
    pointer = tmp_path / "killed" / "checkpoints" / POINTER
    kill_at_first_checkpoint(["demo_ce", f"data.root={tiny_herbarium}", f"output_dir={tmp_path}", "name=killed",
                              *TINY_OVERRIDES, *args], pointer, tmp_path / "train.log")
    saved = read_json(pointer)
    assert saved["epoch"] == 0, "killed after the probe: the resume would not cross the switch"

    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=killed", *args], flags=["--resume"]) == 0
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=straight", *args]) == 0
    history = [json.loads(line) for line in (tmp_path / "killed" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and saved["step"] < history[0]["step"]
    resumed = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    different = [k for k in resumed if not torch.equal(resumed[k], straight[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_probe_then_fine_tune(tiny_herbarium, tmp_path):
    # Under DDP the frozen trunk's parameters get no gradient: the reducer must expect that.
    from test_distributed import ROOT, torchrun

    torchrun(ROOT / "herbens" / "train.py", ["demo_ce", f"data.root={tiny_herbarium}", f"output_dir={tmp_path}",
                                             "name=ddp", *TINY_OVERRIDES, *PROBE, "infer.splits=[]"])
    run = tmp_path / "ddp"
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    after_probe, final = checkpoint_weights(run, 1), torch.load(run / "model.pt", weights_only=True)
    trunk1, trunk2 = prefixed(after_probe, "trunk."), prefixed(final, "trunk.")
    assert any(not torch.equal(trunk1[k], trunk2[k]) for k in trunk1)  # the trunk trained after the switch
