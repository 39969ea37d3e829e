"""Distillation on the demo herbarium: best single recipe vs the ensemble vs a distilled student.

    python bench/distil_demo.py [--workdir .] [--seeds 3 13 23] [--overrides train.epochs=32] [--name NAME]

Needs the demo's outputs under ``--workdir`` (``make demo``: data/demo, runs/demo_*,
submissions/demo.json). Then, in this process:

1. ``herbens teach submissions/demo.json -o teachers/demo_teacher`` (the ensemble's top-K soft
   targets for its training images);
2. for each seed, the best single demo recipe (``demo_balanced``) and its distilled twin
   (``demo_distil``: the same recipe, budget and backbone, plus the teacher) are trained;
3. test species/genus/family macro-F1 of each run and of the ensemble, against the synthetic
   solution; mean and spread over the seeds (one seed is noise at this size);
4. cost: parameters and forward GFLOPs (the ``herbens recipes`` counters) of one student and of
   all ensemble members, and inference images/s of the student's bundle and the ensemble's
   bundle, timed on the same test images in the same process.

Writes ``bench/results/<name>.json`` and ``.md`` (name: ``distil_demo``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from herbens.config import load_config  # noqa: E402
from herbens.data.taxonomy import Taxonomy  # noqa: E402
from herbens.demo import DEMO_RECIPES, score_run, score_submission, solution_labels  # noqa: E402

SINGLE, STUDENT = "demo_balanced", "demo_distil"
LEVELS = ("species", "genus", "family")


def train(recipe: str, name: str, seed: int, root: Path, runs: Path, extra: list[str]) -> tuple[Path, float]:
    from herbens.training.fit import fit

    cfg = load_config(recipe, [f"data.root={root}", f"output_dir={runs}", f"name={name}", f"seed={seed}", *extra])
    start = time.perf_counter()
    run_dir = fit(cfg, overwrite=True)
    return run_dir, time.perf_counter() - start


def model_cost(recipe_cfgs: list[dict], taxonomy: Taxonomy) -> dict:
    """Parameters and forward GFLOPs of one image through every model of ``recipe_cfgs``."""
    from herbens.config.catalogue import build_meta_model, count_params, forward_cost, input_hw

    params = flops = 0
    for cfg in recipe_cfgs:
        model = build_meta_model(cfg, taxonomy)
        params += count_params(model)
        flops += forward_cost(model, *input_hw(cfg))[0]
    return {"params_M": params / 1e6, "gflops": flops / 1e9}


def images_per_second(bundle_dir: Path, paths: list[str], repeats: int = 2) -> float:
    """Best of ``repeats`` timed passes of the bundle over ``paths`` (after one warm-up pass)."""
    from herbens.bundle.load import load_bundle
    from herbens.bundle.predict import predict_paths

    bundle = load_bundle(bundle_dir)
    predict_paths(bundle, paths[:8], progress=False)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predict_paths(bundle, paths, progress=False)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def summarize(scores: list[dict]) -> dict:
    out = {}
    for level in LEVELS:
        values = [s[f"{level}_macro_f1"] for s in scores]
        out[level] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    return out


def table(result: dict) -> str:
    rows = [("best single recipe (" + SINGLE + ")", result["single"], result["cost"]["single"]),
            ("ensemble (" + ", ".join(result["members"]) + ")", result["ensemble"], result["cost"]["ensemble"]),
            ("distilled student (" + STUDENT + ")", result["student"], result["cost"]["single"])]
    lines = ["| model | test species F1 | genus F1 | family F1 | params (M) | fwd GFLOPs | inference img/s |",
             "|---|---|---|---|---|---|---|"]
    for name, scores, cost in rows:
        cells = []
        for level in LEVELS:
            s = scores[level]
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}" if len(s["values"]) > 1 else f"{s['mean']:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {cost['params_M']:.2f} | {cost['gflops']:.3f} | {cost['images_per_second']:.1f} |")
    gap = result["ensemble"]["species"]["mean"] - result["single"]["species"]["mean"]
    closed = (result["student"]["species"]["mean"] - result["single"]["species"]["mean"]) / gap if gap > 0 else float("nan")
    lines.append(f"\nseeds {result['seeds']}; share of the single -> ensemble species-F1 gap the student closes: "
                 f"{closed:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from herbens.bundle.export import export_bundle
    from herbens.data.metadata import load_test_metadata
    from herbens.bundle.teach import write_teacher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 13, 23])
    parser.add_argument("--overrides", nargs="*", default=[], help="extra overrides for single and student runs")
    parser.add_argument("--name", default="distil_demo", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    root, runs = args.workdir / "data" / "demo", args.workdir / "runs"
    submission = args.workdir / "submissions" / "demo.json"
    if not submission.exists():
        raise SystemExit(f"{submission} is missing: run `make demo` (or `herbens demo`) first")
    teacher = write_teacher(submission, args.workdir / "teachers" / "demo_teacher", log=lambda _: None, progress=False)
    taxonomy = Taxonomy.load(runs / DEMO_RECIPES[0] / "taxonomy.json")
    truth = solution_labels(root, taxonomy)
    scores = {"single": [], "student": []}
    times = {"single": [], "student": []}
    for seed in args.seeds:
        for kind, recipe, extra in (("single", SINGLE, []), ("student", STUDENT, [f"distill.teacher={teacher}"])):
            run_dir, seconds = train(recipe, f"bench_{kind}_s{seed}", seed, root, runs, extra + args.overrides)
            scores[kind].append(score_run(run_dir, truth, taxonomy))
            times[kind].append(seconds)
            print(f"{kind} seed {seed}: species F1 {scores[kind][-1]['species_macro_f1']:.3f} ({seconds:.0f} s)")
    test = load_test_metadata(root / "test_metadata.json")
    paths = [str(Path(test.attrs["images_dir"]) / f) for f in test["file_name"]]
    student_bundle = export_bundle(runs / f"bench_student_s{args.seeds[0]}", args.workdir / "bundles" / "bench_student",
                                   log=lambda _: None)
    record = json.loads(submission.read_text())
    members = [Path(r["path"]).name for r in record["runs"]]
    cost = {"single": model_cost([load_config(STUDENT, [f"data.root={root}"])], taxonomy),
            "ensemble": model_cost([load_config(m, [f"data.root={root}"]) for m in members], taxonomy)}
    cost["single"]["images_per_second"] = images_per_second(student_bundle, paths)
    cost["ensemble"]["images_per_second"] = images_per_second(teacher / "bundle", paths)
    result = {"seeds": args.seeds, "members": members, "single": summarize(scores["single"]),
              "student": summarize(scores["student"]),
              "ensemble": summarize([score_submission(submission.with_suffix(".csv"), root, taxonomy)]),
              "train_seconds": times, "cost": cost}
    text = table(result)
    print("\n" + text)
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
