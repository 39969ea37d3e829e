"""Distillation on a harder herbarium: members, their ensemble, offline and online students, one long run.

    python bench/distil_bench.py [--workdir /tmp/distil_bench] [--seeds 3 13 23] [--epochs 64]
                                 [--student-epochs 128] [--ensemble recipes|seeds] [--single demo_balanced]
                                 [--difficulty 1.4]
                                 [--name distil_bench] [--results bench/results]

On the demo herbarium every 16-epoch run is optimisation-limited, so nothing can be learnt there
about distillation (bench/distil_demo.py). This bench builds a harder synthetic herbarium
(``HARD``: more species, more intra-class variation, a longer tail) and, for each seed:

1. three members, each trained for ``--epochs`` (every run's validation curve is recorded, to
   show whether it still improves), ensembled with ``herbens ensemble`` and exported as a
   bundle: the three demo recipes (``demo_balanced``, ``demo_arcface``, ``demo_seesaw``;
   ``--ensemble recipes``) or the ``--single`` recipe with the seed and the next two
   (``--ensemble seeds``);
2. the single recipe (``--single``, default ``demo_balanced``: its member of step 1);
3. an offline student: the single recipe trained for ``--student-epochs`` on the ensemble's
   sparse targets (``herbens teach``; ``demo_distil``'s loss settings);
4. two online students: the same, with the consistent teacher (``distill.online``: the bundle
   scores each augmented batch), without and with Mixup 0.8 (the teacher then scores the mixed
   images);
5. the single recipe trained for ``--student-epochs`` too, so that a longer schedule alone is not
   taken for distillation: if it scores like step 2, the single recipe had converged.

Students get at most the ensemble's total epochs (3 x ``--epochs``). Test species macro-F1 per
model (mean and spread over the seeds), parameters, forward GFLOPs, measured inference
images/s (same test images, same process) and the online teacher's cost per step.

Writes ``<results>/<name>.json`` and ``.md`` (default ``bench/results/distil_bench.*``). Each
seed's results are also kept in ``<workdir>/seed_<seed>.json`` and reused by a later run with the
same settings, so seeds can run side by side on a machine with cores to spare
(``--seeds 13 --results /tmp/s13`` in a second process) and then be gathered by one run with
every seed.
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

from distil_demo import images_per_second, model_cost, summarize  # noqa: E402

from herbens.config import load_config  # noqa: E402
from herbens.data.taxonomy import Taxonomy  # noqa: E402
from herbens.demo import DEMO_RECIPES, score_run, score_submission, solution_labels  # noqa: E402

# The harder herbarium: twice the demo's species, twice its variation, a tail down to 4 images,
# small sheets seen at 64 x 44 (the demo sees 128 x 88) so that runs converge within the bench's
# time, and 10 test images per species so that one seed's macro-F1 is less noisy.
HARD = {"species": 48, "seed": 0, "long_edge": 96, "min_images": 4, "max_images": 40, "test_per_species": 10,
        "difficulty": 1.4}
INPUT = ["input.size=[64,44]"]
SPLIT = ["data.val_fraction=0.2", "train.log_every=50", *INPUT]
MIXUP = ["augment.mixup=0.8"]
STUDENT = ["distill.temperature=1.0", "distill.alpha=0.5", "distill.class_balanced_beta=0.99"]
ROWS = (("single", "single recipe (an ensemble member)"), ("ensemble", "ensemble of the three runs"),
        ("offline", "student, offline sparse targets"), ("online", "student, consistent online teacher"),
        ("online_mixup", "student, consistent online teacher, Mixup 0.8"),
        ("single_long", "single recipe, the students' epochs"))


def train(recipe: str, name: str, seed: int, root: Path, runs: Path, extra: list[str]) -> tuple[Path, float]:
    from herbens.training.fit import fit

    cfg = load_config(recipe, [f"data.root={root}", f"output_dir={runs}", f"name={name}", f"seed={seed}",
                               *SPLIT, *extra])
    start = time.perf_counter()
    run_dir = fit(cfg, overwrite=True, progress=False)
    return run_dir, time.perf_counter() - start


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def val_curve(run_dir: Path) -> list[float]:
    return [round(h["val_species_macro_f1"], 3) for h in history(run_dir)]


def mixup_refusal(recipe: str) -> str | None:
    """Why ``recipe`` cannot train with Mixup (a loss that needs hard labels, e.g. Seesaw), or None."""
    from herbens.core.errors import HerbensError

    try:
        load_config(recipe, MIXUP)
    except HerbensError as exc:
        return str(exc)
    return None


def member_specs(ensemble: str, single: str) -> list[tuple[str, str, int]]:
    """(recipe, run name, seed offset) of each ensemble member, the single recipe's run first.

    ``recipes``: the three demo recipes with the bench seed; ``seeds``: the single recipe with the
    bench seed and the next two (an ensemble of one recipe, as in born-again distillation).
    """
    if ensemble == "seeds":
        return [(single, f"{single}_seed+{offset}", offset) for offset in range(3)]
    return [(single, single, 0)] + [(recipe, recipe, 0) for recipe in DEMO_RECIPES if recipe != single]


def one_seed(seed: int, root: Path, work: Path, epochs: int, student_epochs: int,
             specs: list[tuple[str, str, int]], log) -> dict:
    """Every model of one seed: their test scores, curves, training times and the teacher's cost."""
    from herbens.bundle.export import export_bundle
    from herbens.bundle.teach import write_teacher
    from herbens.ensemble.pipeline import ensemble_runs

    runs, single = work / f"runs_s{seed}", specs[0][0]
    members, out = [], {"scores": {}, "seconds": {}, "curves": {}}
    for recipe, name, offset in specs:
        run_dir, seconds = train(recipe, name, seed + offset, root, runs, [f"train.epochs={epochs}"])
        members.append(run_dir)
        out["curves"][name], out["seconds"][name] = val_curve(run_dir), seconds
    taxonomy = Taxonomy.load(members[0] / "taxonomy.json")
    truth = solution_labels(root, taxonomy)
    submission = work / f"ensemble_s{seed}.csv"
    ensemble_runs(members, submission, progress=False, log=lambda _: None)
    out["scores"]["single"] = score_run(members[0], truth, taxonomy)
    out["scores"]["ensemble"] = score_submission(submission, root, taxonomy)
    teacher = write_teacher(submission.with_suffix(".json"), work / f"teacher_s{seed}", log=lambda _: None,
                            progress=False)
    longer = [f"train.epochs={student_epochs}"]
    online = [f"distill.teacher={teacher / 'bundle'}", "distill.online=true"]
    students = (("offline", [*STUDENT, f"distill.teacher={teacher}"]), ("online", [*STUDENT, *online]),
                ("online_mixup", [*STUDENT, *online, *MIXUP]), ("single_long", []))
    for kind, extra in students:
        if kind == "online_mixup" and mixup_refusal(single):
            continue
        run_dir, seconds = train(single, kind, seed, root, runs, [*longer, *extra])
        out["scores"][kind] = score_run(run_dir, truth, taxonomy)
        out["seconds"][kind], out["curves"][kind] = seconds, val_curve(run_dir)
        if kind == "online":  # the teacher's seconds per step, and its share of the student's epoch time
            epochs_run = history(run_dir)
            steps = np.diff([0] + [h["step"] for h in epochs_run])
            out["teacher_s_per_step"] = float(np.mean([h["teacher_s_per_step"] for h in epochs_run]))
            out["teacher_share"] = float(np.mean([h["teacher_s_per_step"] * n / h["epoch_time_s"]
                                                  for h, n in zip(epochs_run, steps)]))
    log(f"seed {seed}: " + ", ".join(f"{k} {v['species_macro_f1']:.3f}" for k, v in out["scores"].items()))
    out["bundles"] = {"single": export_bundle(members[0], work / f"bundle_single_s{seed}", overwrite=True,
                                              log=lambda _: None),
                      "ensemble": teacher / "bundle"}
    return out


