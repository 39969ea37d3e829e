"""What ``herbens export`` and ``herbens teach`` start from: a run directory or an ensemble's
JSON record (or its CSV), checked to belong with the CSVs beside it, and the member runs it names."""

from __future__ import annotations

from pathlib import Path

from herbens.bundle.scoring import fitted_params, single_run_params
from herbens.ensemble.outputs import check_companions, output_paths
from herbens.core.errors import HerbensError
from herbens.core.fileio import read_json


def resolve_source(source: str | Path) -> tuple[list[Path], object, dict | None]:
    """Member run directories, the combination params and the ensemble record (None for a run)."""
    source = Path(source)
    if source.is_dir():
        if not (source / "config.yaml").is_file():
            raise HerbensError(f"{source}: not a run directory (no config.yaml)")
        return [source], single_run_params(), None
    if source.suffix.lower() == ".csv":
        record_file = output_paths(source)["json"]
        if not record_file.is_file():
            raise HerbensError(f"{source}: no ensemble record {record_file.name} beside it (an interrupted "
                               "herbens ensemble run?); rerun herbens ensemble")
        source = record_file
    record = read_json(source)
    if not isinstance(record, dict) or "runs" not in record:
        raise HerbensError(f"{source}: not an ensemble record (no 'runs'); give a run directory or "
                           "the .json that herbens ensemble writes beside its CSV")
    check_companions(record, source)
    if record.get("align_by_category") and any((record.get("dropped_species") or {}).values()):
        raise HerbensError(f"{source}: an ensemble aligned by category with dropped species cannot be exported")
    runs = [_run_path(entry["path"], source) for entry in record["runs"]]
    return runs, fitted_params(record, len(runs)), record


def _run_path(path: str, record_file: Path) -> Path:
    """A run path of an ensemble record: as written (relative to where ensemble ran), else
    relative to the record's folder or the folder above it (``submissions/`` beside ``runs/``)."""
    candidates = list(dict.fromkeys((Path(path), record_file.parent / path, record_file.parent.parent / path)))
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise HerbensError(f"{record_file}: run {path} not found (no config.yaml in {looked}); run from the folder "
                       "herbens ensemble ran in")
