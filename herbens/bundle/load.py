"""Open a model bundle: check every file against the manifest, then rebuild its members.

Layout of ``bundles/<name>/`` (written by :mod:`herbens.bundle.export`)::

    manifest.json          sha256 of every other file (checked at load: none missing, none unlisted)
    manifest.sha256        sha256 of manifest.json (required)
    bundle.json            members, levels, fitted ensemble values, thresholds, provenance
    taxonomy.json          class order, hierarchy and training counts (herbens Taxonomy)
    names.csv              category_id, scientific_name, authors, genus, family per species
    README.md              model card
    members/<name>/        model.safetensors, data_config.json, config.yaml [, model.onnx]
                           [, prototypes.npy, prototype_owners.npy: known species' prototypes]
    enrolled/              species.json, <member>.npy: species added by herbens enrol (optional;
                           their names.csv rows follow the trained ones; see herbens.bundle.enrolment)

Loading reads nothing outside the folder: no run directory, no metadata, no network (the
trunk is built with ``pretrained=False`` and the weights come from the safetensors file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_model

from herbens.bundle.distance import BANK, load_banks
from herbens.bundle.enrolled import load_enrolment
from herbens.bundle.scoring import class_space_of, fitted_params
from herbens.config import load_run_config
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write, file_sha256, read_json, replaceable, write_json
from herbens.data.taxonomy import Taxonomy
from herbens.data.views import Views
from herbens.ensemble.combine import ClassSpace, Params
from herbens.models.net import build_model

MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
DATA_CONFIG = "data_config.json"
RECIPE = "config.yaml"
ONNX = "model.onnx"


def write_manifest(root: Path) -> None:
    """Write ``manifest.json``: the sha256 of every other file of the bundle, sorted by path
    (export and enrolment both call it, so the same files give the same bytes), then
    ``manifest.sha256``: the manifest's own hash, which :func:`verify_manifest` requires."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST, MANIFEST_HASH))
    write_json(root / MANIFEST, {"format_version": FORMAT_VERSION,
                                 "files": {p.relative_to(root).as_posix(): file_sha256(p) for p in files}})
    with atomic_write(root / MANIFEST_HASH) as handle:
        handle.write(f"{file_sha256(root / MANIFEST)}  {MANIFEST}\n")


def verify_manifest(root: Path) -> dict[str, str]:
    """Check the manifest against its hash file, then that the bundle holds exactly the files the
    manifest lists (none missing, none unlisted), each with its recorded hash.

    Raises:
        HerbensError: naming the bundle and the first missing, unlisted or altered file.
    """
    if not (root / MANIFEST).is_file():
        raise HerbensError(f"{root}: not a herbens bundle (no {MANIFEST})")
    _check_manifest_hash(root)
    manifest = read_json(root / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise HerbensError(f"{root / MANIFEST}: no 'files' table")
    for name, expected in files.items():
        path = root / name
        if not path.is_file():
            raise HerbensError(f"bundle {root}: file {name} is missing")
        if file_sha256(path) != expected:
            raise HerbensError(f"bundle {root}: file {name} was altered (sha256 differs from the manifest)")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(files) - {MANIFEST, MANIFEST_HASH})
    if unlisted:
        raise HerbensError(f"bundle {root}: file {unlisted[0]} is not in the manifest"
                           + (f" (nor {len(unlisted) - 1} other(s))" if len(unlisted) > 1 else "")
                           + "; a bundle holds only what export or enrol wrote")
    return files


def check_export_target(out: Path, overwrite: bool) -> None:
    """Refuse an output folder export did not write (a run, a dataset...), and a bundle unless
    ``overwrite``."""
    if not replaceable(out, MANIFEST):
        raise HerbensError(f"{out} exists and is not a herbens bundle (no {MANIFEST}): export does not "
                           "replace it; choose another -o")
    if (out / MANIFEST).is_file() and not overwrite:
        raise HerbensError(f"{out} already holds a bundle; pass --overwrite to replace it")


def _check_manifest_hash(root: Path) -> None:
    hash_file = root / MANIFEST_HASH
    if not hash_file.is_file():
        raise HerbensError(f"bundle {root}: {MANIFEST_HASH} is missing, so {MANIFEST} cannot be trusted "
                           "(export the bundle again)")
    recorded = hash_file.read_text(encoding="utf-8", errors="replace").split()
    if not recorded or recorded[0] != file_sha256(root / MANIFEST):
        raise HerbensError(f"bundle {root}: file {MANIFEST} was altered (sha256 differs from {MANIFEST_HASH})")


