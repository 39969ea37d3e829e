"""The recipe schema: every key's type, range or allowed names, default and meaning, once.

pydantic 2 models with ``extra="forbid"``: an unknown key is an error, a value of the wrong
type or out of range is an error naming its key path, and every key a recipe leaves out gets
its default. ``recipes/_base.yaml`` is rendered from these models (:mod:`herbens.config.basefile`)
and a test keeps the two identical. Components (heads, losses, necks, samplers) are nodes
resolved by :mod:`herbens.config.components` from their constructors' own signatures.

A field marked ``resumable`` (``json_schema_extra``) may differ between a run's recorded
config and the recipe it is resumed with (:func:`herbens.config.rules.check_resume`); a
section marked so is resumable as a whole.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal

from accelerate.utils import LoggerType
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from timm.optim import list_optimizers

from herbens.config.components import (
    node_error,
    resolve_losses,
    resolve_node,
    suggestion,
)
from herbens.core.errors import HerbensError
from herbens.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MIN_IMAGE_SIDE
from herbens.data.metadata import FORMATS
from herbens.data.views import parse_view
from herbens.models.net import backbone_error
from herbens.optim.schedules import SCHEDULERS

RESUMABLE = {"resumable": True}


def section_class(annotation) -> type[BaseModel] | None:
    """The model class of a section field (``Level | None`` -> ``Level``), else None."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


