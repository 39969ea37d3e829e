"""The online (consistent) teacher: a bundle scores the student's own augmented, mixed batch.

Checked against a slow reference (the bundle member's softmax on the very images), with alpha 0
against plain training bit for bit, and through a SIGKILL and resume mid-epoch. The two-process
test is in tests/test_distributed.py (every image its own teacher scores).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import herbens.training.setup as training_setup
from conftest import TINY_OVERRIDES, train_tiny
from herbens.bundle.load import load_bundle
from herbens.core.errors import HerbensError
from herbens.losses.distill import sparse_kl_div
from herbens.training.teacher import OnlineTeacher, teacher_bundle_dir

MIXED = ["augment.mixup=0.8", "augment.cutmix=0.0"]


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_bundle(tiny_run, tmp_path_factory):
    """The tiny run exported as a one-member bundle: the teacher."""
    from herbens.cli.main import main

    out = tmp_path_factory.mktemp("online") / "bundle"
    assert main(["export", str(tiny_run), "-o", str(out)]) == 0
    return out


def online(bundle, *extra):
    return [f"distill.teacher={bundle}", "distill.online=true", *extra]


def reference_teacher(bundle, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The slow way: the one member's species softmax on the images, summed into genus and family."""
    member = bundle.members[0]
    with torch.no_grad():
        species = torch.softmax(member.model(images)["species"].double(), dim=1).numpy()
    tax = bundle.taxonomy
    out = {"species": species}
    for level, groups in (("genus", tax.species_to_genus), ("family", tax.species_to_family)):
        summed = np.zeros((len(species), tax.num_classes(level)))
        for column, group in enumerate(groups):
            summed[:, group] += species[:, column]
        out[level] = summed
    return out


def test_the_teacher_scores_exactly_the_students_mixed_inputs(teacher_bundle, tiny_herbarium, tmp_path, monkeypatch):
    mixed, taught, student = [], [], []

    real_mixup = training_setup.build_mixup

    def recording_mixup(cfg, num_classes):
        mixup = real_mixup(cfg, num_classes)

        def mix(images, labels):
            images, soft = mixup(images, labels)
            mixed.append(images.clone())
            return images, soft
        return mix

    real_call = OnlineTeacher.__call__

    def recording_call(self, images):
        targets = real_call(self, images)
        taught.append((images.clone(), {k: v.clone() for k, v in targets.items()}))
        return targets

    real_build = training_setup.build_model

    def recording_build(cfg, taxonomy):
        model = real_build(cfg, taxonomy)
        model.register_forward_pre_hook(lambda module, args: student.append(args[0].clone()) if module.training else None)
        return model

    monkeypatch.setattr(training_setup, "build_mixup", recording_mixup)
    monkeypatch.setattr(OnlineTeacher, "__call__", recording_call)
    monkeypatch.setattr(training_setup, "build_model", recording_build)
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=student", "train.epochs=1", *MIXED,
                                                       *online(teacher_bundle, "distill.class_balanced_beta=0.9")]) == 0
    # The preflight's trial step comes first; then every training step: mixed -> teacher -> student.
    assert len(mixed) == len(taught) == len(student) >= 3
    for mix, (seen, _), trained in zip(mixed, taught, student):
        assert torch.equal(mix, seen) and torch.equal(seen, trained)
    bundle = load_bundle(teacher_bundle)
    for images, targets in taught:
        expected = reference_teacher(bundle, images)
        for level, probs in expected.items():
            np.testing.assert_allclose(np.exp(targets[f"teacher.{level}.logp"].numpy()), probs, rtol=1e-4, atol=1e-6)
            assert torch.equal(targets[f"teacher.{level}.classes"][0], torch.arange(probs.shape[1]))
            assert not targets[f"teacher.{level}.rest"].any()
    record = _history(tmp_path / "student")[-1]
    assert all(np.isfinite(record[f"loss_{level}_distill"]) for level in ("species", "genus", "family"))
    assert record["teacher_s_per_step"] > 0


