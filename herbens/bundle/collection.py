"""Predict a whole collection: input read in blocks, results in Parquet shards, resumable,
split across processes.

Each block of ``block`` input paths is predicted by one process (block ``b`` by rank
``b % world``) with :func:`herbens.bundle.predict.predict_paths` (the one loop of ``herbens
infer``, :mod:`herbens.infer.loop`) and written atomically as ``<output>.parts/block-<b>.parquet``:
one row per input path (``row``, ``path``, ``record``: the JSON of the output record, or
``error``), after the block's arrays, if any (``block-<b>.<name>.npy``: a member's embeddings of
its readable rows, for ``--embeddings``). A block is done when its shard exists, so a killed run, started again with the same
command, predicts only the missing blocks. ``manifest.json`` records what the shards were made
from (the bundle's hash, the input list's hash, the options that change a record); another
bundle, input or option with the same output is refused, naming what differs. Once every block
is done the first process merges the shards, in input order, into the CSV, JSON or Parquet
output (:mod:`herbens.bundle.merge`) and removes the parts folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from accelerate import PartialState

from herbens.bundle.inputs import LIST_SUFFIXES, collect_inputs, iter_listed_paths
from herbens.bundle.load import MANIFEST as BUNDLE_MANIFEST
from herbens.core.errors import HerbensError
from herbens.core.fileio import atomic_write, file_sha256, read_json, save_npy, write_json
from herbens.core.progress import progress_bar
from herbens.core.runtime import launched_on_cpus_only

MANIFEST = "manifest.json"
DEFAULT_BLOCK = 1024
FORMAT_VERSION = 1
SHARD_SCHEMA = pa.schema([("row", pa.int64()), ("path", pa.string()), ("record", pa.string()),
                          ("error", pa.string())])


def parts_dir(output: Path) -> Path:
    """The folder of shards beside ``output`` (``predictions.csv`` -> ``predictions.csv.parts``)."""
    return output.with_name(output.name + ".parts")


def shard_path(work: Path, block: int) -> Path:
    return work / f"block-{block:08d}.parquet"


def shard_block(shard: Path) -> int:
    """The block number of a shard (``block-00000007.parquet`` -> 7)."""
    return int(shard.stem.split("-")[1])


def array_path(work: Path, block: int, name: str) -> Path:
    """A block's array ``name`` (a member's embeddings), written before the block's shard."""
    return work / f"block-{block:08d}.{name}.npy"


# ----- processes ----------------------------------------------------------------------------------
class Processes:
    """This process's rank among ``world`` (torchrun / accelerate launch) and its device.

    One process: ``device`` as given, else the accelerator when one is present. Several: the
    device Accelerate gives this rank (gloo on CPU-only machines, as training does).
    """

    def __init__(self, device: str | None):
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.state = PartialState(cpu=launched_on_cpus_only()) if world > 1 else None
        if self.state is not None:
            self.rank, self.world, self.device = self.state.process_index, self.state.num_processes, str(self.state.device)
        else:
            self.rank, self.world = 0, 1
            self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc) -> None:
        # Each process tears its process group down before the interpreter exits, as training's
        # end_training does: left to the exit handlers, gloo's threads can abort the process
        # ("terminate called without an active exception") while another rank still merges.
        if self.state is not None:
            self.state.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def run_everywhere(self, work: Callable[[], int], what: str) -> int:
        """``work()`` on every process, then all learn whether each succeeded.

        A process that failed would otherwise leave the others waiting for ever at the next
        barrier; here every one raises instead: its own error, or HerbensError naming ``what``.
        """
        error, result = None, 0
        try:
            result = work()
        except Exception as exc:  # raised below, once every process knows
            error = exc
        if self.state is not None:
            failed = torch.tensor([int(error is not None)], device=self.state.device)
            torch.distributed.all_reduce(failed)
            if error is None and int(failed.item()):
                raise HerbensError(f"another process failed {what}; its error is in its output")
        if error is not None:
            raise error
        return result


