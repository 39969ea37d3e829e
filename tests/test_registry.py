"""One registration mechanism (herbens.core.registry): a loss defined here, in the test module, is one
decorated class; a recipe can name it at once, its parameters come from its constructor, and
what it needs is declared on it and checked when the recipe loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
import yaml

from conftest import train_tiny
from herbens.config import base_recipe, load_config
from herbens.core.errors import HerbensError
from herbens.losses import LOSSES, LevelLoss, build_level_loss
from herbens.core.registry import components, register, unregister

ROOT = Path(__file__).resolve().parents[1]
CALLS = {"toy_focal": 0}


def define_toy_losses() -> dict[str, type]:
    """Define (and so register) the toy losses. Run by the module fixture, not at import, so
    that they exist only while this module's tests run: collecting it registers nothing."""

    @register("loss")
    class ToyFocalLoss(LevelLoss):
        """Focal loss (Lin et al. 2017) on hard labels: ``-(1 - p_t)^gamma log p_t``."""

        name = "toy_focal"
        supports_soft_targets = False

        def __init__(self, level: str, num_classes: int, counts=None, gamma: float = 2.0):
            super().__init__(level, num_classes, counts)
            if gamma < 0:
                raise ValueError(f"gamma must be >= 0, got {gamma}")
            self.gamma = float(gamma)

        def forward(self, outputs: dict, target: torch.Tensor) -> torch.Tensor:
            CALLS["toy_focal"] += 1
            log_p = F.log_softmax(self.logits(outputs), dim=1).gather(1, self.check_target(target)[:, None])[:, 0]
            return (-(1 - log_p.exp()) ** self.gamma * log_p).mean()

    @register("loss", needs_class_batches=True)
    class ToyMetricLoss(ToyFocalLoss):
        name = "toy_metric"

    @register("loss", requires_head="cosine")
    class ToyCosineLoss(ToyFocalLoss):
        name = "toy_cosine"

    @register("head", "toy_margin", is_margin_head=True)
    class ToyMarginHead(nn.Linear):
        is_margin_head = False  # declared True by the decorator

        def __init__(self, in_dim: int, num_classes: int):
            super().__init__(in_dim, num_classes)

    return {cls.name: cls for cls in (ToyFocalLoss, ToyMetricLoss, ToyCosineLoss)}


@pytest.fixture(scope="module", autouse=True)
def toys():
    defined = define_toy_losses()
    yield defined
    for name in defined:
        unregister("loss", name)
    unregister("head", "toy_margin")


def test_a_loss_defined_in_a_test_module_trains_a_tiny_run(tiny_herbarium, tmp_path, toys):
    assert LOSSES["toy_focal"] is toys["toy_focal"]  # the package's view of the registry sees it
    before = CALLS["toy_focal"]
    status = train_tiny(tiny_herbarium, tmp_path, extra=[
        "name=toy", "train.epochs=1", "infer.splits=[val]", "levels.genus=null", "levels.family=null",
        "levels.species.loss={name: toy_focal, gamma: 1.5}"])
    assert status == 0
    assert CALLS["toy_focal"] > before  # the run's criterion is the toy loss
    recorded = yaml.safe_load((tmp_path / "toy" / "config.yaml").read_text())
    assert recorded["levels"]["species"]["loss"] == [{"name": "toy_focal", "weight": 1.0, "gamma": 1.5}]
    assert (tmp_path / "toy" / "model.pt").is_file()


def test_the_toy_loss_against_the_focal_formula_on_a_tiny_input():
    loss = build_level_loss("toy_focal", "species", 3, None, gamma=2.0)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    target = torch.tensor([0, 2])
    p = torch.softmax(logits, dim=1)[torch.arange(2), target]
    expected = (-(1 - p) ** 2 * torch.log(p)).mean()
    assert torch.allclose(loss({"species": logits}, target), expected)


def test_its_parameters_come_from_its_constructor():
    cfg = load_config(base_recipe(), ["levels.species.loss=toy_focal"])
    assert cfg["levels"]["species"]["loss"] == [{"name": "toy_focal", "weight": 1.0, "gamma": 2.0}]
    with pytest.raises(HerbensError, match=r"loss toy_focal takes no parameter 'gama' \(accepted: gamma\)"):
        load_config(base_recipe(), ["levels.species.loss={name: toy_focal, gama: 1}"])
    with pytest.raises(HerbensError, match="gamma must be >= 0"):
        load_config(base_recipe(), ["levels.species.loss={name: toy_focal, gamma: -1}"])


@pytest.mark.parametrize("overrides,message", [
    (["levels.species.loss=toy_focal", "augment.mixup=0.4"],
     r"levels\.species\.loss\[0\]: mixup/cutmix cannot be combined with loss toy_focal"),
    (["levels.species.loss=toy_metric"],
     r"levels\.species\.loss\[0\]: loss toy_metric needs several images of a species in each batch: "
     r"set sampler: \{name: pk,"),
    (["levels.species.loss=toy_cosine", "levels.species.head=linear"],
     r"levels\.species\.loss\[0\]: loss toy_cosine needs levels\.species\.head: cosine, got head 'linear'"),
    (["levels.species.head=toy_margin"],
     r"levels\.species\.head: head toy_margin is trained by its margin loss: no registered loss declares "
     r"requires_head = 'toy_margin', got ce"),
])
def test_what_a_component_declares_it_needs_is_checked_when_the_recipe_loads(overrides, message):
    with pytest.raises(HerbensError, match=message):
        load_config(base_recipe(), overrides)


def test_declared_needs_are_met_by_declared_abilities():
    cfg = load_config(base_recipe(), ["levels.species.loss=toy_metric", "sampler=pk"])
    assert components("sampler")[cfg["sampler"]["name"]].class_batches
    assert load_config(base_recipe(), ["levels.species.loss=toy_cosine", "levels.species.head=cosine"])


def test_importing_this_module_registers_nothing():
    # Collecting it (importing it) must not change what other modules' tests see.
    code = ("import sys; sys.path.insert(0, 'tests'); import test_registry; "
            "from herbens.core.registry import components; print(sorted(components('loss')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr
    assert "toy_" not in done.stdout and "'ce'" in done.stdout


def test_registration_mistakes_are_refused_at_once():
    with pytest.raises(HerbensError, match=r"loss 'ce' is already registered by herbens\.losses\.ce\."):
        register("loss")(type("OtherCE", (LevelLoss,), {"name": "ce"}))
    with pytest.raises(HerbensError, match=r"has no attribute\(s\) needs_head to declare"):
        register("loss", needs_head="cosine")(type("Typo", (LevelLoss,), {"name": "typo"}))
    with pytest.raises(HerbensError, match="a loss needs a name"):
        register("loss")(type("Nameless", (LevelLoss,), {}))
    with pytest.raises(HerbensError, match="unknown component kind 'optimiser'"):
        register("optimiser")
    assert "typo" not in LOSSES and "ce" in LOSSES and LOSSES["ce"].__name__ == "CrossEntropyLoss"
