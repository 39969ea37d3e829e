"""The members' embeddings of every predicted sheet, written beside the names
(``herbens predict ... --embeddings``), so that enrolment, search or a later re-scoring need not
decode the images again.

``names.csv`` -> ``names.embeddings/``:

- ``sheets.json``: what the folder holds (the bundle's and the input list's hashes, the output
  it belongs to, the members, the split name and the number of rows); its presence marks the
  folder as written by ``herbens predict``, the only kind of folder ``--embeddings`` replaces;
- ``<member>/embeddings/predict/``: one embeddings store per member in the run stores'
  conventions (:mod:`herbens.stores.embeddings`: unit float16 rows, ``image_ids.json``,
  ``meta.json`` with the member's views, ``tta_space``, model and the bundle's taxonomy hash),
  read with ``read_embeddings(folder / member, "predict")``.

The ids are the predicted paths as the input listed them, in input order; an unreadable image
has no row (it is in the output's failures), and a path listed twice has one row. The shards of
each block (:mod:`herbens.bundle.collection`) hold each member's embeddings in float32, exactly
as the predict loop returned them, so a store here equals ``herbens infer --embeddings`` of the
same images and views. The whole folder appears at once (``atomic_dir``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from herbens.bundle.collection import array_path, shard_block
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_dir, load_npy, replaceable, write_json
from herbens.core.progress import progress_bar
from herbens.stores.embeddings import open_embeddings_writer

MARKER = "sheets.json"
SPLIT = "predict"


def embeddings_folder(output: Path) -> Path:
    """The default folder beside ``output`` (``names.csv`` -> ``names.embeddings``)."""
    return output.with_suffix(".embeddings")


def array_name(member: str) -> str:
    """The name of a member's embeddings among a block's arrays."""
    return f"embeddings-{member}"


def check_embeddings_folder(folder: Path) -> None:
    """Refuse, before any prediction, a folder ``--embeddings`` would wrongly replace."""
    if not replaceable(folder, MARKER):
        raise HerbensError(f"--embeddings {folder}: exists and was not written by herbens predict (no {MARKER}); "
                           "choose another folder or remove it")


def embedding_meta(bundle, member, bundle_hash: str) -> dict:
    """The store's record of how a member's embeddings were computed."""
    return {"taxonomy_hash": bundle.taxonomy.hash, "model": member.name, "views": member.views,
            "tta_space": member.tta_space, "bundle": bundle_hash}


def _rows_of_shards(shards: list[Path]) -> tuple[list[str], list[np.ndarray]]:
    """The ids (first listing of each readable path) and, per shard, which readable rows they are."""
    ids, keep, seen = [], [], set()
    for shard in shards:
        table = pq.read_table(shard, columns=["path", "record"]).to_pydict()
        mask = []
        for path, record in zip(table["path"], table["record"]):
            if record is None:
                continue
            mask.append(path not in seen)
            if mask[-1]:
                seen.add(path)
                ids.append(path)
        keep.append(np.array(mask, dtype=bool))
    return ids, keep


def write_sheet_embeddings(folder: Path, bundle, shards: list[Path], made_from: dict, output: Path,
                           progress: bool = True) -> int:
    """Write every member's store from the shards' arrays into ``folder``; returns the row count."""
    check_embeddings_folder(folder)
    ids, keep = _rows_of_shards(shards)
    bar = progress_bar(total=len(shards) * len(bundle.members), desc="embeddings", unit="block", enabled=progress)
    with atomic_dir(folder) as tmp:
        for member in bundle.members:
            dim = int(member.model.embedding_dim)
            with open_embeddings_writer(tmp / member.name, SPLIT, ids, dim,
                                        embedding_meta(bundle, member, made_from["bundle"])) as writer:
                row = 0
                for shard, mask in zip(shards, keep):
                    if mask.any():
                        path = array_path(shard.parent, shard_block(shard), array_name(member.name))
                        block = load_npy(path)
                        if block.shape != (len(mask), dim):
                            raise HerbensError(f"{path}: holds {block.shape}, expected ({len(mask)}, {dim}); "
                                               f"delete {shard.parent} and predict again")
                        writer.write(row, block[mask])
                        row += int(mask.sum())
                    bar.update(1)
        write_json(tmp / MARKER, {"output": output.name, "bundle": made_from["bundle"], "input": made_from["input"],
                                  "split": SPLIT, "members": [m.name for m in bundle.members], "rows": len(ids)})
    bar.close()
    return len(ids)
