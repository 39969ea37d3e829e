"""The command line apart from the library: fast help, one handler module per verb, shared options."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from herbens.cli import options
from herbens.cli.main import build_parser, handler_module, main
from herbens.cli.parsers import PARSERS, bundle, combine, data, training

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "herbens"

HELP_PROBE = """
import json, sys
from herbens.cli.main import main
verb = sys.argv[1] if len(sys.argv) > 1 else None
try:
    main([verb, "--help"] if verb else ["--help"])
except SystemExit:
    pass
heavy = [m for m in ("torch", "timm", "accelerate", "herbens.config", "herbens.data", "herbens.bundle")
         if m in sys.modules]
print(json.dumps(heavy), file=sys.stderr)
"""


def _help_imports(verb: str | None) -> list[str]:
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *([verb] if verb else [])], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("verb", [None, *PARSERS])
def test_help_loads_neither_torch_nor_the_library(verb):
    assert _help_imports(verb) == []


def test_every_verb_has_a_handler_module():
    for verb in PARSERS:
        module = importlib.import_module(handler_module(verb))
        assert callable(module.run), verb


def test_parser_literals_agree_with_the_library():
    from herbens.bundle.collection import DEFAULT_BLOCK
    from herbens.bundle.export import AUTO_OOD
    from herbens.bundle.merge import DEFAULT_PAGE_CAP, OUTPUT_FORMATS
    from herbens.bundle.teach import DEFAULT_K
    from herbens.bundle.thresholds import OOD_SCORES, SOFTMAX_OOD_SCORES
    from herbens.data.dataset import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MIN_IMAGE_SIDE
    from herbens.data.prepare import JPEG_QUALITY
    from herbens.demo import DEMO_RECIPES
    from herbens.infer.splits import INFER_BAD_IMAGES
    from herbens.retrieval.command import METHODS
    from herbens.retrieval.search import BACKENDS

    assert options.DEFAULT_MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS
    assert options.DEFAULT_MIN_IMAGE_SIDE == DEFAULT_MIN_IMAGE_SIDE
    assert data.JPEG_QUALITY == JPEG_QUALITY
    assert training.DEMO_RECIPES == DEMO_RECIPES
    assert training.INFER_BAD_IMAGES == INFER_BAD_IMAGES
    assert bundle.OOD_SCORES == OOD_SCORES and training.SOFTMAX_OOD_SCORES == SOFTMAX_OOD_SCORES
    assert bundle.AUTO_OOD == AUTO_OOD
    assert bundle.TEACHER_K == DEFAULT_K
    assert bundle.OUTPUT_FORMATS == OUTPUT_FORMATS and bundle.PAGE_CAP == DEFAULT_PAGE_CAP
    assert bundle.BLOCK == DEFAULT_BLOCK
    assert combine.RETRIEVAL_METHODS == METHODS
    assert combine.SEARCH_BACKENDS == BACKENDS


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_library_modules_import_neither_argparse_nor_the_cli():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if (PACKAGE / "cli") in path.parents or path.name in ("__main__.py", "train.py") and path.parent == PACKAGE:
            continue
        found = {n for n in _imports(path) if n == "argparse" or n == "herbens.cli" or n.startswith("herbens.cli.")}
        if found:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(found)}")
    assert offenders == []


def test_parsers_import_only_the_standard_library_and_the_options():
    for path in [PACKAGE / "cli" / "options.py", *(PACKAGE / "cli" / "parsers").glob("*.py")]:
        for name in _imports(path):
            top = name.split(".")[0]
            assert name.startswith("herbens.cli") or top in sys.stdlib_module_names, (path.name, name)


def test_no_progress_is_the_one_spelling():
    parser = build_parser()
    spellings = {}
    for verb, sub in parser._subparsers._group_actions[0].choices.items():
        flags = {flag for action in sub._actions for flag in action.option_strings}
        assert "--quiet" not in flags, verb
        spellings[verb] = "--no-progress" in flags
    # every verb that draws progress; the others (recipes, evaluate, report, export, enrol, unenrol) draw none
    assert {v for v, has in spellings.items() if has} == {
        "synth", "check", "prepare", "train", "infer", "openset", "zeroshot", "demo", "ensemble", "retrieval",
        "predict", "teach"}
    args = parser.parse_args(["predict", "b", "i", "--no-progress"])
    assert args.progress is False
    assert parser.parse_args(["predict", "b", "i"]).progress is True


def test_ensemble_argument_types_refuse_bad_values(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ensemble", "runs/a", "--weights", "1,x"])
    assert "expected equal, fit or W1,W2" in capsys.readouterr().err
    args = build_parser().parse_args(["ensemble", "a", "b", "--weights", "1,2", "--tau", "0.5",
                                      "--hierarchy", "0.1,0.2"])
    assert (args.weights, args.tau, args.hierarchy) == ((1.0, 2.0), 0.5, (0.1, 0.2))


def test_a_herbens_error_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "not_a_run"), "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("herbens: error: ")


def test_no_verb_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_the_training_script_entry_parses_like_the_train_verb():
    done = subprocess.run([sys.executable, str(PACKAGE / "train.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    assert "--resume" in done.stdout and "key=value" in done.stdout
