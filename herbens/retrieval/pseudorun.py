"""A retrieval scorer's logits as a pseudo-run the ensembler accepts like any trained run.

The pseudo-run folder holds the source run's ``taxonomy.json`` and ``split.csv`` (so classes
and validation rows line up), ``logits/{val,test}/`` for every level, and ``retrieval.json``
(source, method, fitted values, validation scores). Genus and family scores are the log-sum-exp
of their member species' scores: the log of the summed (unnormalised) species probabilities.
The folder is assembled under a temporary name and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import sparse

from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_dir, write_json
from herbens.core.progress import progress_bar
from herbens.data.taxonomy import LEVELS, Taxonomy
from herbens.stores.embeddings import EmbeddingsSplit, iter_chunks
from herbens.stores.logits import open_logits_writer


def derived_logits(species: np.ndarray, taxonomy: Taxonomy) -> dict[str, np.ndarray]:
    """Per-level scores from species scores ``[q, C]``: genus/family = log-sum-exp over members."""

    out = {"species": species}
    for level in LEVELS[1:]:
        groups = taxonomy.level_map(level)
        # Shift by each group's own best member, not the row's best: with a sharp temperature
        # (ArcFace embeddings fit T ~ 0.01) a whole genus can sit hundreds below the row's best
        # species, where exp underflows to 0 and the log of the sum is -inf.
        group_max = _group_max(np.asarray(species, dtype=np.float64), groups, taxonomy.num_classes(level))
        expo = np.exp(species - group_max[:, groups])
        member = sparse.csr_matrix((np.ones(len(groups)), (np.arange(len(groups)), groups)),
                                   shape=(len(groups), taxonomy.num_classes(level)))
        out[level] = (np.log(np.asarray(expo @ member)) + group_max).astype(np.float32)
    return out


def _group_max(scores: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """``[q, G]``: each row's best score among each group's members (-inf for a group without any)."""
    order = np.argsort(groups, kind="stable")
    ordered = groups[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    out = np.full((len(scores), num_groups), -np.inf)
    out[:, ordered[starts]] = np.maximum.reduceat(scores[:, order], starts, axis=1)
    return out


def write_pseudo_run(source: Path, output: Path, taxonomy: Taxonomy, splits: dict[str, EmbeddingsSplit],
                     scores: Callable[[str, int, np.ndarray], np.ndarray], record: dict, chunk_rows: int = 2048,
                     progress: bool = True) -> Path:
    """Score each split's embeddings chunk by chunk and write the pseudo-run atomically.

    Args:
        source: the run the embeddings come from (its ``split.csv`` is copied).
        output: pseudo-run directory (replaced atomically if it exists).
        taxonomy: the source run's taxonomy.
        splits: split name -> its embeddings (``val`` carries labels).
        scores: (split name, first row, unit query block ``[q, D]``) -> species logits ``[q, C]``.
        record: written as ``retrieval.json`` (method, fitted values, scores).
        chunk_rows: query rows per chunk (memory ~ chunk_rows x classes x 4 bytes x a few).
    """
    output = Path(output)
    if output.resolve() == Path(source).resolve():
        raise HerbensError(f"retrieval output {output} is the source run itself; choose another -o")
    with atomic_dir(output) as tmp:
        taxonomy.save(tmp / "taxonomy.json")
        if (Path(source) / "split.csv").exists():
            shutil.copyfile(Path(source) / "split.csv", tmp / "split.csv")
        for name, split in splits.items():
            columns = {level: taxonomy.num_classes(level) for level in LEVELS}
            meta = {"taxonomy_hash": taxonomy.hash, "model": f"retrieval:{record['method']}",
                    "views": split.meta.get("views", []), "source_run": str(source)}
            with open_logits_writer(tmp, name, split.image_ids, columns, meta, labels=split.labels) as writer:
                chunks = iter_chunks(split, chunk_rows)
                for start, _, block in progress_bar(chunks, total=-(-len(split) // chunk_rows),
                                                    desc=f"retrieval {name}", unit="chunk", enabled=progress):
                    for level, values in derived_logits(scores(name, start, block), taxonomy).items():
                        writer.write(level, start, values)
        write_json(tmp / "retrieval.json", record)
    return output
