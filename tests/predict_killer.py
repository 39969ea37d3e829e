"""Test helper: ``herbens predict`` that SIGKILLs itself right after its N-th shard is written,
or (``N`` = ``fail-rank-1``) whose second process fails writing its first shard.

Launched by ``tests/test_collection.py`` as ``python tests/predict_killer.py N predict ARGS...``
(under torchrun for ``fail-rank-1``): a deterministic stand-in for a machine lost mid-run, or a
process failing while the others work on (no timing involved).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import herbens.bundle.collection as collection  # noqa: E402
from herbens.cli.main import main  # noqa: E402

from herbens.core.errors import HerbensError  # noqa: E402

MODE = sys.argv[1]
real_write = collection.write_shard
written = []


def write_then_die(path, table):
    if MODE == "fail-rank-1":
        if os.environ.get("RANK") == "1":
            raise HerbensError(f"injected failure writing {path.name}")
        return real_write(path, table)
    real_write(path, table)
    written.append(path)
    if len(written) == int(MODE):
        os.kill(os.getpid(), signal.SIGKILL)


collection.write_shard = write_then_die
sys.exit(main(sys.argv[2:]))
