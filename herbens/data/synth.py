"""Synthetic herbarium sheets in the exact Kaggle Herbarium 2022 layout (the embedded demo data).

``synthesize`` writes ``train_metadata.json``, ``test_metadata.json``, ``train_images/``,
``test_images/``, ``sample_submission.csv`` and ``test_solution.csv`` (the true category_id of
every test image, which Kaggle keeps secret), so that the whole pipeline can be run and scored
without the real 150 GB dataset.

The sheets imitate NAFlora-1M: portrait cream paper, one pressed plant, a blurred grey label
(NAFlora obfuscates label text), a barcode, a colour chart and a scale bar, and a colour cast and
paper tone per institution. The taxonomy is visible as nested cues, so that mistakes fall where
they fall on real data (between related species before unrelated ones):

- family: leaf arrangement (alternate, opposite, whorled, rosette), venation (pinnate, palmate,
  parallel, arcuate), base hue, stem colour and thickness, flower colour;
- genus: leaf shape (ovate, lanceolate, cordate, palmately lobed, linear, round, ...), its
  width/length ratio, leaf length, petiole and leaf angle, a small hue offset;
- species: leaf size, tint (hue/value shift), number of nodes (leaf count) and margin
  (teeth or lobe count). Species of one genus differ in at least one of size, tint and leaf
  count (the cues that survive downscaling to ~112 px) while there are few enough of them.

``difficulty`` (default 1.0) scales every source of intra-class variation: pose (rotation,
offset, scale, stem curvature), per-leaf size/angle/width jitter, colour jitter, the chance of
a missing or flipped leaf or of one node more or less, and the amplitude of the per-image noise.
0 gives near-identical images per species; 2 roughly doubles the variation.

Every image is drawn with its own ``numpy.random.Generator`` seeded from (seed, split, species,
index), so the output is byte-identical for a seed whatever the order or the number of worker
processes.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from herbens.errors import HerbensError
from herbens.fileio import atomic_write, write_json
from herbens.progress import progress_bar

SHEET_ASPECT = 0.68  # width / height of a herbarium sheet (about 29 x 42 cm)
JPEG_QUALITY = 90
METADATA_FILES = ("train_metadata.json", "test_metadata.json", "sample_submission.csv",
                  "test_solution.csv")

ARRANGEMENTS = ("alternate", "opposite", "whorled", "rosette")
VENATIONS = ("pinnate", "palmate", "parallel", "arcuate")
# Leaf shape -> (min, max) width/length ratio and a length factor that keeps leaf areas similar.
SHAPES = {
    "ovate": (0.48, 0.60, 1.0), "lanceolate": (0.20, 0.27, 1.15), "elliptic": (0.38, 0.48, 1.0),
    "obovate": (0.42, 0.55, 1.0), "linear": (0.07, 0.10, 1.35), "round": (0.85, 1.0, 0.78),
    "cordate": (0.75, 0.90, 0.85), "deltoid": (0.55, 0.70, 0.95), "spatulate": (0.30, 0.40, 1.05),
    "palmate": (0.90, 1.0, 0.85), "pinnatifid": (0.45, 0.60, 1.05),
}
# Species axes: each species of a genus takes one level on each (distinct where possible).
SIZE_LEVELS = (0.74, 0.92, 1.14)
TINT_LEVELS = (-1, 0, 1)
NODE_LEVELS = (3, 5, 7)
TEETH_BY_MARGIN = (0, 8, 14)
PALMATE_LOBES_BY_MARGIN = (3, 5, 7)
PINNATIFID_LOBES_BY_MARGIN = (2, 3, 5)

COLOUR_CHART = ((115, 82, 68), (194, 150, 130), (98, 122, 157), (87, 108, 67), (133, 128, 177),
                (103, 189, 170), (214, 126, 44), (80, 91, 166), (193, 90, 99), (94, 60, 108),
                (157, 188, 64), (224, 163, 46))
PAPER_TONES = ((241, 235, 216), (236, 229, 207), (245, 242, 231), (231, 224, 201),
               (244, 238, 222), (238, 233, 219))
FLOWER_COLOURS = ((150, 90, 140), (205, 180, 80), (225, 220, 200), (140, 70, 60),
                  (110, 110, 160), (190, 120, 60))
COLLECTION_CODES = ("NY", "MO", "US", "F", "GH", "MICH", "TEX", "RSA", "CAS", "UC", "COLO",
                    "WIS", "MIN", "OSC", "WTU", "ASU", "FLAS", "DUKE", "NCU", "BRIT", "ISC",
                    "KANU", "MSC", "ILL", "OKL", "RM", "SD", "ARIZ", "LSU", "VDB")
LICENSES = (
    {"id": 0, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
    {"id": 1, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"},
    {"id": 2, "name": "CC BY-NC 4.0", "url": "https://creativecommons.org/licenses/by-nc/4.0/"},
)
AUTHORS = ("L.", "Michx.", "Nutt.", "A. Gray", "Torr.", "Pursh", "Greene", "Rydb.", "Benth.",
           "Hook.", "Engelm.", "S. Watson", "Britton", "Small", "Raf.", "Willd.", "Kunth",
           "Eastw.", "M.E. Jones", "Sm.")
_ONSETS = ("b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "ph", "th", "ch",
           "cl", "cr", "pl", "pr", "st", "tr", "gl", "sc", "h", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "y", "ae")
_GENUS_ENDINGS = ("a", "ia", "um", "us", "is", "ella", "anthus", "opsis", "odon", "phyllum",
                  "carpus", "ago", "ina", "aster")
_EPITHET_ROOTS = ("alb", "rubr", "flav", "virid", "angust", "lat", "parv", "grand", "tenu",
                  "crass", "hirt", "glabr", "mont", "palustr", "sylvestr", "occident", "boreal",
                  "austral", "minut", "elong", "rotund", "acut", "obtus", "serrat", "lanat",
                  "pilos", "spinos", "odorat", "gracil", "robust", "dens", "lax", "ciner",
                  "nigr", "purpur", "aure", "lute", "glauc", "ripar", "arvens", "campestr",
                  "rupestr", "nemor", "alpin", "pumil", "scabr", "tomentos", "macul")
_EPITHET_ENDINGS = ("a", "um", "is", "ifolia", "iflora", "icaulis", "ensis", "oides", "ata",
                    "ina", "escens", "ella", "ica", "ipes")

_T_GRID = np.linspace(0.0, 1.0, 41)  # positions along a leaf where its half-width is tabulated


# ----------------------------------------------------------------------------- looks


@dataclass(frozen=True)
class SpeciesLook:
    """Everything that is fixed for one species (family, genus and species cues merged).

    Lengths are in sheet-height units (the sheet is 1.0 high and ``SHEET_ASPECT`` wide).
    """

    arrangement: str
    venation: str
    shape: str
    aspect: float
    leaf_len: float
    petiole: float
    leaf_angle: float
    hue: float
    sat: float
    val: float
    vein_contrast: float
    stem_rgb: tuple
    stem_width: float
    stem_height: float
    flower_rgb: tuple
    nodes: int
    margin: int


@dataclass(frozen=True)
class InstitutionLook:
    """How one institution photographs its sheets: paper, colour cast, where things go."""

    paper: tuple
    cast: tuple
    label_corner: str
    chart_corner: str
    barcode: bool


@dataclass
class _Taxon:
    """One species during planning: names, ids and look."""

    family: str
    genus: str
    genus_id: int
    epithet: str
    authors: str
    look: SpeciesLook
    category_id: int = -1


@dataclass
class _Plan:
    """The whole dataset before any image is drawn."""

    taxa: list
    genera: list
    institutions: list
    inst_looks: list
    inst_licenses: list
    train: list  # (image_id, file_name, taxon index, institution_id, seed key)
    test: list
    distances: list


# ----------------------------------------------------------------------------- taxonomy


def _partition(rng: np.random.Generator, n_items: int, n_groups: int, alpha: float) -> np.ndarray:
    """Split n_items into n_groups uneven sizes (>= 1 each) with power-law weights.

    A power law makes a few big groups and many singletons, as with real genera and families.
    """
    sizes = np.ones(n_groups, dtype=np.int64)
    if n_items > n_groups:
        weights = np.arange(1, n_groups + 1, dtype=np.float64) ** -alpha
        sizes += rng.multinomial(n_items - n_groups, weights / weights.sum())
    rng.shuffle(sizes)
    return sizes


def _syllables(rng: np.random.Generator, count: int) -> str:
    return "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(count))


def _unique(make, used: set) -> str:
    # Names come from a large space; a few retries always suffice, the suffix is a safety net.
    for _ in range(50):
        name = make()
        if name not in used:
            used.add(name)
            return name
    name = f"{make()}{len(used)}"
    used.add(name)
    return name


def _genus_name(rng: np.random.Generator) -> str:
    stem = _syllables(rng, int(rng.integers(2, 4)))
    ending = str(rng.choice(_GENUS_ENDINGS))
    if ending[0] in "aeiouy":
        stem = stem.rstrip("aeiouy")  # "Chodae" + "a" -> "Choda", not "Chodaea"
    return (stem + ending).capitalize()


def _family_name(type_genus: str, rng: np.random.Generator) -> str:
    # Real family names are the stem of a type genus + "aceae" (Rosa -> Rosaceae).
    stem = type_genus.lower()
    for ending in sorted(_GENUS_ENDINGS, key=len, reverse=True):
        if stem.endswith(ending):
            stem = stem[: -len(ending)]
            break
    stem = stem.rstrip("aeiouy")
    if len(stem) < 3:  # too little left of the genus: invent a stem
        stem = _syllables(rng, 2) + str(rng.choice(("r", "l", "n", "s", "t", "m", "d")))
    return stem.capitalize() + "aceae"


def _epithet(rng: np.random.Generator) -> str:
    if rng.random() < 0.2:  # eponyms such as "smithii" or "greeneana"
        return str(_syllables(rng, 2) + rng.choice(("ii", "iana")))
    return str(rng.choice(_EPITHET_ROOTS) + rng.choice(_EPITHET_ENDINGS))


def _authors(rng: np.random.Generator) -> str:
    first = str(rng.choice(AUTHORS))
    if rng.random() < 0.3:  # a combination: "(Basionym author) Combining author"
        return f"({first}) {rng.choice(AUTHORS)}"
    return first


def _group_counts(species: int) -> tuple[int, int]:
    """Numbers of genera and families: power laws through (40 species, 16 genera, 6 families)
    and NAFlora-1M's (15,501 species, ~2,564 genera, ~272 families)."""
    genera = min(species, max(min(2, species), round(0.69 * species ** 0.852)))
    families = min(genera, max(min(2, genera), round(0.75 * genera ** 0.751)))
    return genera, families


