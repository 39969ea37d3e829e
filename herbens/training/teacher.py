"""The consistent teacher (Beyer et al. 2022): an ensemble scoring the student's own batch.

With ``distill.online``, each training step hands the teacher exactly the images the student
is about to see, after its augmentation and Mixup/CutMix. Every member of the teacher's bundle
(``herbens export``, or the ``bundle/`` of a ``herbens teach`` folder) predicts them under no
grad and the run's autocast, and the members are combined with the ensemble's fitted values by
the function ``herbens predict`` uses (:func:`herbens.bundle.scoring.combine_members`). The
teacher's probabilities of every class at each distilled level become the batch's
``teacher.<level>.*`` targets, in the form the sparse targets have (all classes kept, nothing
left over), so the distillation term (:func:`herbens.losses.distill.sparse_kl_div`) is the
exact KL. The offline form (:mod:`herbens.stores.targets`) stores one target per image from
the teacher's own test-time views instead.

The teacher is a function of the batch only: it draws no random numbers and keeps no state
between steps, so gradient accumulation, several processes (each scores its own batch) and a
resumed run see the same targets for the same images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from herbens.bundle.load import load_bundle
from herbens.bundle.scoring import combine_members, needed_levels
from herbens.core.errors import HerbensError
from herbens.stores.targets import LOG_TINY


def teacher_bundle_dir(path: str | Path) -> Path:
    """The bundle of ``distill.teacher``: the folder itself or its ``bundle/`` (herbens teach)."""
    path = Path(path)
    for candidate in (path, path / "bundle"):
        if (candidate / "bundle.json").is_file():
            return candidate
    raise HerbensError(f"distill.teacher {path}: distill.online needs a bundle (herbens export ENSEMBLE.json "
                       "-o DIR) or a herbens teach folder holding bundle/, and neither bundle.json nor "
                       "bundle/bundle.json is there")


class OnlineTeacher:
    """Callable: ``teacher(images) -> {"teacher.<level>.classes" | ".logp" | ".rest": tensor}``.

    Args:
        bundle: the loaded teacher (members on the run's device, in eval mode).
        levels: the levels to distil.
        student_data_config: the student's timm data config; a member with another mean, std
            or input size gets the same images re-normalised and resized to its own.
        autocast: the student's autocast context (``accelerator.autocast``).
    Attributes:
        seconds, steps: the time spent in the teacher and the batches it scored (its cost).
    """

    def __init__(self, bundle, levels, student_data_config: dict, autocast):
        self.bundle = bundle
        self.levels = tuple(levels)
        self.student_mean, self.student_std = _stats(student_data_config)
        self.autocast = autocast
        self.seconds, self.steps = 0.0, 0

    def member_input(self, member, images: torch.Tensor) -> torch.Tensor:
        """The student's normalised images as ``member`` expects them (the same tensor when the
        member shares the student's mean, std and input size)."""
        mean, std = _stats(member.data_config)
        size = tuple(member.data_config["input_size"][1:])
        if (mean, std) == (self.student_mean, self.student_std) and tuple(images.shape[-2:]) == size:
            return images
        raw = images * _column(self.student_std, images) + _column(self.student_mean, images)
        if tuple(raw.shape[-2:]) != size:
            raw = F.interpolate(raw, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (raw - _column(mean, raw)) / _column(std, raw)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        levels = needed_levels(self.bundle.params)
        logits = []
        for member in self.bundle.members:
            with self.autocast():
                outputs = member.model(self.member_input(member, images))
            logits.append({level: outputs[level].float().cpu().numpy() for level in levels})
        probs = combine_members(logits, self.bundle.params, self.bundle.space)
        targets = {}
        for level in self.levels:
            # Zero-probability classes get the targets store's floor: log 0 would make 0 * log 0 a NaN.
            with np.errstate(divide="ignore"):
                logp = np.maximum(np.log(probs.level(level), dtype=np.float32), LOG_TINY)
            logp = torch.from_numpy(logp).to(images.device)
            targets[f"teacher.{level}.logp"] = logp
            # Every class, in order: an expanded view, no [B, C] index array is stored.
            targets[f"teacher.{level}.classes"] = torch.arange(logp.shape[1], device=images.device).expand_as(logp)
            targets[f"teacher.{level}.rest"] = logp.new_zeros(len(logp))
        self.seconds += time.perf_counter() - start
        self.steps += 1
        return targets

    def cost(self) -> dict[str, float]:
        """Seconds per scored batch since the last call (then starts counting again)."""
        out = {"teacher_s_per_step": self.seconds / max(self.steps, 1)}
        self.seconds, self.steps = 0.0, 0
        return out


def _stats(data_config: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return tuple(float(v) for v in data_config["mean"]), tuple(float(v) for v in data_config["std"])


def _column(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def online_teacher(distill_cfg: dict, taxonomy, levels, student_data_config: dict, accelerator):
    """The run's :class:`OnlineTeacher` (None unless ``distill.online``), checked before training.

    Raises:
        HerbensError: the teacher is no bundle, or its taxonomy is not the run's.
    """
    if not (distill_cfg.get("teacher") and distill_cfg.get("online")):
        return None
    root = teacher_bundle_dir(distill_cfg["teacher"])
    bundle = load_bundle(root, device=str(accelerator.device))
    if bundle.taxonomy.hash != taxonomy.hash:
        raise HerbensError(f"distill.teacher {root}: the bundle's taxonomy (hash {bundle.taxonomy.hash[:12]}) is "
                           f"not this run's ({taxonomy.hash[:12]}); the teacher must be trained on the same "
                           "species list (same data.root)")
    for member in bundle.members:
        member.model.requires_grad_(False)
    return OnlineTeacher(bundle, levels, student_data_config, accelerator.autocast)
