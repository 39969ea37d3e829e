"""Few-shot enrolment: species added to a bundle from a few images, as prototypes, no retraining.

Design (the least stored state that keeps :func:`herbens.retrieval.prototypes.fuse_with_head`
correct, the fusion that ``bench/fewshot_eval.py`` evaluates):

- At export (:mod:`herbens.bundle.prototype_export`), when every member run has stored
  embeddings (``herbens infer RUN --embeddings``: ``embeddings/train`` and ``embeddings/val``), each member folder gets the known species'
  prototypes (``prototypes.npy`` ``[P, D]`` float32, ``prototype_owners.npy`` ``[P]``; class
  means of the member's training embeddings, :func:`~herbens.retrieval.fit.fit_prototypes`),
  and ``bundle.json`` an ``enrolment`` record: each member's prototype temperature (fitted on its
  validation embeddings by log-loss) and the head temperature of the bundle's combined species
  scores (fitted on the validation rows by log-loss, ``HEAD_TEMPERATURES``); both cross-fitted,
  their log-loss in sample and out of fold printed and kept in the record's ``fit``. Otherwise the
  record is ``null`` and enrolment is refused with the command that fixes it. The known
  prototypes are needed: fusion gives the enrolled species the share of the prototype softmax
  that the known species' prototypes leave them.
- ``herbens enrol`` writes ``enrolled/species.json`` (one entry per enrolled species: category_id,
  names, genus, family, images) and ``enrolled/<member>.npy`` (one prototype row per enrolled
  species, the normalised mean of its images' embeddings in that member), appends their rows to
  ``names.csv`` and rewrites the manifest; ``taxonomy.json`` (the trained class space and its
  hash, which the ensemble combination needs) is never touched. Unenrolling the last species
  removes ``enrolled/`` and the appended rows, so the bundle is byte for byte what export wrote.
- Prediction with enrolled species: the members' head logits are combined exactly as without
  enrolment (``scoring.combine_members``: ``[n, K]`` scores); each member scores its own
  embedding of the image against its known + enrolled prototypes (cosine / its temperature) and
  the members' prototype log-probabilities are averaged (equal weights: every member embeds
  the image anyway); the average is fused with the combined scores divided by the head
  temperature (``fuse_with_head``): ``[n, K + E]`` log-probabilities, enrolled species as columns
  after the trained ones, genus/family probabilities summed within (new genera and families as
  columns after the trained ones). With nothing enrolled, prediction is unchanged bit for bit
  (this module is not called).
- The back-off thresholds are the export's (fitted without enrolled species) and apply to the
  fused probabilities; the energy OOD score has no meaning on fused log-probabilities, so
  enrolment needs a bundle exported with ``--ood-score msp`` (the default) or ``knn``. The
  enrolled images' embeddings join the members' OOD banks (:mod:`herbens.bundle.distance`).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from herbens.bundle.distance import drop_from_banks, extend_banks
from herbens.bundle.enrolled import ENROLLED, NAME_COLUMNS, SPECIES_FILE, read_species
from herbens.bundle.inputs import collect_inputs
from herbens.bundle.load import load_bundle, write_manifest
from herbens.bundle.predict import member_logits
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_dir, atomic_write, load_npy, one_writer, save_npy, write_json
from herbens.retrieval.prototypes import species_prototype


# ----------------------------------------------------------------------------------------
# Enrol and unenrol
# ----------------------------------------------------------------------------------------
def _names_rows(species: list[dict]) -> str:
    """The ``names.csv`` lines of enrolled species, quoted as pandas writes the trained ones."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for entry in species:
        writer.writerow([entry[c] for c in NAME_COLUMNS])
    return buffer.getvalue()


def _trained_names_text(root: Path, species: list[dict]) -> str:
    """``names.csv`` without the enrolled species' rows (which export never wrote)."""
    with open(root / "names.csv", newline="") as handle:
        text = handle.read()
    tail = _names_rows(species)
    if not text.endswith(tail):
        raise HerbensError(f"{root / 'names.csv'}: its last rows are not the enrolled species of "
                           f"{ENROLLED}/{SPECIES_FILE}")
    return text[:len(text) - len(tail)]