def _family_looks(rng: np.random.Generator, n: int) -> list[dict]:
    # Arrangement x venation combinations are dealt without repetition first, so that small
    # datasets get clearly different families.
    combos = [(a, v) for a in ARRANGEMENTS for v in VENATIONS]
    order = rng.permutation(len(combos))
    looks = []
    for i in range(n):
        arrangement, venation = combos[order[i % len(combos)]]
        looks.append(dict(
            arrangement=arrangement, venation=venation,
            hue=float(rng.uniform(58, 108)), sat=float(rng.uniform(0.32, 0.55)),
            val=float(rng.uniform(0.34, 0.50)),
            vein_contrast=float(rng.choice((-0.3, 0.3))),
            stem_rgb=tuple(int(c) for c in rng.integers((70, 60, 30), (125, 105, 70))),
            stem_width=float(rng.uniform(0.004, 0.008)),
            flower_rgb=FLOWER_COLOURS[int(rng.integers(len(FLOWER_COLOURS)))],
            leaf_angle=float(rng.uniform(38, 62)),
        ))
    return looks


def _genus_looks(rng: np.random.Generator, n: int) -> list[dict]:
    """Looks for the n genera of one family: shapes dealt without repetition first."""
    names = list(SHAPES)
    order = rng.permutation(len(names))
    looks = []
    for i in range(n):
        shape = names[order[i % len(names)]]
        lo, hi, length = SHAPES[shape]
        looks.append(dict(
            shape=shape, aspect=round(float(rng.uniform(lo, hi)), 3),
            leaf_len=float(rng.uniform(0.16, 0.21)) * length,
            petiole=float(rng.choice((0.0, 0.08, 0.2))),
            angle_offset=float(rng.uniform(-8, 8)), hue_offset=float(rng.uniform(-8, 8)),
            stem_height=float(rng.uniform(0.60, 0.72)),
        ))
    return looks


