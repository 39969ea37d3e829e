"""Test helper: ``herbens predict`` that SIGKILLs itself right after its N-th shard is written.

Launched by ``tests/test_collection.py`` as ``python tests/predict_killer.py N predict ARGS...``:
a deterministic stand-in for a machine lost mid-run (no timing involved).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import herbens.bundle.collection as collection  # noqa: E402
from herbens.cli.main import main  # noqa: E402

LIMIT = int(sys.argv[1])
real_write = collection.write_shard
written = []


def write_then_die(path, table):
    real_write(path, table)
    written.append(path)
    if len(written) == LIMIT:
        os.kill(os.getpid(), signal.SIGKILL)


collection.write_shard = write_then_die
sys.exit(main(sys.argv[2:]))