class Section(BaseModel):
    """A block of keys: unknown keys refused, defaults validated like given values."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def _node(kind: str):
    return BeforeValidator(lambda value: resolve_node(kind, value))


def _pair(value):
    # `size: 224` means a square; everything else must already be a [a, b] list.
    return [value, value] if isinstance(value, int) and not isinstance(value, bool) else value


def _no_repeats(value: list, what: str) -> list:
    if len(set(value)) != len(value):
        raise ValueError(f"names a {what} twice: {value!r}")
    return value


Pair = Annotated[list[float], Field(min_length=2, max_length=2)]
Node = dict[str, Any]


class Data(Section):
    root: str = Field("data/demo", description="Kaggle-format dataset folder (train_metadata.json, "
                                                "train_images/, test_*)", json_schema_extra=RESUMABLE)
    format: Literal[FORMATS] = Field("auto", description="metadata format: " + " | ".join(FORMATS))
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of each species' images held out "
                                                             "for validation")
    val_min_images: int = Field(2, ge=1, description="species with fewer images than this keep all of "
                                                     "them in training")
    split_seed: int = Field(0, ge=0, description="seeds the validation split; keep it equal across runs "
                                                 "to be ensembled")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per training process",
                             json_schema_extra=RESUMABLE)
    bad_images: Literal["error", "skip"] = Field("error", description="unreadable training images: "
                                                 "error (stop) | skip (warn, count, replace)")
    limit_train: int | None = Field(None, ge=1, description="use only the first N training images "
                                                            "(smoke tests)")
    max_image_pixels: int | None = Field(DEFAULT_MAX_IMAGE_PIXELS, ge=1, description=(
        "images with more pixels are refused from their header before decoding (decompression "
        "bombs); null: no limit"))
    min_image_size: int = Field(DEFAULT_MIN_IMAGE_SIDE, ge=0, description=(
        "images with a side shorter than this (px) are refused from their header as too small to "
        "be a specimen image, like unreadable ones (training, inference, predict); 0: no minimum"))


class Model(Section):
    backbone: str = Field("test_efficientnet", description="any timm model name, with or without a "
                                                           "pretrained tag (timm.list_models())")
    pretrained: bool = Field(False, description="true: ImageNet weights from the hub (online) or from "
                                                "pretrained_file")
    pretrained_file: str | None = Field(None, description="local .pth/.safetensors weights for offline "
                                                          "pretrained: true")
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="stochastic depth in the trunk")
    drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout before the heads")
    neck: Annotated[Node, _node("neck")] = Field(
        "none", description="none | linear | bnneck, e.g. {name: bnneck, embedding_dim: 512}")
    channels_last: bool = Field(False, description="NHWC memory format (faster on recent GPUs)")
    grad_checkpointing: bool = Field(False, description="recompute trunk activations in backward to "
                                                        "save memory")
    compile: bool | Literal["trunk"] = Field(False, description=(
        "torch.compile: false | true (the whole model) | trunk (each trunk block, in place: compiles "
        "in a fraction of the time); the compile time goes to metrics.json"))
    fused_attention: bool | None = Field(None, description="SwinV2 window attention through fused SDPA: "
                                                           "null (on for SwinV2 trunks) | true | false")
    model_kwargs: dict[str, Any] = Field({}, description="extra timm.create_model keywords, e.g. "
                                                         "{img_size: 256} for a ViT at 256 px")
    clip_embed_dim: int | None = Field(None, ge=1, description=(
        "CLIP image towers (vit_*_clip_*): keep the image projection of this size as the trunk's output "
        "(512 ViT-B/16, 768 ViT-L/14); null: pooled features, no projection"))
    open_clip_model: str | None = Field(None, min_length=1, description=(
        "open_clip architecture of pretrained_file (ViT-B-16 | ViT-L-14 | local-dir:/folder): builds the "
        "text tower for text_heads and herbens zeroshot"))

    @field_validator("open_clip_model")
    @classmethod
    def _offline_open_clip(cls, name: str | None) -> str | None:
        if name is not None and name.startswith("hf-hub:"):
            raise ValueError(f"{name!r}: hub names download; download the repository once and pass "
                             f"local-dir:/its/folder instead")
        return name

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:

        error = backbone_error(name)
        if error:
            raise ValueError(error)
        return name


class Level(Section):
    head: Annotated[Node, _node("head")] = Field(
        "linear", description="linear | cosine | subcenter_arcface, e.g. "
                              "{name: subcenter_arcface, margin: 28.6, scale: 30, sub_centers: 3}")
    loss: Annotated[list[Node], BeforeValidator(resolve_losses)] = Field(
        {"name": "ce", "label_smoothing": 0.1},
        description="ce | class_balanced | seesaw | logit_adjusted | subcenter_arcface | ams, e.g. "
                    "{name: seesaw, p: 0.8}, or a list of them, each with a weight")
    weight: float = Field(1.0, ge=0, description="this level's share of the total loss")


class Levels(Section):
    species: Level = Field({}, description="the species head and its losses (required: "
                                           "submissions predict species)")
    genus: Level | None = Field({"weight": 0.5}, description="the genus head (null: none)")
    family: Level | None = Field({"weight": 0.25}, description="the family head (null: none)")

    @field_validator("species", mode="before")
    @classmethod
    def _species_required(cls, value):
        if value is None:
            raise ValueError("the species level is required (submissions predict species)")
        return value


class TextHeads(Section):
    levels: list[Literal["species", "genus", "family"]] = Field([], description=(
        "e.g. [species, genus, family]: cosine heads set to the class-name embeddings, scale "
        "exp(logit_scale) (replacing the head's own scale)"))
    template: str = Field("a photo of {name}.", min_length=1, description=(
        "str.format prompt per class: {name} (scientific name / genus / family), {genus} and {family} "
        "(the names above it); BioCLIP's taxonomic style: 'a photo of Plantae Tracheophyta {family} {name}.'"))
    batch_size: int = Field(256, ge=1, description="prompts per text-tower batch", json_schema_extra=RESUMABLE)

    @field_validator("levels")
    @classmethod
    def _unique(cls, value: list) -> list:
        return _no_repeats(value, "level")


class Input(Section):
    size: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=2, max_length=2),
                    BeforeValidator(_pair)] = Field(
        [224, 224], description="training and inference input [height, width]")
    crop_pct: float | None = Field(None, gt=0, description="eval resize = size / crop_pct before the "
                                                           "centre crop; null: the model's")


class Augment(Section):
    scale: Pair = Field([0.35, 1.0], description="RandomResizedCrop area range [min, max] in [0, 1]")
    ratio: Pair = Field([0.75, 1.3333], description="RandomResizedCrop aspect (width / height) range "
                                                    "[min, max]")
    hflip: float = Field(0.5, ge=0, le=1, description="horizontal flip probability")
    vflip: float = Field(0.0, ge=0, le=1, description="vertical flip probability")
    rotation: float = Field(0, ge=0, le=180, description="random rotation in degrees (+-)")
    auto_augment: str | None = Field(None, description="timm policy string, e.g. rand-m9-mstd0.5-inc1 "
                                                       "or original")
    color_jitter: float = Field(0.0, ge=0, description="colour jitter strength")
    re_prob: float = Field(0.0, ge=0, le=1, description="random erasing probability")
    mixup: float = Field(0.0, ge=0, description="mixup alpha (0 = off)")
    cutmix: float = Field(0.0, ge=0, description="cutmix alpha (0 = off)")

    @field_validator("scale")
    @classmethod
    def _scale(cls, value: list) -> list:
        if not 0 <= value[0] <= value[1] <= 1:
            raise ValueError(f"must be [min, max] with 0 <= min <= max <= 1, got {value!r}")
        return value

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, value: list) -> list:
        if not 0 < value[0] <= value[1]:
            raise ValueError(f"must be [min, max] with 0 < min <= max, got {value!r}")
        return value


class Optimizer(Section):
    name: str = Field("adamw", description="any timm optimizer name: adamw | sgd | sgdw | lamb | ...")
    lr: float = Field(1.0e-3, gt=0, description="peak learning rate at lr_base_batch images per step")
    lr_base_batch: int | None = Field(None, ge=1, description="scale lr linearly by global_batch / "
                                                              "lr_base_batch (null: no scaling)")
    weight_decay: float = Field(0.05, ge=0, description="decoupled weight decay (not applied to norms "
                                                        "and biases)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd family (sgd, sgdw, sgdp, momentum, "
                                                         "nesterov): momentum")
    nesterov: bool | None = Field(None, description="sgd family: Nesterov on/off; null keeps timm's "
                                                    "default (on for sgd/sgdw)")
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise LR decay on the trunk "
                                                                    "(e.g. 0.75); heads at full LR")

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:

        known = list_optimizers()
        if name.lower() not in known:
            raise ValueError(f"unknown timm optimizer {name!r}{suggestion(name.lower(), known)}")
        return name


def _schedulers():

    return SCHEDULERS


class Scheduler(Section):
    name: str = Field("cosine", description="cosine | onecycle | none")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up length (cosine)")
    warmup_lr: float = Field(1.0e-6, ge=0, description="learning rate at the start of warm-up")
    min_lr: float = Field(1.0e-6, ge=0, description="final learning rate")
    pct_start: float = Field(0.2, gt=0, lt=1, description="onecycle: share of steps rising to the peak")
    div_factor: float = Field(100.0, gt=0, description="onecycle: start lr = peak / div_factor")

    @field_validator("name")
    @classmethod
    def _known_scheduler(cls, name: str) -> str:
        if name not in _schedulers():
            raise ValueError(f"unknown scheduler {name!r}{suggestion(name, _schedulers())}; "
                             f"known: {', '.join(_schedulers())}")
        return name


class Train(Section):
    epochs: int = Field(10, ge=1, description="passes over the training split",
                        json_schema_extra=RESUMABLE)
    batch_size: int = Field(32, ge=1, description="per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    precision: Literal["no", "fp16", "bf16"] = Field("no", description="no | fp16 | bf16 (Accelerate "
                                                                       "mixed precision)")
    clip_grad: float | None = Field(None, gt=0, description="max gradient norm (null: no clipping)")
    ema: bool = Field(False, description="keep an exponential moving average of the weights")
    ema_decay: float = Field(0.9998, gt=0, lt=1, description="EMA decay per optimizer step")
    checkpoint_every_steps: int = Field(0, ge=0, description="also checkpoint every N optimizer steps "
                                                             "(0: only each epoch)",
                                        json_schema_extra=RESUMABLE)
    keep_checkpoints: int = Field(2, ge=1, description="how many checkpoint folders to keep",
                                  json_schema_extra=RESUMABLE)
    log_every: int = Field(10, ge=1, description="steps between progress-bar/log updates",
                           json_schema_extra=RESUMABLE)
    deterministic: bool = Field(False, description="torch deterministic algorithms (exact resume checks)")
    freeze_trunk_epochs: int = Field(0, ge=0, description=(
        "linear probe first: train only neck and heads (trunk frozen, eval mode) for N epochs"))
    unfreeze_warmup_epochs: float = Field(0.0, ge=0, description=(
        "then fine-tune everything: a fresh warm-up from scheduler.warmup_lr, then the schedule over the "
        "remaining epochs"))
    trackers: list[str] = Field([], description="Accelerate trackers fed the history.jsonl numbers each epoch "
                                                "(written to <run>/trackers/), e.g. [tensorboard]; also wandb, "
                                                "mlflow, ... when installed", json_schema_extra=RESUMABLE)

    @field_validator("precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads an unquoted `no` (train.precision=no) as false.
        return "no" if value is False else value

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, names: list) -> list:
        # Accelerate's list of names imports no tracker package; whether each named one is
        # installed is checked when the run starts (herbens.training.setup.tracker_names).

        known = [name for name in LoggerType.list() if name != "all"]
        for i, name in enumerate(names):
            if name not in known:
                raise node_error(f"[{i}]", f"unknown tracker {name!r}{suggestion(name, known)}; "
                                           f"known: {', '.join(known)}")
        return names


class Infer(Section):
    batch_size: int = Field(64, ge=1, description="images per prediction batch (each expands to its "
                                                  "test-time views)")
    splits: list[Literal["val", "test"]] = Field(["val", "test"], description="logits written at the "
                                                                               "end of training")
    tta: list[str] = Field(["center", "hflip"], min_length=1, description=(
        "test-time views averaged per run: center hflip vflip full letterbox fivecrop tencrop "
        "rrcN, each optionally @SCALE (e.g. tencrop@1.14)"))
    tta_space: Literal["logit", "prob"] = Field("logit", description="average views' logits (logit) or "
                                                                     "probabilities (prob)")
    keep_views: bool = Field(False, description="also store per-view logits (<level>.views.npy) for "
                                                "analysis and vote mode")
    embeddings: bool = Field(False, description="also store L2-normalised fp16 embeddings of train/val/test "
                                                "images (embeddings/<split>/) for herbens retrieval")
    bad_images: Literal["prior", "fail"] = Field("prior", description=(
        "val/test images unreadable under data.bad_images=skip: prior (their rows get the training "
        "log-prior, recorded as unreadable in the store) | fail (no logits, every such image listed)"))

    @field_validator("splits")
    @classmethod
    def _unique(cls, value: list) -> list:
        return _no_repeats(value, "split")

    @field_validator("tta")
    @classmethod
    def _views(cls, names: list) -> list:
        for i, name in enumerate(names):
            try:
                parse_view(name)
            except HerbensError as exc:
                raise node_error(f"[{i}]", str(exc)) from None
        return names


class Distill(Section):
    teacher: str | None = Field(None, description="folder holding targets/train/ written by herbens teach; "
                                                  "with online: a bundle (herbens export) or a herbens teach "
                                                  "folder (its bundle/) (null: no distillation)")
    online: bool = Field(False, description="the teacher scores each training batch as the student sees it "
                                            "(augmented and mixed; Beyer et al. 2022), instead of stored targets "
                                            "of its own test-time views")
    temperature: float = Field(1.0, gt=0, description="softens teacher and student alike; the KL term is "
                                                      "scaled by T^2")
    alpha: float = Field(0.5, ge=0, le=1, description="share of the distillation term in each distilled "
                                                      "level's loss (the rest: the level's own loss)")
    class_balanced_beta: float | None = Field(
        None, ge=0, lt=1, description="weight each image's distillation term by the class-balanced weight "
                                      "(effective number with this beta, as loss class_balanced) of its "
                                      "species; null: unweighted")


class Recipe(Section):
    """The whole resolved recipe."""

    name: str | None = Field(None, description="run name; default: the recipe file's stem. Output goes "
                                               "to <output_dir>/<name>/", json_schema_extra=RESUMABLE)
    output_dir: str = Field("runs", description="parent folder of run directories",
                            json_schema_extra=RESUMABLE)
    seed: int = Field(42, ge=0, description="seeds python, numpy, torch, augmentation and the samplers "
                                            "(not the split)")
    data: Data = Field({}, description="where the images are and how they are split")
    model: Model = Field({}, description="the trunk and the neck between it and the heads")
    levels: Levels = Field({}, description="one entry per taxonomic level: its head, its loss (or "
                                           "weighted losses) and its weight; null drops a level")
    text_heads: TextHeads = Field({}, description="CLIP-family trunks: heads that start from the text tower's "
                                                  "embeddings of each class's name")
    input: Input = Field({}, description="the model's input size")
    augment: Augment = Field({}, description="training augmentation")
    sampler: Annotated[Node, _node("sampler")] = Field(
        "random", description="random | class_balanced | sqrt | power | pk, e.g. "
                              "{name: pk, classes_per_batch: 16, images_per_class: 4}")
    optimizer: Optimizer = Field({}, description="timm optimizer")
    scheduler: Scheduler = Field({}, description="learning-rate schedule, stepped every update")
    train: Train = Field({}, description="the training loop")
    infer: Infer = Field({}, description="logits written at the end of training and by herbens infer",
                         json_schema_extra=RESUMABLE)
    distill: Distill = Field({}, description="knowledge distillation (Hinton et al. 2015) from an ensemble's "
                                             "sparse soft targets (herbens teach) or, online, from the "
                                             "ensemble's bundle scoring each batch")
