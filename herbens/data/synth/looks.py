"""The looks of the synthetic taxa and herbaria: nested family, genus and species cues."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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

PAPER_TONES = ((241, 235, 216), (236, 229, 207), (245, 242, 231), (231, 224, 201),
               (244, 238, 222), (238, 233, 219))

FLOWER_COLOURS = ((150, 90, 140), (205, 180, 80), (225, 220, 200), (140, 70, 60),
                  (110, 110, 160), (190, 120, 60))


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


def family_looks(rng: np.random.Generator, n: int) -> list[dict]:
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


def genus_looks(rng: np.random.Generator, n: int) -> list[dict]:
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


def species_levels(rng: np.random.Generator, n: int) -> list[tuple[int, int, int, int]]:
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


def species_look(fam: dict, gen: dict, levels: tuple[int, int, int, int]) -> SpeciesLook:
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


def camera_cast(rng: np.random.Generator) -> tuple[float, float, float]:
    """A camera colour cast: mostly warm/cool (red against blue), a little green/magenta.

    Independent channel gains would tint paper pink or violet, which real scans rarely are.
    """
    warm, green = rng.uniform(-0.035, 0.035), rng.uniform(-0.012, 0.012)
    return (1.0 + warm, 1.0 + green, 1.0 - warm)
