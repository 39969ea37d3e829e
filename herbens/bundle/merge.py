"""The shards of a collection merged, in input order, into one CSV, JSON or Parquet file, and
the HTML page's sample of them (:mod:`herbens.bundle.collection`).

Shards are read one at a time, so memory holds one block and the page's sample, whatever the
number of images.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from herbens.core.fileio import atomic_write

OUTPUT_FORMATS = ("csv", "json", "parquet")
DEFAULT_PAGE_CAP = 1000


def as_frame(items: list[dict], top_k: int) -> pd.DataFrame:
    """The CSV table: one row per image, the top-k species as numbered columns."""
    table = []
    for item in items:
        row = {k: item[k] for k in ("path", "name", "rank", "reason", "decision")}
        for j, sp in enumerate(item["species"][:top_k], start=1):
            row.update({f"category_id_{j}": sp["category_id"], f"scientific_name_{j}": sp["scientific_name"],
                        f"authors_{j}": sp["authors"], f"probability_{j}": round(sp["probability"], 6)})
        row.update({k: item[k] for k in ("genus", "genus_probability", "family", "family_probability", "ood_score")})
        table.append(row)
    return pd.DataFrame(table)


def shard_items(paths: list[Path]) -> Iterator[tuple[list[tuple[int, dict]], list[tuple[str, str]]]]:
    """Per shard, in order: ``[(row, record)]`` of predicted images and ``[(path, error)]`` of the others."""
    for path in paths:
        table = pq.read_table(path).to_pydict()
        items = [(row, json.loads(text)) for row, text in zip(table["row"], table["record"]) if text is not None]
        failures = [(p, e) for p, e in zip(table["path"], table["error"]) if e is not None]
        yield items, failures


def count_predicted(paths: list[Path]) -> int:
    """Images with a record over every shard (only the ``error`` column is read)."""
    return sum(pq.read_table(p, columns=["error"]).column("error").null_count for p in paths)


@contextlib.contextmanager
def output_writer(output: Path, fmt: str, top_k: int, bundle, thresholds: dict):
    """A function ``write(items, failures)`` called per shard; the file appears complete at the end."""
    mode = "wb" if fmt == "parquet" else "w"
    with atomic_write(output, mode, **({} if fmt == "parquet" else {"newline": ""} if fmt == "csv" else {})) as handle:
        state = {"first": True, "parquet": None, "failures": []}

        def write(items: list[dict], failures: list[tuple[str, str]]) -> None:
            if fmt == "json":
                _json_items(handle, items, state, bundle, thresholds)
                state["failures"] += failures  # written after the predictions, as one list
            elif items and fmt == "csv":
                as_frame(items, top_k).to_csv(handle, index=False, header=state["first"], float_format="%.6g")
                state["first"] = False
            elif items:
                table = pa.Table.from_pandas(as_frame(items, top_k), preserve_index=False)
                if state["parquet"] is None:
                    state["parquet"] = pq.ParquetWriter(handle, table.schema)
                state["parquet"].write_table(table.cast(state["parquet"].schema))

        yield write
        if fmt == "json":
            _json_end(handle, state)
        elif state["parquet"] is not None:
            state["parquet"].close()


def _json_items(handle, items: list[dict], state: dict, bundle, thresholds: dict) -> None:
    """The JSON document as ``json.dump(..., indent=2)`` writes it, one record at a time."""
    if state["first"]:
        head = json.dumps({"bundle": str(bundle.path), "thresholds": thresholds}, indent=2)
        handle.write(head[:-2] + ',\n  "predictions": [')
        state["first"], state["any"] = False, False
    for item in items:
        handle.write(("," if state["any"] else "") + "\n" + textwrap.indent(json.dumps(item, indent=2), "    "))
        state["any"] = True


def _json_end(handle, state: dict) -> None:
    failed = json.dumps([{"path": p, "error": e} for p, e in state["failures"]], indent=2)
    close = "\n  ]" if state.get("any") else "]"
    handle.write(close + ',\n  "failed": ' + textwrap.indent(failed, "  ")[2:] + "\n}\n")


class PageSample:
    """What the HTML page shows of a large run: every ``unknown`` sheet up to ``cap``, then a
    uniform random sample (seeded) of the others to fill ``cap`` cards, and up to ``cap``
    failed files; the counts cover every image."""

    def __init__(self, cap: int, seed: int = 0):
        self.cap, self.rng = cap, random.Random(seed)
        self.counts: Counter = Counter()
        self.unknown: list[tuple[int, dict]] = []
        self.rest: list[tuple[int, dict]] = []
        self.others_seen = 0
        self.failures: list[tuple[str, str]] = []
        self.failed = 0

    def add(self, items: list[tuple[int, dict]], failures: list[tuple[str, str]]) -> None:
        for row, item in items:
            self.counts[item["decision"]] += 1
            if item["decision"] == "unknown" and len(self.unknown) < self.cap:
                self.unknown.append((row, item))
                continue
            self.others_seen += 1  # reservoir sampling: each other sheet kept with equal chance
            if len(self.rest) < self.cap:
                self.rest.append((row, item))
            else:
                j = self.rng.randrange(self.others_seen)
                if j < self.cap:
                    self.rest[j] = (row, item)
        self.failed += len(failures)
        self.failures += failures[:max(self.cap - len(self.failures), 0)]

    def shown(self, output: Path) -> tuple[list[dict], list[tuple[str, str]], dict, str]:
        """``(items, failures, counts, note)`` for :func:`herbens.bundle.page.write_page`, items in input order."""
        room = max(self.cap - len(self.unknown), 0)
        picked = [self.rest[i] for i in sorted(self.rng.sample(range(len(self.rest)), min(room, len(self.rest))))]
        items = [item for _, item in sorted(self.unknown + picked, key=lambda pair: pair[0])]
        counts = dict(self.counts, **({"failed": self.failed} if self.failed else {}))
        total_unknown = self.counts.get("unknown", 0)
        left = sum(self.counts.values()) - len(items) + self.failed - len(self.failures)
        if not left:
            return items, self.failures, counts, ""
        note = (f"This page shows {len(items)} of {sum(self.counts.values())} predicted sheets: "
                f"{len(self.unknown)} of {total_unknown} unknown, a random sample of {len(picked)} of the "
                f"{self.others_seen} others" + (f", and {len(self.failures)} of {self.failed} failed files"
                                                if self.failed else "")
                + f" (--page-cap {self.cap}); every sheet is in {output.name}.")
        return items, self.failures, counts, note


def report_failures(failures: list[tuple[str, str]]) -> None:
    for path, error in failures:
        print(f"failed {path}: {error}", file=sys.stderr)


def finite(values: dict) -> dict:
    return {k: (float(v) if np.isfinite(v) else None) for k, v in values.items()}
