"""Invented Latin names: genera, families (type genus + -aceae), epithets and authors."""

from __future__ import annotations

import numpy as np

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


def _syllables(rng: np.random.Generator, count: int) -> str:
    return "".join(str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(count))


def unique_name(make, used: set) -> str:
    # Names come from a large space; a few retries always suffice, the suffix is a safety net.
    for _ in range(50):
        name = make()
        if name not in used:
            used.add(name)
            return name
    name = f"{make()}{len(used)}"
    used.add(name)
    return name


def random_genus_name(rng: np.random.Generator) -> str:
    stem = _syllables(rng, int(rng.integers(2, 4)))
    ending = str(rng.choice(_GENUS_ENDINGS))
    if ending[0] in "aeiouy":
        stem = stem.rstrip("aeiouy")  # "Chodae" + "a" -> "Choda", not "Chodaea"
    return (stem + ending).capitalize()


def random_family_name(type_genus: str, rng: np.random.Generator) -> str:
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


def random_epithet(rng: np.random.Generator) -> str:
    if rng.random() < 0.2:  # eponyms such as "smithii" or "greeneana"
        return str(_syllables(rng, 2) + rng.choice(("ii", "iana")))
    return str(rng.choice(_EPITHET_ROOTS) + rng.choice(_EPITHET_ENDINGS))


def random_authors(rng: np.random.Generator) -> str:
    first = str(rng.choice(AUTHORS))
    if rng.random() < 0.3:  # a combination: "(Basionym author) Combining author"
        return f"({first}) {rng.choice(AUTHORS)}"
    return first