def seed_result(seed: int, herbarium: dict, root: Path, work: Path, epochs: int, student_epochs: int,
                specs: list[tuple[str, str, int]], log) -> dict:
    """One seed's results: from ``<work>/seed_<seed>.json`` when made with the same settings, else trained."""
    key = {"seed": seed, "herbarium": herbarium, "input": INPUT, "epochs": epochs, "student_epochs": student_epochs,
           "members": [list(spec) for spec in specs]}
    path = work / f"seed_{seed}.json"
    if path.exists() and (saved := json.loads(path.read_text()))["key"] == key:
        log(f"seed {seed}: the results in {path}")
        return saved["result"]
    result = one_seed(seed, root, work, epochs, student_epochs, specs, log)
    partial = path.with_suffix(".json.partial")  # written whole, then renamed: never a half-written seed
    partial.write_text(json.dumps({"key": key, "result": result}, indent=2, default=str) + "\n")
    partial.replace(path)
    return json.loads(path.read_text())["result"]  # as a reused seed reads it (paths as strings)


def table(result: dict) -> str:
    lines = ["| model | epochs | test species F1 | genus F1 | family F1 | params (M) | fwd GFLOPs | inference img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for kind, label in ROWS:
        if kind not in result["models"]:
            continue
        s = result["models"][kind]
        cost = result["cost"]["ensemble" if kind == "ensemble" else "single"]
        cells = [f"{s[level]['mean']:.3f} ± {s[level]['std']:.3f}" if len(s[level]["values"]) > 1
                 else f"{s[level]['mean']:.3f}" for level in ("species", "genus", "family")]
        lines.append(f"| {label} | {result['epochs'][kind]} | " + " | ".join(cells)
                     + f" | {cost['params_M']:.2f} | {cost['gflops']:.3f} | {cost['images_per_second']:.1f} |")
    gap = result["models"]["ensemble"]["species"]["mean"] - result["models"]["single_long"]["species"]["mean"]
    for kind in ("offline", "online", "online_mixup"):
        if kind not in result["models"]:
            lines.append(f"\n{kind} student not run: {result['skipped'][kind]}")
            continue
        gained = result["models"][kind]["species"]["mean"] - result["models"]["single_long"]["species"]["mean"]
        share = f"{gained / gap:.2f} of its gap to the ensemble" if gap > 0 else \
            "and that single recipe is above the ensemble (no gap to close)"
        lines.append(f"\n{kind} student: {gained:+.3f} species F1 over the single recipe of the same epochs, "
                     f"{share} (target: at least half the gap)")
    lines.append(f"\nseeds {result['seeds']}; online teacher {result['teacher_s_per_step'] * 1000:.1f} ms per step "
                 f"({result['teacher_share']:.0%} of the online student's training time); "
                 f"members {', '.join(name for _, name, _ in result['members'])}; herbarium {result['herbarium']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from herbens.data.metadata import load_test_metadata
    from herbens.demo import synthesize_once

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/distil_bench"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 13, 23])
    # Seed 3 of demo_balanced on HARD at 64 x 44: 0.720 test species F1 at 32 epochs, 0.749 at 64,
    # 0.755 at 128 (at 128 x 88 it was still improving at 128 epochs: 0.680, 0.767, 0.820).
    parser.add_argument("--epochs", type=int, default=64, help="each ensemble member's (converged) epochs")
    parser.add_argument("--student-epochs", type=int, default=128, help="at most 3 x --epochs")
    parser.add_argument("--ensemble", choices=("recipes", "seeds"), default="recipes",
                        help="members: the three demo recipes, or --single with three seeds")
    parser.add_argument("--single", default="demo_balanced", choices=DEMO_RECIPES,
                        help="the single recipe (a member, and every student's recipe)")
    parser.add_argument("--difficulty", type=float, default=HARD["difficulty"],
                        help="the herbarium's intra-class variation (herbens synth --difficulty)")
    parser.add_argument("--name", default="distil_bench", help="results file name")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results", help="folder of the results")
    args = parser.parse_args(argv)
    if not 1 <= args.student_epochs <= 3 * args.epochs:
        raise SystemExit(f"--student-epochs must be 1..{3 * args.epochs} (the ensemble's total epochs)")
    root = args.workdir / "data"
    herbarium = {**HARD, "difficulty": args.difficulty}
    synthesize_once(root, herbarium, progress=False)
    specs, refusal = member_specs(args.ensemble, args.single), mixup_refusal(args.single)
    seeds = [seed_result(seed, herbarium, root, args.workdir, args.epochs, args.student_epochs, specs, print)
             for seed in args.seeds]
    taxonomy = Taxonomy.load(args.workdir / f"runs_s{args.seeds[0]}" / specs[0][1] / "taxonomy.json")
    test = load_test_metadata(root / "test_metadata.json")
    paths = [str(Path(test.attrs["images_dir"]) / f) for f in test["file_name"]]
    bundles = [s.pop("bundles") for s in seeds][0]  # cost measured on the first seed's models
    cost = {"single": model_cost([load_config(args.single, [f"data.root={root}", *INPUT])], taxonomy),
            "ensemble": model_cost([load_config(r, [f"data.root={root}", *INPUT]) for r, _, _ in specs], taxonomy)}
    for kind in cost:
        cost[kind]["images_per_second"] = images_per_second(Path(bundles[kind]), paths)
    result = {"seeds": args.seeds, "herbarium": herbarium, "members": specs,
              "epochs": {"single": args.epochs, "ensemble": 3 * args.epochs, "offline": args.student_epochs,
                         "online": args.student_epochs, "online_mixup": args.student_epochs,
                         "single_long": args.student_epochs},
              "models": {kind: summarize([s["scores"][kind] for s in seeds]) for kind, _ in ROWS
                         if kind in seeds[0]["scores"]},
              "skipped": {"online_mixup": refusal} if refusal else {},
              "teacher_s_per_step": float(np.mean([s["teacher_s_per_step"] for s in seeds])),
              "teacher_share": float(np.mean([s["teacher_share"] for s in seeds])),
              "cost": cost, "per_seed": seeds}
    text = table(result)
    print("\n" + text)
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{args.name}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