@contextmanager
def _staged(root: Path):
    """A copy of the bundle (hard links where possible) that replaces it atomically on success."""
    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with atomic_dir(root) as tmp:
        shutil.copytree(root, tmp, copy_function=link_or_copy, dirs_exist_ok=True)
        yield tmp


def _write_species(root: Path, tmp: Path, old: list[dict], new: list[dict], vectors: dict[str, np.ndarray]) -> None:
    """Write the enrolled state ``new`` (prototype rows ``vectors`` per member) into the staged copy."""

    names = _trained_names_text(root, old) + _names_rows(new)
    with atomic_write(tmp / "names.csv", newline="") as handle:
        handle.write(names)
    if new:
        (tmp / ENROLLED).mkdir(exist_ok=True)
        write_json(tmp / ENROLLED / SPECIES_FILE, {"format_version": 1, "species": new})
        for member, rows in vectors.items():
            save_npy(tmp / ENROLLED / f"{member}.npy", rows.astype(np.float32))
    else:
        shutil.rmtree(tmp / ENROLLED)
    write_manifest(tmp)
    load_bundle(tmp)  # refuse to publish a bundle that does not load


def _taxon_of(bundle, species: list[dict], genus: str, family: str | None) -> tuple[str, str]:
    """Genus and family of a new species: an existing genus keeps its family; a new genus needs one."""
    tax = bundle.taxonomy
    family_of_genus = {tax.genus_names[g]: tax.family_names[f]
                       for g, f in zip(tax.species_to_genus, tax.species_to_family)}
    family_of_genus.update({e["genus"]: e["family"] for e in species})
    if genus in family_of_genus:
        if family is not None and family != family_of_genus[genus]:
            raise HerbensError(f"bundle {bundle.path}: genus {genus} belongs to family {family_of_genus[genus]}, "
                               f"not {family}")
        return genus, family_of_genus[genus]
    if not family:
        raise HerbensError(f"bundle {bundle.path}: genus {genus} is new to it; give its family with --family")
    return genus, family


def _checked_text(value: str, what: str) -> str:
    value = (value or "").strip()
    if any(c in value for c in "\r\n"):
        raise HerbensError(f"{what} must be one line, got {value!r}")
    return value


def _new_identity(bundle, name: str, category_id: int | None) -> tuple[str, int]:
    """The checked name and category_id of a species to enrol into ``bundle`` (which must be
    able to enrol): neither may be taken; the id defaults to one more than the largest."""
    root = bundle.path
    if not bundle.record.get("enrolment"):
        raise HerbensError(f"bundle {root}: exported without prototypes, it cannot enrol species (herbens infer "
                           "RUN --embeddings for every member run, then herbens export again)")
    if bundle.ood_score == "energy":
        raise HerbensError(f"bundle {root}: enrolment needs the msp or knn OOD score (energy is "
                           "meaningless on fused probabilities); export with --ood-score msp or knn")
    name = _checked_text(name, "--name")
    if not name:
        raise HerbensError("--name must not be empty")
    taken = dict(zip(bundle.names.scientific_name, bundle.names.category_id))
    if name in taken:
        raise HerbensError(f"bundle {root}: {name} already names category_id {taken[name]}")
    ids = set(int(c) for c in bundle.names.category_id)
    if category_id is None:
        return name, max(ids) + 1
    if int(category_id) in ids:
        raise HerbensError(f"bundle {root}: category_id {category_id} is already taken")
    return name, int(category_id)