# ----- input --------------------------------------------------------------------------------------
class InputList:
    """The paths to predict, read in blocks: a ``.txt``/``.lst``/``.csv`` list is streamed, never
    read whole; a folder or a single image is listed by :func:`collect_inputs`."""

    def __init__(self, source: str | Path):
        self.source = Path(source)
        self.streamed = self.source.is_file() and self.source.suffix.lower() in LIST_SUFFIXES
        self.paths, self.skipped = (None, []) if self.streamed else collect_inputs(self.source)

    def digest(self) -> str:
        """sha256 of the list file's bytes, or of the listed paths."""
        if self.streamed:
            return file_sha256(self.source)
        return hashlib.sha256("\n".join(self.paths).encode("utf-8")).hexdigest()

    def blocks(self, size: int) -> Iterator[list[str]]:
        """Consecutive blocks of ``size`` paths (the last one shorter)."""
        entries = iter_listed_paths(self.source) if self.streamed else iter(self.paths)
        part, any_path = [], False
        for path in entries:
            part.append(path)
            any_path = True
            if len(part) == size:
                yield part
                part = []
        if part:
            yield part
        if not any_path:
            raise HerbensError(f"{self.source}: the list names no image")


# ----- manifest -----------------------------------------------------------------------------------
def bundle_digest(bundle) -> str:
    """sha256 of the bundle's manifest (which holds the hash of every file, enrolments included)."""
    return file_sha256(Path(bundle.path) / BUNDLE_MANIFEST)


def check_parts(work: Path, made_from: dict) -> None:
    """Refuse shards in ``work`` made from another bundle, input or options, naming each difference."""
    manifest = work / MANIFEST
    if not manifest.exists():
        return
    recorded = read_json(manifest).get("made_from", {})
    differ = [f"{key}: {recorded.get(key)!r} there, {value!r} now" for key, value in made_from.items()
              if recorded.get(key) != value]
    if differ:
        raise HerbensError(f"{work} holds the shards of another prediction ({'; '.join(differ)}); "
                           f"choose another output, or delete {work} to start again")


def open_parts(work: Path, made_from: dict) -> None:
    """Create ``work`` and its manifest unless they exist (checked by :func:`check_parts`)."""
    if not (work / MANIFEST).exists():
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / MANIFEST, {"made_from": made_from, "blocks_done": []})


def done_blocks(work: Path) -> list[int]:
    return sorted(shard_block(p) for p in work.glob("block-*.parquet"))


def record_done(work: Path) -> None:
    """Rewrite the manifest's list of done blocks (the first process, between blocks)."""
    manifest = read_json(work / MANIFEST)
    write_json(work / MANIFEST, {**manifest, "blocks_done": done_blocks(work)})


# ----- blocks -------------------------------------------------------------------------------------
def block_table(part: list[str], start: int, items: list[dict], failed: dict[str, str]) -> pa.Table:
    """One shard: every path of the block with its output record (JSON, ``items`` in the order
    of the readable paths) or its error (``failed``: path -> message)."""
    records = iter(items)
    texts = [None if path in failed else json.dumps(next(records)) for path in part]
    errors = [failed.get(path) for path in part]
    return pa.Table.from_arrays([pa.array(range(start, start + len(part)), pa.int64()), pa.array(part, pa.string()),
                                 pa.array(texts, pa.string()), pa.array(errors, pa.string())], schema=SHARD_SCHEMA)


def write_shard(path: Path, table: pa.Table) -> None:
    """Atomically: a killed run leaves the whole shard or none."""
    with atomic_write(path, "wb") as handle:
        pq.write_table(table, handle)


BlockPredictor = Callable[[list[str]], tuple[list[dict], dict[str, str], dict[str, np.ndarray]]]


def predict_blocks(predict: BlockPredictor, inputs: InputList, work: Path, block: int, procs: Processes,
                   progress: bool = True) -> int:
    """Predict this process's blocks that have no shard yet; returns the number of blocks.

    ``predict(paths) -> (records of the readable paths in order, {path: error}, {name: array})``;
    the arrays (rows: the readable paths) are saved first, so a block with a shard has them all.
    """
    count, done = 0, set(done_blocks(work))
    bar = progress_bar(desc="predict", unit="block", enabled=progress and procs.is_main)
    for b, part in enumerate(inputs.blocks(block)):
        count += 1
        if b % procs.world != procs.rank or b in done:
            continue
        items, failed, arrays = predict(part)
        for name, array in arrays.items():
            save_npy(array_path(work, b, name), array)
        write_shard(shard_path(work, b), block_table(part, b * block, items, failed))
        bar.update(1)
        if procs.is_main:
            record_done(work)
    bar.close()
    return count


def remove_parts(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