def _species_levels(rng: np.random.Generator, n: int) -> list[tuple[int, int, int, int]]:
    """(size, tint, nodes, margin) levels for the n species of a genus.

    The (size, tint, nodes) triple is distinct for up to 27 species: those cues survive
    downscaling, so sibling species stay separable at low resolution; the margin (teeth/lobes)
    is a finer cue, and separates species beyond 27 per genus.
    """
    triples = [(s, t, k) for s in range(3) for t in range(3) for k in range(3)]
    order = rng.permutation(len(triples))
    margins = rng.integers(0, 3, size=n)
    levels = []
    for i in range(n):
        s, t, k = triples[order[i % len(triples)]]
        margin = (int(margins[i]) + i // len(triples)) % 3
        levels.append((s, t, k, margin))
    return levels


def _species_look(fam: dict, gen: dict, levels: tuple[int, int, int, int]) -> SpeciesLook:
    size, tint, nodes, margin = levels
    shift = TINT_LEVELS[tint]
    return SpeciesLook(
        arrangement=fam["arrangement"], venation=fam["venation"], shape=gen["shape"],
        aspect=gen["aspect"], leaf_len=gen["leaf_len"] * SIZE_LEVELS[size],
        petiole=gen["petiole"], leaf_angle=fam["leaf_angle"] + gen["angle_offset"],
        hue=fam["hue"] + gen["hue_offset"] + 16.0 * shift, sat=fam["sat"],
        val=fam["val"] - 0.05 * shift, vein_contrast=fam["vein_contrast"],
        stem_rgb=fam["stem_rgb"], stem_width=fam["stem_width"], stem_height=gen["stem_height"],
        flower_rgb=fam["flower_rgb"], nodes=NODE_LEVELS[nodes], margin=margin)


def _make_taxa(rng: np.random.Generator, species: int) -> tuple[list[_Taxon], list[dict]]:
    """Invent families, genera and species with uneven group sizes and nested looks."""
    n_genera, n_families = _group_counts(species)
    genus_sizes = _partition(rng, species, n_genera, alpha=1.1)
    genera_per_family = _partition(rng, n_genera, n_families, alpha=1.0)
    fam_looks = _family_looks(rng, n_families)
    used_genera: set = set()
    used_families: set = set()
    taxa: list[_Taxon] = []
    genus_index = 0
    for fam_i, n_gen in enumerate(genera_per_family):
        gen_looks = _genus_looks(rng, int(n_gen))
        names = [_unique(lambda: _genus_name(rng), used_genera) for _ in range(n_gen)]
        family = _unique(lambda: _family_name(names[0], rng), used_families)
        for gen_look, genus in zip(gen_looks, names):
            n_sp = int(genus_sizes[genus_index])
            genus_index += 1
            used_epithets: set = set()
            for levels in _species_levels(rng, n_sp):
                taxa.append(_Taxon(
                    family=family, genus=genus, genus_id=-1,
                    epithet=_unique(lambda: _epithet(rng), used_epithets),
                    authors=_authors(rng),
                    look=_species_look(fam_looks[fam_i], gen_look, levels)))
    taxa.sort(key=lambda t: (t.genus, t.epithet))
    genus_names = sorted({t.genus for t in taxa})
    genus_ids = {name: i + 1 for i, name in enumerate(genus_names)}
    for taxon in taxa:
        taxon.genus_id = genus_ids[taxon.genus]
    genera = [{"genus_id": genus_ids[name], "genus": name} for name in genus_names]
    return taxa, genera


def _category_ids(rng: np.random.Generator, n: int) -> list[int]:
    """Increasing ids with random gaps, like Kaggle's (15,505 ids for 15,501 taxa)."""
    steps = 1 + np.where(rng.random(n) < 0.2, rng.integers(1, 4, size=n), 0)
    steps[0] = int(rng.integers(0, 3))
    if n > 1 and np.all(steps[1:] == 1):
        steps[int(rng.integers(1, n))] += 1  # always at least one gap: ids are never indices
    return np.cumsum(steps).astype(int).tolist()


def _train_counts(rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
    """Long-tailed images per species: a power law over a random rank, from hi down to lo."""
    if n == 1:
        return np.array([hi])
    alpha = math.log(hi / lo) / math.log(n)
    ranks = rng.permutation(n)
    counts = hi * (ranks + 1.0) ** -alpha * np.exp(rng.normal(0.0, 0.15, size=n))
    counts = np.clip(np.round(counts), lo, hi).astype(np.int64)
    counts[ranks == 0] = hi  # the head and the tail hit the bounds exactly
    counts[ranks == n - 1] = lo
    return counts


def _institutions(rng: np.random.Generator,
                  n: int) -> tuple[list[dict], list[InstitutionLook], list[int]]:
    """Records, looks and licence ids of n invented herbaria."""
    codes = [COLLECTION_CODES[i] for i in rng.permutation(len(COLLECTION_CODES))]
    codes += [f"H{i:03d}" for i in range(max(0, n - len(codes)))]
    records, looks, licenses = [], [], []
    for i in range(n):
        label_corner = str(rng.choice(("br", "br", "bl")))
        chart_options = [c for c in ("tl", "tr", "bl", "br") if c != label_corner]
        looks.append(InstitutionLook(
            paper=PAPER_TONES[int(rng.integers(len(PAPER_TONES)))],
            cast=_cast(rng),
            label_corner=label_corner, chart_corner=str(rng.choice(chart_options)),
            barcode=bool(rng.random() < 0.75)))
        records.append({"institution_id": i, "collectionCode": codes[i]})
        licenses.append(int(rng.integers(len(LICENSES))))
    return records, looks, licenses


def _cast(rng: np.random.Generator) -> tuple[float, float, float]:
    """A camera colour cast: mostly warm/cool (red against blue), a little green/magenta.

    Independent channel gains would tint paper pink or violet, which real scans rarely are.
    """
    warm, green = rng.uniform(-0.035, 0.035), rng.uniform(-0.012, 0.012)
    return (1.0 + warm, 1.0 + green, 1.0 - warm)


def _distances(rng: np.random.Generator, taxa: list[_Taxon], genera: list[dict]) -> list[dict]:
    """Genus-to-genus distances: small within a family, large across families.

    All pairs x < y up to 400 genera; beyond that only pairs within a family (the full matrix
    would be quadratic in size).
    """
    family_of = {t.genus_id: t.family for t in taxa}
    ids = [g["genus_id"] for g in genera]
    if len(ids) <= 400:
        groups = [ids]
    else:
        groups = [[g for g in ids if family_of[g] == f] for f in sorted(set(family_of.values()))]
    out = []
    for group in groups:
        for i, x in enumerate(group):
            for y in group[i + 1:]:
                same = family_of[x] == family_of[y]
                d = rng.uniform(0.05, 0.3) if same else rng.uniform(0.5, 1.0)
                out.append({"genus_id_x": x, "genus_id_y": y, "distance": round(float(d), 4)})
    return out


def _plan(species: int, seed: int, min_images: int, max_images: int, test_per_species: int,
          institutions: int) -> _Plan:
    """Decide every name, id, count and file name from the seed; draw nothing yet."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7001]))
    taxa, genera = _make_taxa(rng, species)
    for taxon, cid in zip(taxa, _category_ids(rng, len(taxa))):
        taxon.category_id = cid
    counts = _train_counts(rng, len(taxa), min_images, max_images)
    inst_records, inst_looks, inst_licenses = _institutions(rng, institutions)
    # A few herbaria contribute most sheets, as in NAFlora.
    inst_p = rng.dirichlet(np.full(institutions, 1.5))
    train_inst = rng.choice(institutions, size=int(counts.sum()), p=inst_p).tolist()
    train = []
    for t_i, (taxon, count) in enumerate(zip(taxa, counts)):
        cid = taxon.category_id
        for k in range(1, int(count) + 1):
            image_id = f"{cid:05d}__{k:03d}"
            file_name = f"{cid // 100:03d}/{cid % 100:02d}/{image_id}.jpg"
            train.append((image_id, file_name, t_i, train_inst[len(train)], (seed, 0, cid, k)))
    test_species = np.repeat(np.arange(len(taxa)), test_per_species)
    test_species = test_species[rng.permutation(len(test_species))]
    test_inst = rng.choice(institutions, size=len(test_species), p=inst_p).tolist()
    test = []
    for i, t_i in enumerate(test_species.tolist()):
        file_name = f"{i // 1000:03d}/test-{i:06d}.jpg"
        test.append((str(i), file_name, t_i, test_inst[i], (seed, 1, taxa[t_i].category_id, i)))
    return _Plan(taxa=taxa, genera=genera, institutions=inst_records, inst_looks=inst_looks,
                 inst_licenses=inst_licenses, train=train, test=test,
                 distances=_distances(rng, taxa, genera))


# ----------------------------------------------------------------------------- leaf geometry


def _halfwidth(shape: str, t: np.ndarray) -> np.ndarray:
    """Leaf half-width profile from base (t=0) to tip (t=1), unnormalised."""
    if shape in ("elliptic", "round"):
        return np.sqrt(t * (1 - t))
    if shape in ("ovate", "pinnatifid"):
        return t ** 0.6 * (1 - t) ** 1.2
    if shape == "obovate":
        return t ** 1.2 * (1 - t) ** 0.6
    if shape == "lanceolate":
        return t ** 0.45 * (1 - t) ** 1.4
    if shape == "linear":
        return np.sqrt(np.clip(np.minimum(t / 0.06, (1 - t) / 0.3), 0, 1))
    if shape == "deltoid":
        return (1 - t) * np.sqrt(np.clip(t / 0.1, 0, 1))
    if shape == "spatulate":
        return t ** 2.2 * (1 - t) ** 0.5
    raise ValueError(shape)


def _profile_outline(shape: str, aspect: float, margin: int) -> np.ndarray:
    """Closed outline (u along the leaf, v across) of a leaf given by a half-width profile."""
    teeth = TEETH_BY_MARGIN[margin] if shape != "pinnatifid" else 0
    t = np.linspace(0.0, 1.0, 48 + 6 * teeth)
    w = _halfwidth(shape, t)
    w = w / w.max()
    if shape == "pinnatifid":
        lobes = PINNATIFID_LOBES_BY_MARGIN[margin]
        w = w * (0.35 + 0.65 * np.abs(np.sin(np.pi * lobes * t)) ** 0.6)
    if teeth:
        # A sawtooth: the edge creeps outwards then drops back, i.e. teeth pointing to the tip.
        w = w * (0.9 + 0.14 * np.mod(t * teeth, 1.0))
    half = 0.5 * aspect * w
    upper = np.stack([t, half], axis=1)
    lower = np.stack([t[::-1], -half[::-1]], axis=1)
    return np.concatenate([upper, lower[1:-1]])


def _polar_outline(shape: str, aspect: float, margin: int) -> np.ndarray:
    """Closed outline of a heart-shaped (cordate) or palmately lobed leaf."""
    phi = np.linspace(0.0, 2 * np.pi, 120, endpoint=False)
    if shape == "cordate":
        x = 16 * np.sin(phi) ** 3
        y = 13 * np.cos(phi) - 5 * np.cos(2 * phi) - 2 * np.cos(3 * phi) - np.cos(4 * phi)
        # The notch (phi=0, y=5) is the leaf base at u=0; the tip (phi=pi, y=-17) is u=1.
        pts = np.stack([(5 - y) / 22, x / 22 * aspect / 1.45], axis=1)
        teeth = TEETH_BY_MARGIN[margin]
        if teeth:
            centre = np.array([0.45, 0.0])
            saw = np.mod(phi / (2 * np.pi) * teeth * 2, 1.0)
            pts = centre + (pts - centre) * (0.95 + 0.08 * saw)[:, None]
        return pts
    lobes = PALMATE_LOBES_BY_MARGIN[margin]
    theta = phi - np.pi  # 0 points to the tip, +-pi to the petiole
    spread = min(0.78 * np.pi, 0.25 * np.pi * (lobes - 1))
    centres = np.linspace(-spread, spread, lobes)
    width = spread / (lobes - 1) * 0.6
    bump = np.exp(-(((theta[:, None] - centres[None, :]) / width) ** 2)).max(axis=1)
    r = 0.5 * (0.5 + 0.5 * bump)
    return np.stack([0.5 + r * np.cos(theta), aspect * r * np.sin(theta)], axis=1)


@lru_cache(maxsize=4096)
def _leaf_template(shape: str, aspect: float, margin: int,
                   venation: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    """A leaf in leaf coordinates: outline, all vein points stacked, and each vein's slice.

    Cached per species look, so a sheet only transforms two arrays per leaf.
    """
    if shape in ("cordate", "palmate"):
        pts = _polar_outline(shape, aspect, margin)
    else:
        pts = _profile_outline(shape, aspect, margin)
    near = np.abs(pts[None, :, 0] - _T_GRID[:, None]) <= 0.035
    half = np.where(near, np.abs(pts[None, :, 1]), 0.0).max(axis=1)
    # Veins of a palmately lobed leaf start where the blade starts, past the basal sinus.
    start = float(pts[np.abs(pts[:, 1]) < 0.02, 0].clip(min=0).min()) if shape == "palmate" else 0.0
    lines = _vein_lines(venation, half, start)
    ends = np.cumsum([0] + [len(line) for line in lines])
    # Slices are in units of flat (x, y) lists, as PIL takes them.
    slices = tuple((2 * int(a), 2 * int(b)) for a, b in zip(ends[:-1], ends[1:]))
    return pts, np.concatenate(lines), slices


def _vein_lines(venation: str, half: np.ndarray, start: float) -> list[np.ndarray]:
    """Vein polylines in leaf coordinates; the midrib first."""
    def hw(t):
        return np.interp(t, _T_GRID, half)

    lines = [np.array([[start, 0.0], [0.96, 0.0]])]
    if venation == "pinnate":
        for t in np.linspace(start + 0.15, 0.8, 5):
            end = t + 0.14
            for side in (1, -1):
                lines.append(np.array([[t, 0.0], [end, side * 0.82 * hw(end)]]))
    elif venation == "palmate":
        for t in (0.35, 0.55, 0.75):
            for side in (1, -1):
                lines.append(np.array([[start + 0.02, 0.0], [t, side * 0.8 * hw(t)]]))
    elif venation == "parallel":
        t = np.linspace(start + 0.03, 0.95, 10)
        for f in (-0.65, -0.33, 0.33, 0.65):
            lines.append(np.stack([t, f * hw(t)], axis=1))
    else:  # arcuate: laterals that curve towards the tip
        s = np.linspace(0.0, 1.0, 5)
        for t in np.linspace(start + 0.18, 0.7, 4):
            u = t + 0.3 * s
            for side in (1, -1):
                lines.append(np.stack([u, side * 0.8 * hw(u) * np.sqrt(s)], axis=1))
    return lines


# ----------------------------------------------------------------------------- drawing


def _hsv(hue: float, sat: float, val: float) -> np.ndarray:
    """HSV (hue in degrees) to an RGB vector in 0..255."""
    h = (hue % 360.0) / 60.0
    c = val * sat
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return (np.array(rgb) + (val - c)) * 255.0


class _Canvas:
    """An image, its draw handle, the sheet-unit scale and the per-image colour cast."""

    def __init__(self, width: int, height: int, paper: np.ndarray, cast: np.ndarray):
        self.cast = tuple(float(k) for k in cast)
        self.unit = float(height)  # pixels per sheet-height unit
        self.image = Image.new("RGB", (width, height), self.tone(paper))
        self.draw = ImageDraw.Draw(self.image)

    def tone(self, rgb) -> tuple:
        """A colour as photographed: multiplied by the institution's (jittered) cast."""
        return tuple(min(255, max(0, int(c * k))) for c, k in zip(rgb, self.cast))

    def px(self, value: float) -> int:
        """A line width in pixels for a length in sheet units (at least one pixel)."""
        return max(1, int(round(value * self.unit)))

    def box(self, x0: float, y0: float, x1: float, y1: float) -> tuple:
        u = self.unit
        return (int(x0 * u), int(y0 * u), int(x1 * u), int(y1 * u))


class _Pose:
    """Plant coordinates (x right, y up, sheet units, origin at the stem base) -> pixels."""

    def __init__(self, origin: tuple[float, float], angle_deg: float, scale: float, unit: float):
        a = math.radians(angle_deg)
        s = scale * unit
        self.origin = np.array(origin) * unit
        self.matrix = s * np.array([[math.cos(a), -math.sin(a)], [-math.sin(a), -math.cos(a)]])

    def apply(self, pts: np.ndarray) -> list:
        return (self.origin + pts @ self.matrix).ravel().tolist()

    def compose(self, offset: np.ndarray, linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pixel affine map of ``p -> offset + p @ linear`` followed by this pose."""
        return self.origin + offset @ self.matrix, linear @ self.matrix


def _corner_origin(corner: str, w: float, h: float, margin: float = 0.025) -> tuple[float, float]:
    x = margin if corner[1] == "l" else SHEET_ASPECT - margin - w
    y = margin if corner[0] == "t" else 1.0 - margin - h
    return x, y


def _draw_label(canvas: _Canvas, rng: np.random.Generator, inst: InstitutionLook,
                jitter: float) -> tuple:
    """A label with text lines, then blurred to grey smears as NAFlora obfuscates labels."""
    w, h = 0.25 + rng.uniform(-0.02, 0.02), 0.11 + rng.uniform(-0.015, 0.015)
    x, y = _corner_origin(inst.label_corner, w, h, 0.02 + jitter * rng.uniform(0, 0.015))
    draw = canvas.draw
    draw.rectangle(canvas.box(x, y, x + w, y + h), fill=canvas.tone((238, 236, 228)),
                   outline=canvas.tone((150, 150, 145)), width=canvas.px(0.0015))
    ink = canvas.tone((60, 60, 62))
    line_y = y + 0.015
    while line_y < y + h - 0.015:
        length = w * rng.uniform(0.35, 0.9)
        draw.rectangle(canvas.box(x + 0.012, line_y, x + 0.012 + length, line_y + 0.007), fill=ink)
        line_y += 0.015
    area = canvas.box(x - 0.01, y - 0.01, x + w + 0.01, y + h + 0.01)
    blurred = canvas.image.crop(area).filter(ImageFilter.GaussianBlur(0.006 * canvas.unit))
    canvas.image.paste(blurred, area[:2])
    return x, y, w, h


def _draw_barcode(canvas: _Canvas, rng: np.random.Generator, label: tuple) -> None:
    x, y, w, _ = label
    top = y - 0.045
    if top < 0.02:
        return
    pos, end = x + 0.01, x + 0.01 + min(0.13, w * 0.6)
    ink = canvas.tone((25, 25, 25))
    while pos < end:
        bar = rng.uniform(0.001, 0.004)
        canvas.draw.rectangle(canvas.box(pos, top, pos + bar, top + 0.03), fill=ink)
        pos += bar + rng.uniform(0.001, 0.004)


def _draw_chart(canvas: _Canvas, inst: InstitutionLook) -> None:
    """A 2 x 6 colour chart with a black/white scale bar beside it."""
    cell = 0.026
    w, h = 6 * cell + 0.008, 2 * cell + 0.008 + 0.022
    x, y = _corner_origin(inst.chart_corner, w, h)
    draw = canvas.draw
    draw.rectangle(canvas.box(x, y, x + w, y + 2 * cell + 0.008), fill=canvas.tone((30, 30, 30)))
    for i, colour in enumerate(COLOUR_CHART):
        cx, cy = x + 0.004 + (i % 6) * cell, y + 0.004 + (i // 6) * cell
        draw.rectangle(canvas.box(cx + 0.002, cy + 0.002, cx + cell - 0.002, cy + cell - 0.002),
                       fill=canvas.tone(colour))
    bar_y = y + 2 * cell + 0.016
    seg = w / 6
    for i in range(6):
        fill = canvas.tone((20, 20, 20) if i % 2 == 0 else (250, 250, 250))
        draw.rectangle(canvas.box(x + i * seg, bar_y, x + (i + 1) * seg, bar_y + 0.01), fill=fill,
                       outline=canvas.tone((20, 20, 20)))


def _draw_packet(canvas: _Canvas, rng: np.random.Generator) -> None:
    """A fragment packet (folded paper envelope) glued to the right edge."""
    w, h = 0.11, 0.08
    x = SHEET_ASPECT - 0.03 - w
    y = rng.uniform(0.25, 0.45)
    edge = canvas.tone((170, 165, 150))
    canvas.draw.rectangle(canvas.box(x, y, x + w, y + h), fill=canvas.tone((232, 226, 208)),
                          outline=edge, width=canvas.px(0.0015))
    canvas.draw.line(canvas.box(x, y + h * 0.3, x + w, y + h * 0.3), fill=edge, width=canvas.px(0.001))


def _leaf_colours(look: SpeciesLook, rng: np.random.Generator, d: float) -> np.ndarray:
    """The image's leaf colour: the species' HSV with per-specimen jitter and browning."""
    hue = look.hue + rng.normal(0, 3.0 * d)
    val = look.val * (1 + rng.normal(0, 0.05 * d))
    sat = look.sat * (1 + rng.normal(0, 0.06 * d))
    rgb = _hsv(hue, float(np.clip(sat, 0.05, 1)), float(np.clip(val, 0.05, 0.95)))
    # Old or slowly dried specimens turn brown; kept small so the species' tint stays readable.
    browning = rng.uniform(0, 0.15 * d)
    return rgb * (1 - browning) + browning * np.array([115.0, 95.0, 60.0])


def _stem_points(look: SpeciesLook, rng: np.random.Generator, d: float, height: float) -> np.ndarray:
    """A gently curved stem from (0, 0) up to about (0, height)."""
    s = np.linspace(0.0, 1.0, 16)
    bend = rng.normal(0, 0.07 * d)
    sway = rng.normal(0, 0.04 * d)
    x = height * (bend * s ** 2 + sway * np.sin(np.pi * s))
    return np.stack([x, height * s], axis=1)


def _node_leaves(look: SpeciesLook, rng: np.random.Generator, d: float,
                 stem: np.ndarray) -> list[tuple[np.ndarray, float, float]]:
    """(attachment point, direction in radians, relative size) of every leaf on the plant."""
    leaves = []
    if look.arrangement == "rosette":
        count = look.nodes + 3 + _node_jitter(rng, d)
        for a in np.linspace(-75, 75, count) + rng.normal(0, 6 * d, size=count):
            leaves.append((stem[0], math.radians(90 + a), 1.2 * (1 + rng.normal(0, 0.06 * d))))
        return leaves
    nodes = look.nodes + _node_jitter(rng, d)
    if look.arrangement == "whorled":
        nodes = max(2, (nodes + 1) // 2)
    fractions = np.linspace(0.14, 0.88, nodes) + rng.uniform(-0.02, 0.02, size=nodes) * d
    side = 1 if rng.random() < 0.5 else -1
    for f in fractions:
        i = min(int(f * (len(stem) - 1)), len(stem) - 2)
        tangent = stem[i + 1] - stem[i]
        up = math.atan2(tangent[1], tangent[0])
        point = stem[i] + (stem[i + 1] - stem[i]) * (f * (len(stem) - 1) - i)
        size = 1.0 - 0.3 * f  # leaves shrink towards the top, as on most real stems
        if look.arrangement == "alternate":
            angles = [side * look.leaf_angle]
            side = -side
        elif look.arrangement == "opposite":
            angles = [look.leaf_angle, -look.leaf_angle]
        else:
            angles = [look.leaf_angle, -look.leaf_angle, look.leaf_angle + 65, -look.leaf_angle - 65]
        for a in angles:
            a = a + rng.normal(0, 8 * d)
            leaves.append((point, up - math.radians(a), size * (1 + rng.normal(0, 0.07 * d))))
    return leaves


def _node_jitter(rng: np.random.Generator, d: float) -> int:
    """Sometimes one node more or fewer than the species' count (a broken or young shoot)."""
    if rng.random() < min(0.6, 0.25 * d):
        return int(rng.choice((-1, 1)))
    return 0


def _draw_leaf(canvas: _Canvas, pose: _Pose, look: SpeciesLook, rng: np.random.Generator,
               d: float, leaf: tuple, length: float, rgb: np.ndarray) -> None:
    point, direction, size = leaf
    outline, veins, slices = _leaf_template(look.shape, look.aspect, look.margin, look.venation)
    length = length * size
    width = 1 + rng.normal(0, 0.06 * d)
    c, s = math.cos(direction), math.sin(direction)
    to_plant = length * np.array([[c, s], [-width * s, width * c]])
    base = np.asarray(point) + look.petiole * length * np.array([c, s])
    draw = canvas.draw
    if look.petiole > 0:
        draw.line(pose.apply(np.stack([point, base])), fill=canvas.tone(rgb * 0.8),
                  width=canvas.px(0.0025))
    shade = rgb * (1 + rng.normal(0, 0.06 * d))
    if rng.random() < 0.08 * d:  # a leaf pressed upside down shows its paler underside
        shade = shade * 0.6 + 0.4 * 200
    offset, linear = pose.compose(base, to_plant)
    draw.polygon((offset + outline @ linear).ravel().tolist(), fill=canvas.tone(shade),
                 outline=canvas.tone(shade * 0.7))
    vein = canvas.tone(shade * (1 + look.vein_contrast))
    flat = (offset + veins @ linear).ravel().tolist()
    midrib, thin = canvas.px(0.0022), canvas.px(0.0012)
    for i, (a, b) in enumerate(slices):
        draw.line(flat[a:b], fill=vein, width=midrib if i == 0 else thin)


def _draw_roots(canvas: _Canvas, pose: _Pose, rng: np.random.Generator) -> None:
    colour = canvas.tone((115, 90, 65))
    for _ in range(int(rng.integers(3, 6))):
        steps = rng.normal([0.0, -0.012], [0.008, 0.004], size=(7, 2))
        pts = np.concatenate([[[0.0, 0.0]], np.cumsum(steps, axis=0)])
        canvas.draw.line(pose.apply(pts), fill=colour, width=canvas.px(0.0015))


def _draw_flowers(canvas: _Canvas, pose: _Pose, look: SpeciesLook, rng: np.random.Generator,
                  tip: np.ndarray) -> None:
    colour = canvas.tone(look.flower_rgb)
    edge = canvas.tone(np.asarray(look.flower_rgb) * 0.7)
    for _ in range(int(rng.integers(4, 8))):
        centre = tip + rng.normal(0, 0.015, size=2) + [0.0, 0.012]
        cx, cy = pose.apply(centre[None, :])
        r = 0.008 * canvas.unit
        canvas.draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour, outline=edge)


def _draw_tape(canvas: _Canvas, pose: _Pose, rng: np.random.Generator, stem: np.ndarray) -> None:
    """Mounting tape strips across the stem."""
    colour = canvas.tone((246, 243, 233))
    for f in rng.uniform(0.2, 0.75, size=2):
        x, y = pose.apply(stem[int(f * (len(stem) - 1))][None, :])
        w, h = 0.025 * canvas.unit, 0.006 * canvas.unit
        canvas.draw.rectangle((x - w, y - h, x + w, y + h), fill=colour)


def _draw_plant(canvas: _Canvas, look: SpeciesLook, rng: np.random.Generator, d: float) -> None:
    """Stem, leaves, flowers and roots of one specimen, in a random pose."""
    centre_x = 0.30 + rng.uniform(-0.04, 0.04) * d
    base_y = (0.80 if look.arrangement == "rosette" else 0.87) + rng.uniform(-0.025, 0.02) * d
    pose = _Pose((centre_x, base_y), rng.normal(0, 5 * d), 1 + rng.uniform(-0.06, 0.06) * d,
                 canvas.unit)
    height = look.stem_height * (0.75 if look.arrangement == "rosette" else 1.0)
    stem = _stem_points(look, rng, d, height)
    rgb = _leaf_colours(look, rng, d)
    leaves = _node_leaves(look, rng, d, stem)
    _draw_roots(canvas, pose, rng)
    stem_width = look.stem_width * (0.6 if look.arrangement == "rosette" else 1.0)
    canvas.draw.line(pose.apply(stem), fill=canvas.tone(look.stem_rgb), width=canvas.px(stem_width),
                     joint="curve")
    for leaf in leaves:
        if rng.random() < 0.05 * d:  # lost in collecting or pressing
            continue
        _draw_leaf(canvas, pose, look, rng, d, leaf, look.leaf_len, rgb)
    _draw_flowers(canvas, pose, look, rng, stem[-1])
    _draw_tape(canvas, pose, rng, stem)


@lru_cache(maxsize=8)
def _noise_tile(width: int, height: int, difficulty: float) -> Image.Image:
    """Paper texture and sensor noise, centred on 128, a little larger than the image.

    Drawn once per process from a fixed seed; each image takes a crop at a random offset,
    which is far cheaper than drawing full-size noise per image.
    """
    rng = np.random.default_rng(12345)
    pad = 32
    h, w = height + pad, width + pad
    fine = rng.normal(0, 2.0 + 2.0 * difficulty, size=(h, w, 1)) + rng.normal(0, 1.0, size=(h, w, 3))
    coarse = rng.normal(0, 2.0, size=(max(2, h // 40), max(2, w // 40)))
    coarse = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((w, h), Image.BILINEAR))
    tile = np.clip(128 + fine + coarse[:, :, None], 0, 255).astype(np.uint8)
    return Image.fromarray(tile, "RGB")


def _add_noise(image: Image.Image, rng: np.random.Generator, difficulty: float) -> Image.Image:
    tile = _noise_tile(image.width, image.height, float(difficulty))
    x, y = (int(v) for v in rng.integers(0, 33, size=2))
    crop = tile.crop((x, y, x + image.width, y + image.height))
    return ImageChops.add(image, crop, scale=1.0, offset=-128)


def render_sheet(look: SpeciesLook, institution: InstitutionLook, rng: np.random.Generator,
                 long_edge: int = 1000, difficulty: float = 1.0) -> Image.Image:
    """Draw one herbarium sheet.

    Args:
        look: the species' fixed appearance.
        institution: paper, colour cast and layout of the contributing herbarium.
        rng: the image's own generator (all randomness of this image comes from it).
        long_edge: image height in pixels (sheets are portrait, width = 0.68 x height).
        difficulty: scale of the intra-class variation (see the module docstring).

    Returns:
        An RGB image, ``long_edge`` pixels high.
    """
    d = float(difficulty)
    height = int(long_edge)
    width = max(1, int(round(height * SHEET_ASPECT)))
    # Small images are drawn at twice the size and reduced: cheap anti-aliasing that keeps
    # thin veins and stems visible after downscaling.
    ss = 2 if height <= 400 else 1
    # Per-photograph white balance and exposure drift around the institution's cast.
    warm, green = rng.normal(0, 0.008 * d), rng.normal(0, 0.004 * d)
    cast = np.asarray(institution.cast) * np.array([1 + warm, 1 + green, 1 - warm]) \
        * (1 + rng.normal(0, 0.015 * d))
    canvas = _Canvas(width * ss, height * ss, np.asarray(institution.paper), cast)
    label = _draw_label(canvas, rng, institution, d)
    if rng.random() < 0.3:
        _draw_packet(canvas, rng)
    _draw_plant(canvas, look, rng, d)
    _draw_chart(canvas, institution)
    if institution.barcode:
        _draw_barcode(canvas, rng, label)
    image = canvas.image.reduce(ss) if ss > 1 else canvas.image
    return _add_noise(image, rng, d)


def _render_job(job: tuple) -> None:
    """Worker: draw one sheet and save it as JPEG (top-level so that it pickles)."""
    path, look, inst, key, long_edge, difficulty = job
    rng = np.random.default_rng(np.random.SeedSequence(list(key)))
    image = render_sheet(look, inst, rng, long_edge, difficulty)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=JPEG_QUALITY)


# ----------------------------------------------------------------------------- writing


def _pool_context():
    """fork on Linux, the platform default elsewhere.

    spawn would re-run the caller's ``__main__`` in every worker, which breaks plain scripts
    that call synthesize() without an ``if __name__ == "__main__"`` guard. fork is safe here
    even after torch was imported: the workers only use numpy and PIL, never torch's threads.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _render_all(jobs: list[tuple], workers: int, progress: bool) -> None:
    bar = progress_bar(total=len(jobs), desc="synth", unit="img", enabled=progress, leave=True)
    try:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                _render_job(job)
                bar.update()
            return
        with _pool_context().Pool(workers) as pool:
            chunk = max(1, len(jobs) // (workers * 16))
            for _ in pool.imap_unordered(_render_job, jobs, chunksize=chunk):
                bar.update()
    finally:
        bar.close()


def _train_metadata(plan: _Plan, seed: int) -> dict:
    taxa = plan.taxa
    images = [{"image_id": image_id, "file_name": file_name, "license": plan.inst_licenses[inst]}
              for image_id, file_name, _, inst, _ in plan.train]
    annotations = [{"image_id": image_id, "category_id": taxa[t_i].category_id,
                    "genus_id": taxa[t_i].genus_id, "institution_id": inst}
                   for image_id, _, t_i, inst, _ in plan.train]
    # Annotations are listed in another order than images: readers must join on image_id.
    order = np.random.default_rng([seed, 7002]).permutation(len(annotations))
    categories = [{"category_id": t.category_id, "scientificName": f"{t.genus} {t.epithet}",
                   "authors": t.authors, "family": t.family, "genus": t.genus,
                   "species": t.epithet} for t in taxa]
    return {"annotations": [annotations[i] for i in order], "categories": categories,
            "genera": plan.genera, "images": images, "distances": plan.distances,
            "institutions": plan.institutions, "license": list(LICENSES)}


def _write_csv(path: Path, rows: list[tuple]) -> None:
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("Id", "Predicted"))
        writer.writerows(rows)


def _write_metadata(out: Path, plan: _Plan, seed: int) -> None:
    """Write the CSVs and JSON files; train_metadata.json, the dataset's marker, goes last."""
    test_rows = [(image_id, plan.taxa[t_i].category_id) for image_id, _, t_i, _, _ in plan.test]
    _write_csv(out / "test_solution.csv", test_rows)
    default = plan.taxa[0].category_id
    _write_csv(out / "sample_submission.csv", [(image_id, default) for image_id, _ in test_rows])
    write_json(out / "test_metadata.json",
               [{"image_id": image_id, "file_name": file_name, "license": plan.inst_licenses[inst]}
                for image_id, file_name, _, inst, _ in plan.test])
    write_json(out / "train_metadata.json", _train_metadata(plan, seed))


def _check_arguments(species, seed, long_edge, min_images, max_images, test_per_species, institutions,
                     difficulty) -> None:
    problems = []
    if seed < 0:
        problems.append(f"--seed must be >= 0 (got {seed})")
    if species < 1:
        problems.append(f"--species must be at least 1 (got {species})")
    if long_edge < 32:
        problems.append(f"--long-edge must be at least 32 pixels (got {long_edge})")
    if not 1 <= min_images <= max_images <= 999:
        problems.append(f"need 1 <= --min-images <= --max-images <= 999 "
                        f"(got {min_images} and {max_images})")
    if test_per_species < 0:
        problems.append(f"--test-per-species must be >= 0 (got {test_per_species})")
    if institutions < 1:
        problems.append(f"--institutions must be at least 1 (got {institutions})")
    if not difficulty >= 0:
        problems.append(f"--difficulty must be >= 0 (got {difficulty})")
    if problems:
        raise HerbensError("synth: " + "; ".join(problems))


def synthesize(out_dir, species: int = 40, seed: int = 0, long_edge: int = 1000,
               min_images: int = 3, max_images: int = 80, test_per_species: int = 2,
               institutions: int = 5, progress: bool = True, difficulty: float = 1.0,
               workers: int | None = None) -> dict:
    """Write a synthetic herbarium dataset in the Kaggle Herbarium 2022 layout.

    Images are written first and the metadata last (atomically), and metadata left by an
    earlier run in ``out_dir`` is removed before drawing, so an interrupted run never leaves
    metadata that parses.

    Args:
        out_dir: dataset directory (created if needed).
        species: number of species (category_ids are not contiguous).
        seed: the same seed gives byte-identical metadata and images.
        long_edge: image height in pixels (portrait sheets, width = 0.68 x height).
        min_images: training images of the rarest species.
        max_images: training images of the most common species (a power law in between).
        test_per_species: test images per species.
        institutions: number of contributing herbaria (paper, colour cast, layout).
        progress: show progress (herbens.progress).
        difficulty: scale of intra-class variation and noise (0 = none, 1 = default).
        workers: drawing processes; default ``os.cpu_count()``. The output does not depend on it.

    Returns:
        A summary: ``out_dir``, ``species``, ``genera``, ``families``, ``institutions``,
        ``train_images``, ``test_images``, ``min_per_species``, ``max_per_species``,
        ``long_edge``, ``seed``, ``seconds``.

    Raises:
        HerbensError: an argument is out of range or the directory cannot be written.
    """
    _check_arguments(species, seed, long_edge, min_images, max_images, test_per_species, institutions,
                     difficulty)
    started = time.perf_counter()
    out = Path(out_dir)
    plan = _plan(species, seed, min_images, max_images, test_per_species, institutions)
    for name in METADATA_FILES:
        (out / name).unlink(missing_ok=True)
    jobs = []
    for folder, records in (("train_images", plan.train), ("test_images", plan.test)):
        for _, file_name, t_i, inst, key in records:
            jobs.append((str(out / folder / file_name), plan.taxa[t_i].look,
                         plan.inst_looks[inst], key, int(long_edge), float(difficulty)))
    try:
        out.mkdir(parents=True, exist_ok=True)
        _render_all(jobs, workers or os.cpu_count() or 1, progress)
    except OSError as exc:
        raise HerbensError(f"synth: cannot write images under {out}: {exc}") from exc
    _write_metadata(out, plan, seed)
    counts = np.bincount([t_i for _, _, t_i, _, _ in plan.train], minlength=len(plan.taxa))
    return {
        "out_dir": str(out), "species": len(plan.taxa), "genera": len(plan.genera),
        "families": len({t.family for t in plan.taxa}), "institutions": institutions,
        "train_images": len(plan.train), "test_images": len(plan.test),
        "min_per_species": int(counts.min()), "max_per_species": int(counts.max()),
        "long_edge": int(long_edge), "seed": int(seed),
        "seconds": round(time.perf_counter() - started, 2),
    }
