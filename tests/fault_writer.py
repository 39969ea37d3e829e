"""Test helper: write numbered generations of logits, a checkpoint pointer and a submission.

Run by ``tests/test_faults.py`` as a subprocess that is killed (SIGKILL) mid-write or that runs
into a full disk::

    python tests/fault_writer.py DIR --start G [--count N] [--rows R] [--cols C]
        [--what logits pointer submission]

Generation ``g`` writes, with herbens' own writers, into ``DIR``:

- ``run/logits/test/``: species logits ``[R, C]`` all equal to ``g``, meta ``{"generation": g}``;
- ``run/checkpoints/latest.json``: the pointer to ``run/checkpoints/gen<g>`` (a folder made first,
  as ``save_checkpoint`` saves the state before it moves the pointer);
- ``submission.csv``: ``R`` rows ``Id=i, Predicted=g``.

Before each step it prints ``<what> <g>`` and at the end of a generation ``end <g>`` (flushed),
so the test knows what was in progress when it killed the process. ``--count 0`` loops until
killed. A HerbensError (a full disk, say) prints ``herbens: error: ...`` and exits with 2.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from herbens.ensemble.submission import write_submission  # noqa: E402
from herbens.core.errors import HerbensError  # noqa: E402
from herbens.core.fileio import write_json  # noqa: E402
from herbens.stores.logits import write_logits  # noqa: E402
from herbens.training.checkpoint import POINTER, checkpoint_dir  # noqa: E402

WHAT = ("logits", "pointer", "submission")


def image_ids(rows: int) -> list[str]:
    return [f"img{i:07d}" for i in range(rows)]


def write_generation(out: Path, generation: int, rows: int, cols: int, what: tuple[str, ...]) -> None:
    run = out / "run"
    ids = image_ids(rows)
    if "logits" in what:
        announce("logits", generation)
        logits = np.full((rows, cols), generation, dtype=np.float16)
        write_logits(run, "test", ids, {"species": logits},
                     {"taxonomy_hash": "0" * 16, "generation": generation})
    if "pointer" in what:
        announce("pointer", generation)
        folder = checkpoint_dir(run) / f"gen{generation:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_json(checkpoint_dir(run) / POINTER, {"checkpoint": folder.name, "step": generation})
    if "submission" in what:
        announce("submission", generation)
        write_submission(out / "submission.csv", ids, np.full(rows, generation, dtype=np.int64))
    announce("end", generation)


def announce(step: str, generation: int) -> None:
    print(f"{step} {generation}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--start", type=int, default=1)
    parser.add_argument("--count", type=int, default=1, help="generations to write; 0 = until killed")
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--cols", type=int, default=100)
    parser.add_argument("--what", nargs="+", choices=WHAT, default=list(WHAT))
    args = parser.parse_args(argv)
    generations = itertools.count(args.start) if args.count == 0 else range(args.start, args.start + args.count)
    try:
        for generation in generations:
            write_generation(args.out, generation, args.rows, args.cols, tuple(args.what))
    except HerbensError as exc:
        print(f"herbens: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