@dataclass
class Member:
    """One model of the bundle, ready to predict."""

    name: str
    model: object                 # HierarchicalNet in eval mode
    data_config: dict             # timm data config: input_size, mean, std, interpolation, crop_pct
    tta: Views                    # test-time views and how they are averaged (logit | prob)
    precision: str                # the run's mixed precision (used on CUDA only)
    levels: tuple[str, ...]
    onnx_path: Path | None

    @property
    def views(self) -> list[str]:
        return self.tta.names

    @property
    def tta_space(self) -> str:
        return self.tta.space


@dataclass
class Bundle:
    """A loaded bundle: its members and everything needed to turn their logits into names."""

    path: Path
    record: dict
    taxonomy: Taxonomy
    names: pd.DataFrame
    members: list[Member]
    params: Params
    space: ClassSpace
    thresholds: dict
    ood_score: str
    enrolment: object = None      # herbens.bundle.enrolled.Enrolment when species are enrolled
    ood_banks: list | None = None  # per member training embeddings of the knn OOD score (herbens.bundle.distance)

    def level_names(self, level: str) -> list[str]:
        """Genus or family names per column (enrolled species' new ones after the trained)."""
        source = self.enrolment if self.enrolment is not None else self.taxonomy
        return {"genus": source.genus_names, "family": source.family_names}[level]


def thresholds_from_json(values: dict) -> dict:
    """Stored thresholds (None: a level never reached its target precision) as floats."""
    return {k: (float("inf") if v is None else float(v)) for k, v in values.items()}


def load_bundle(path: str | Path, device: str = "cpu") -> Bundle:
    """Verify and load a bundle; members are moved to ``device`` in eval mode.

    Raises:
        HerbensError: naming the missing or altered file, or a malformed record.
    """


    root = Path(path)
    manifest = verify_manifest(root)
    record = read_json(root / "bundle.json")
    if record.get("format_version") != FORMAT_VERSION:
        raise HerbensError(f"{root / 'bundle.json'}: unsupported bundle format {record.get('format_version')!r}")
    taxonomy = Taxonomy.load(root / "taxonomy.json")
    names = pd.read_csv(root / "names.csv", keep_default_na=False)
    try:
        enrolment = load_enrolment(root, record, taxonomy, record["members"], manifest)
        enrolled = [] if enrolment is None else [e["category_id"] for e in enrolment.species]
        if names["category_id"].tolist() != taxonomy.category_ids.tolist() + enrolled:
            raise HerbensError(f"{root / 'names.csv'}: category_ids do not match taxonomy.json and the enrolled species")
        members = [_load_member(root / "members" / name, name, taxonomy, device) for name in record["members"]]
        params = fitted_params(record["ensemble"], len(members))
        thresholds, ood_score = thresholds_from_json(record["thresholds"]["thresholds"]), record["thresholds"]["ood_score"]
    except KeyError as exc:
        raise HerbensError(f"{root}: bundle.json or a member's {DATA_CONFIG} lacks the key {exc}") from None
    banks = load_banks(root, record["members"])
    if ood_score == "knn" and banks is None:
        raise HerbensError(f"bundle {root}: its OOD score is knn but no member has {BANK}")
    return Bundle(root, record, taxonomy, names, members, params, class_space_of(taxonomy),
                  thresholds, ood_score, enrolment, banks)


def _load_member(folder: Path, name: str, taxonomy: Taxonomy, device: str) -> Member:



    cfg = load_run_config(folder)
    # No download, no local pretrained file: every weight comes from the bundle.
    model = build_model({**cfg, "model": {**cfg["model"], "pretrained": False, "pretrained_file": None}}, taxonomy)
    try:
        load_model(model, str(folder / WEIGHTS), strict=True)
    except (RuntimeError, OSError) as exc:
        raise HerbensError(f"{folder / WEIGHTS}: weights do not fit the recipe's model: {exc}") from None
    model.to(torch.device(device)).eval()
    data = read_json(folder / DATA_CONFIG)
    data_config = {**data["data_config"], "input_size": tuple(data["data_config"]["input_size"]),
                   "mean": tuple(data["data_config"]["mean"]), "std": tuple(data["data_config"]["std"])}
    onnx_path = folder / ONNX
    try:
        tta = Views.parse(data["views"], data["tta_space"])
    except HerbensError as exc:
        raise HerbensError(f"{folder / DATA_CONFIG}: {exc}") from None
    return Member(name, model, data_config, tta, data["precision"],
                  tuple(data["levels"]), onnx_path if onnx_path.is_file() else None)