def test_every_class_kept_makes_the_distillation_term_the_dense_kl(teacher_bundle):
    """What the online teacher hands the loss (all classes, no rest) against the textbook KL."""
    torch.manual_seed(0)
    q = torch.softmax(torch.randn(5, 7, dtype=torch.float64) * 3, dim=1)
    z = torch.randn(5, 7, dtype=torch.float64)
    t = 2.0
    q_t = q ** (1 / t) / (q ** (1 / t)).sum(1, keepdim=True)
    expected = (t * t) * (q_t * (q_t.log() - torch.log_softmax(z / t, dim=1))).sum(1).mean()
    got = sparse_kl_div(z.float(), torch.arange(7).expand(5, 7), q.log().float(), torch.zeros(5), t)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_alpha_zero_trains_bit_for_bit_like_no_teacher(teacher_bundle, tiny_herbarium, tmp_path, grad_accum):
    common = ["train.epochs=1", "train.deterministic=true", f"train.grad_accum={grad_accum}", *MIXED]
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=plain", *common]) == 0
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=zero", *common, *online(teacher_bundle, "distill.alpha=0")]) == 0
    assert _history(tmp_path / "zero")[-1]["teacher_s_per_step"] > 0  # the teacher did run
    plain = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)
    zero = torch.load(tmp_path / "zero" / "model.pt", weights_only=True)
    assert plain.keys() == zero.keys()
    assert [k for k in plain if not torch.equal(plain[k], zero[k])] == []


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_for_bit_an_uninterrupted_run(teacher_bundle, tiny_herbarium, tmp_path):
    from test_faults import kill_at_first_checkpoint

    from herbens.core.fileio import read_json
    from herbens.training.checkpoint import POINTER

    resume = ["train.batch_size=2", "train.checkpoint_every_steps=1", "train.deterministic=true", *MIXED,
              *online(teacher_bundle)]
    pointer = tmp_path / "killed" / "checkpoints" / POINTER
    kill_at_first_checkpoint(["demo_ce", f"data.root={tiny_herbarium}", f"output_dir={tmp_path}", "name=killed",
                              *TINY_OVERRIDES, *resume], pointer, tmp_path / "train.log")
    saved = read_json(pointer)
    assert saved["batch_in_epoch"] >= 1 and not (tmp_path / "killed" / "metrics.json").exists()
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=killed", *resume], flags=["--resume"]) == 0
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=straight", *resume]) == 0
    resumed = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    assert [k for k in resumed if not torch.equal(resumed[k], straight[k])] == []


def test_another_taxonomy_or_no_bundle_is_refused_before_training(teacher_bundle, tiny_herbarium, tmp_path, capsys):
    from herbens.data.synth import synthesize

    other = tmp_path / "other"
    synthesize(other, species=5, seed=4, long_edge=64, min_images=4, max_images=6, test_per_species=1, progress=False)
    assert train_tiny(other, tmp_path, extra=["name=s", *online(teacher_bundle)]) == 2
    assert "is not this run's" in capsys.readouterr().err
    assert not (tmp_path / "s" / "checkpoints").exists()
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=t", *online(tmp_path)]) == 2
    assert "distill.online needs a bundle" in capsys.readouterr().err
    with pytest.raises(HerbensError, match="neither bundle.json"):
        teacher_bundle_dir(tmp_path)
    assert teacher_bundle_dir(teacher_bundle.parent) == teacher_bundle.parent / "bundle"
    assert train_tiny(tiny_herbarium, tmp_path, extra=["name=u", "distill.online=true"]) == 2
    assert "distill.online=true needs distill.teacher" in capsys.readouterr().err


def test_a_member_of_another_input_size_gets_the_images_resized_and_renormalised():
    class Member:
        data_config = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "input_size": (3, 8, 6)}

    teacher = OnlineTeacher.__new__(OnlineTeacher)
    teacher.student_mean, teacher.student_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    raw = torch.rand(2, 3, 16, 12)
    student = (raw - 0.5) / 0.25
    got = teacher.member_input(Member, student)
    expected = torch.nn.functional.interpolate(raw, size=(8, 6), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    Member.data_config = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "input_size": (3, 16, 12)}
    assert teacher.member_input(Member, student) is student  # the student's own config: the same tensor


def test_mixed_images_weigh_their_distillation_terms_by_the_mix_of_their_species(taxonomy):
    from herbens.config import load_config
    from herbens.losses import build_criterion

    cfg = load_config("demo_ce", [])
    criterion = build_criterion(cfg["levels"], taxonomy, {"levels": ["species"], "alpha": 0.5, "temperature": 1.0,
                                                          "class_balanced_beta": 0.9})
    weights = criterion.distill_class_weights
    hard = torch.tensor([0, 4])
    soft = torch.zeros(2, 6)
    soft[0, 0], soft[0, 4], soft[1, 4] = 0.3, 0.7, 1.0
    torch.testing.assert_close(criterion.distillation_weights({"species": hard}), weights[hard])
    torch.testing.assert_close(criterion.distillation_weights({"species": soft}),
                               torch.stack([0.3 * weights[0] + 0.7 * weights[4], weights[4]]))
