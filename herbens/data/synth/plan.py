"""The whole synthetic dataset decided from the seed before any image is drawn: taxa,
category ids, long-tailed counts, institutions, file names and genus distances."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from herbens.data.synth.looks import (PAPER_TONES, InstitutionLook, SpeciesLook, camera_cast,
                                      family_looks, genus_looks, species_levels, species_look)
from herbens.data.synth.names import (random_authors, random_epithet, random_family_name,
                                      random_genus_name, unique_name)

COLLECTION_CODES = ("NY", "MO", "US", "F", "GH", "MICH", "TEX", "RSA", "CAS", "UC", "COLO",
                    "WIS", "MIN", "OSC", "WTU", "ASU", "FLAS", "DUKE", "NCU", "BRIT", "ISC",
                    "KANU", "MSC", "ILL", "OKL", "RM", "SD", "ARIZ", "LSU", "VDB")

LICENSES = (
    {"id": 0, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"},
    {"id": 1, "name": "CC BY 4.0", "url": "https://creativecommons.org/licenses/by/4.0/"},
    {"id": 2, "name": "CC BY-NC 4.0", "url": "https://creativecommons.org/licenses/by-nc/4.0/"},
)


@dataclass
class Taxon:
    """One species during planning: names, ids and look."""

    family: str
    genus: str
    genus_id: int
    epithet: str
    authors: str
    look: SpeciesLook
    category_id: int = -1


@dataclass
class Plan:
    """The whole dataset before any image is drawn."""

    taxa: list
    genera: list
    institutions: list
    inst_looks: list
    inst_licenses: list
    train: list  # (image_id, file_name, taxon index, institution_id, seed key)
    test: list
    distances: list


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


def _group_counts(species: int) -> tuple[int, int]:
    """Numbers of genera and families: power laws through (40 species, 16 genera, 6 families)
    and NAFlora-1M's (15,501 species, ~2,564 genera, ~272 families)."""
    genera = min(species, max(min(2, species), round(0.69 * species ** 0.852)))
    families = min(genera, max(min(2, genera), round(0.75 * genera ** 0.751)))
    return genera, families


def _make_taxa(rng: np.random.Generator, species: int) -> tuple[list[Taxon], list[dict]]:
    """Invent families, genera and species with uneven group sizes and nested looks."""
    n_genera, n_families = _group_counts(species)
    genus_sizes = _partition(rng, species, n_genera, alpha=1.1)
    genera_per_family = _partition(rng, n_genera, n_families, alpha=1.0)
    fam_looks = family_looks(rng, n_families)
    used_genera: set = set()
    used_families: set = set()
    taxa: list[Taxon] = []
    genus_index = 0
    for fam_i, n_gen in enumerate(genera_per_family):
        gen_looks = genus_looks(rng, int(n_gen))
        names = [unique_name(lambda: random_genus_name(rng), used_genera) for _ in range(n_gen)]
        family = unique_name(lambda: random_family_name(names[0], rng), used_families)
        for gen_look, genus in zip(gen_looks, names):
            n_sp = int(genus_sizes[genus_index])
            genus_index += 1
            used_epithets: set = set()
            for levels in species_levels(rng, n_sp):
                taxa.append(Taxon(
                    family=family, genus=genus, genus_id=-1,
                    epithet=unique_name(lambda: random_epithet(rng), used_epithets),
                    authors=random_authors(rng),
                    look=species_look(fam_looks[fam_i], gen_look, levels)))
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
            cast=camera_cast(rng),
            label_corner=label_corner, chart_corner=str(rng.choice(chart_options)),
            barcode=bool(rng.random() < 0.75)))
        records.append({"institution_id": i, "collectionCode": codes[i]})
        licenses.append(int(rng.integers(len(LICENSES))))
    return records, looks, licenses


def _distances(rng: np.random.Generator, taxa: list[Taxon], genera: list[dict]) -> list[dict]:
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


def make_plan(species: int, seed: int, min_images: int, max_images: int, test_per_species: int,
          institutions: int) -> Plan:
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
    return Plan(taxa=taxa, genera=genera, institutions=inst_records, inst_looks=inst_looks,
                 inst_licenses=inst_licenses, train=train, test=test,
                 distances=_distances(rng, taxa, genera))