@one_writer
def enrol_species(bundle_path, images, name: str, *, authors: str = "", genus: str | None = None,
                  family: str | None = None, category_id: int | None = None, device: str = "cpu",
                  batch_size: int = 32, log: Callable[[str], None] = print) -> dict:
    """Add a species to a bundle from one or a few images; returns its entry.

    Args:
        bundle_path: bundle folder (rewritten atomically).
        images: an image, a folder (recursive) or a list file, as ``herbens predict`` reads.
        name: scientific name (refused when the bundle already has it).
        authors: its authors, shown in predictions.
        genus: default the first word of ``name``; an existing genus keeps its family.
        family: needed when the genus is new to the bundle.
        category_id: default one more than the largest in the bundle (refused when taken).

    Raises:
        HerbensError: a bundle exported without prototypes, a name or id it already has, a new
            genus without family, an unreadable image.
    """

    bundle = load_bundle(bundle_path, device=device)
    root = bundle.path
    name, category_id = _new_identity(bundle, name, category_id)
    species = read_species(root)
    genus, family = _taxon_of(bundle, species, _checked_text(genus or name.split()[0], "--genus"),
                              _checked_text(family, "--family") or None)
    paths, _ = collect_inputs(images)
    vectors, shots = {}, {}
    for member in bundle.members:
        out, errors = member_logits(member, paths, {}, batch_size, device, 0, lambda _: None, embeddings=True)
        if errors:
            first = min(errors)
            raise HerbensError(f"cannot enrol from {paths[first]}: {errors[first]}")
        vectors[member.name], shots[member.name] = species_prototype(out["embedding"]), out["embedding"]
    entry = {"category_id": int(category_id), "scientific_name": name, "authors": _checked_text(authors, "--authors"),
             "genus": genus, "family": family, "images": [Path(p).name for p in paths]}
    stored = {m.name: load_npy(root / ENROLLED / f"{m.name}.npy") if species else None for m in bundle.members}
    with _staged(root) as tmp:
        if bundle.ood_banks is not None:
            extend_banks(root, tmp, shots, int(category_id))  # before _write_species writes the manifest
        _write_species(root, tmp, species, species + [entry],
                       {m: v if stored[m] is None else np.concatenate([stored[m], v]) for m, v in vectors.items()})
    log(f"enrolled {name} (category_id {category_id}, genus {genus}, family {family}) into {root} from "
        f"{len(paths)} image(s); {len(species) + 1} enrolled species")
    return entry


@one_writer
def unenrol_species(bundle_path, *, name: str | None = None, category_id: int | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """Remove an enrolled species (by name or category_id); returns its entry.

    Raises:
        HerbensError: naming the species when it is not enrolled (a trained species cannot be
            removed), and listing the enrolled ones.
    """

    if (name is None) == (category_id is None):
        raise HerbensError("unenrol: give exactly one of --name and --category-id")
    bundle = load_bundle(bundle_path)
    root = bundle.path
    species = read_species(root)
    key, value = ("scientific_name", name.strip()) if name is not None else ("category_id", int(category_id))
    found = [j for j, e in enumerate(species) if e[key] == value]
    if not found:
        trained = value in set(bundle.names[key][:bundle.taxonomy.num_classes("species")])
        enrolled = ", ".join(f"{e['scientific_name']} ({e['category_id']})" for e in species) or "none"
        raise HerbensError(f"bundle {root}: {key} {value!r} is "
                           + ("a trained species, which only retraining removes" if trained else "not enrolled")
                           + f"; enrolled species: {enrolled}")
    j = found[0]
    rest = species[:j] + species[j + 1:]
    vectors = {m.name: np.delete(load_npy(root / ENROLLED / f"{m.name}.npy"), j, axis=0) for m in bundle.members}
    with _staged(root) as tmp:
        if bundle.ood_banks is not None:
            drop_from_banks(root, tmp, [m.name for m in bundle.members], int(species[j]["category_id"]))
        _write_species(root, tmp, species, rest, vectors)
    log(f"unenrolled {species[j]['scientific_name']} (category_id {species[j]['category_id']}) from {root}; "
        f"{len(rest)} enrolled species left")
    return species[j]
