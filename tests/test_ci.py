"""``.ci/run`` tests a fresh clone in a private folder with the README's command (``make test``).

``make`` is replaced by a stub on PATH that records where it ran and with what, so the test
checks the script's contract without running the suite inside the suite.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env bash
{ echo "cwd=$PWD"; echo "args=$*"; echo "head=$(git rev-parse HEAD)";
  echo "mode=$(stat -c %a "$(dirname "$PWD")")"; echo "readme=$(test -f README.md && echo yes)"; } > "$RECORD"
exit "${STUB_STATUS:-0}"
"""


def _committed_head() -> str | None:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def _run_ci(tmp_path: Path, status: int = 0, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").write_text(STUB)
    (bin_dir / "make").chmod(0o755)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(scratch),
           "RECORD": str(tmp_path / "record"), "STUB_STATUS": str(status)}
    env.pop("KEEP_CI_CLONE", None)
    done = subprocess.run([str(ROOT / ".ci" / "run"), *args], env=env, capture_output=True, text=True)
    lines = (tmp_path / "record").read_text().splitlines() if (tmp_path / "record").exists() else []
    return done, dict(line.split("=", 1) for line in lines)


@pytest.mark.skipif(shutil.which("git") is None or _committed_head() is None, reason="needs a git checkout")
def test_ci_runs_make_test_in_a_fresh_clone_in_a_private_folder_and_removes_it(tmp_path):
    done, record = _run_ci(tmp_path, 0, "PYTEST_ARGS=-x")
    assert done.returncode == 0, done.stderr
    assert record["args"] == "test PYTEST_ARGS=-x"  # the README's command, arguments passed on
    clone = Path(record["cwd"])
    assert clone.parent.parent == tmp_path / "scratch" and clone.parent.name.startswith("herbens-ci.")
    assert stat.S_IMODE(int(record["mode"], 8)) == 0o700
    assert record["head"] == _committed_head() and record["readme"] == "yes"
    assert clone != ROOT and not clone.parent.exists()  # a clone, removed afterwards
    assert f"testing {_committed_head()[:7]}" in done.stdout


@pytest.mark.skipif(shutil.which("git") is None or _committed_head() is None, reason="needs a git checkout")
def test_ci_fails_when_the_suite_fails(tmp_path):
    done, record = _run_ci(tmp_path, 3)
    assert done.returncode == 3
    assert not Path(record["cwd"]).parent.exists()
