"""Outputs that come in pairs are written and read as one (issue 23): the ensemble's CSV, its JSON
sidecar and its top-k file. The sidecar records each CSV's content hash and is written last, the
previous one removed first; readers (export, teach) refuse a pair that does not match.

Each test reproduces one finding; README.md's reliability table names them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from herbens.bundle.sources import resolve_source
from herbens.data.taxonomy import Taxonomy
from herbens.ensemble import pipeline
from herbens.core.fileio import file_sha256
from herbens.ensemble.pipeline import ensemble_runs
from herbens.core.errors import HerbensError
from herbens.stores.logits import write_logits

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(weights="equal", calibrate=False, hierarchy="none", progress=False, log=lambda _: None)


def fake_run(root: Path, name: str, seed: int) -> Path:
    """A run folder with random val/test logits (and the config.yaml export looks for)."""
    rng = np.random.default_rng(seed)
    tax = Taxonomy([100, 103, 106, 109], ["A a", "A b", "B c", "B d"], ["A", "B"], ["F"],
                   [0, 0, 1, 1], [0, 0, 0, 0], [5, 3, 2, 7])
    run = root / name
    tax.save(run / "taxonomy.json")
    (run / "config.yaml").write_text("name: fake\n")
    for split, n in (("test", 120), ("val", 40)):
        labels = np.arange(n) % 4 if split == "val" else None  # the same truth in every run
        write_logits(run, split, [f"{split}{i}" for i in range(n)], {"species": rng.normal(size=(n, 4))},
                     {"taxonomy_hash": tax.hash}, labels=labels)
    return run


@pytest.fixture
def runs(tmp_path):
    return [fake_run(tmp_path / "runs", f"r{i}", seed=i) for i in range(3)]


def test_sidecar_records_each_csvs_hash_and_readers_check_it(runs, tmp_path):
    out = tmp_path / "sub" / "e.csv"
    record = ensemble_runs(runs, out, top_k=2, **QUIET)
    topk = out.with_name("e.topk.csv")
    assert record["files"] == {"submission": {"name": "e.csv", "sha256": file_sha256(out)},
                               "topk": {"name": "e.topk.csv", "sha256": file_sha256(topk)}}
    assert json.loads(out.with_suffix(".json").read_text())["files"] == record["files"]
    for source in (out, out.with_suffix(".json")):
        assert len(resolve_source(source)[0]) == 3
    for victim in (out, topk):
        good = victim.read_bytes()
        victim.write_bytes(good.replace(b"\n", b"\r\n", 1))
        with pytest.raises(HerbensError, match=rf"{victim} and {out.with_suffix('.json')} do not belong together"):
            resolve_source(out)
        victim.unlink()
        with pytest.raises(HerbensError, match=rf"describes {victim}, which is missing"):
            resolve_source(out)
        victim.write_bytes(good)
    assert len(resolve_source(out)[0]) == 3


def _disk_full(*_args, **_kwargs):
    raise HerbensError("cannot write e.json: File too large")


def test_failed_sidecar_write_leaves_no_pair(runs, tmp_path, monkeypatch):
    out = tmp_path / "sub" / "e.csv"
    ensemble_runs(runs, out, tau="fit", top_k=2, **QUIET)
    monkeypatch.setattr(pipeline, "write_json", _disk_full)
    with pytest.raises(HerbensError, match="File too large"):
        ensemble_runs(runs[:2], out, tau="none", top_k=2, **QUIET)
    assert not out.with_suffix(".json").exists()  # never the 3-run JSON beside the 2-run CSV
    with pytest.raises(HerbensError, match=rf"{out}: no ensemble record e.json beside it"):
        resolve_source(out)


KILLED_RUN = """
import os, signal, sys
from pathlib import Path
from herbens.ensemble import pipeline
pipeline.write_json = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
pipeline.ensemble_runs([Path(p) for p in sys.argv[2:]], Path(sys.argv[1]), weights="equal", calibrate=False,
                       tau="none", hierarchy="none", progress=False, log=lambda _: None)
"""


def test_run_killed_before_its_sidecar_leaves_no_pair(runs, tmp_path):
    out = tmp_path / "sub" / "e.csv"
    ensemble_runs(runs, out, tau="fit", top_k=2, **QUIET)
    old_csv = out.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out), *map(str, runs[:2])], env=env,
                          capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert out.read_bytes() != old_csv and not out.with_suffix(".json").exists()
    with pytest.raises(HerbensError, match="no ensemble record e.json"):
        resolve_source(out)


def test_a_top_k_file_of_an_earlier_run_does_not_stay(runs, tmp_path):
    out = tmp_path / "sub" / "e.csv"
    ensemble_runs(runs, out, top_k=2, tau="none", **QUIET)
    ensemble_runs(runs[:2], out, tau="none", **QUIET)
    assert sorted(p.name for p in out.parent.iterdir()) == ["e.csv", "e.json"]
    assert len(resolve_source(out)[0]) == 2
