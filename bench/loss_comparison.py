"""Species losses compared at equal budget on the demo herbarium (CPU, minutes).

Builds (or reuses) the synthetic herbarium of ``herbens demo`` and trains one run per species
loss, every run the ``demo_ce`` recipe (backbone, input size, epochs, batch, optimizer,
schedule, seed all equal) with only the species loss and head changed through overrides;
genus and family stay cross-entropy. Per run it reports the train loss of the first and last
epoch (it must fall), the last epoch's validation species macro-F1, and on the test split
(truth from the synthetic ``test_solution.csv``) species/genus/family macro-F1 plus species
macro-F1 on the head and tail thirds of the species by training images, the classes these
losses exist for. A chance row (uniform guessing) is the floor.

The losses and what differs from ``demo_ce`` besides the species loss:

* ``ce``: the recipe as is (label smoothing 0.1).
* ``class_balanced``: beta 0.99; at the demo's 6-60 images per species the weights span
  about 8x (0.999: 10x, almost inverse frequency; 0: plain CE). Label smoothing 0.1.
* ``seesaw``: p 0.8, q 2, eps 0.01 (the demo_seesaw values; no label smoothing in seesaw).
* ``logit_adjusted``: tau 1, label smoothing 0.1.
* ``subcenter_arcface``: sub-center ArcFace head (margin 28.6 deg, scale 30, 3 sub-centers)
  behind a 128-d BN-neck, as ``demo_arcface``; genus/family heads sit on the same neck.
* ``ams``: AMS metric + CE on species behind the same BN-neck, with P x K batches
  (8 classes x 4 images = the same 32 per batch and the same number of steps). The P x K
  sampler draws classes uniformly, so this run also sees a class-balanced stream.

    python bench/loss_comparison.py                          # all losses, the recipe's epochs
    python bench/loss_comparison.py --epochs 2 --losses ce seesaw --out /tmp/lc
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from herbens.config import load_config, save_config  # noqa: E402
from herbens.data.taxonomy import Taxonomy  # noqa: E402
from herbens.demo import DEMO_DATA, solution_labels, synthesize_once  # noqa: E402
from herbens.core.fileio import atomic_write, write_json  # noqa: E402
from herbens.metrics import head_tail_scores, head_tail_split, level_scores  # noqa: E402
from herbens.stores.logits import read_logits  # noqa: E402

BASE_RECIPE = "demo_ce"
BNNECK = ["model.neck={name: bnneck, embedding_dim: 128}"]
# Overrides on top of BASE_RECIPE, per species loss (a node naming another loss starts from
# that loss's own defaults; the values here are written out to keep the comparison explicit).
LOSS_OVERRIDES: dict[str, list[str]] = {
    "ce": [],
    "class_balanced": ["levels.species.loss={name: class_balanced, beta: 0.99, label_smoothing: 0.1}"],
    "seesaw": ["levels.species.loss={name: seesaw, p: 0.8, q: 2.0, eps: 0.01}"],
    "logit_adjusted": ["levels.species.loss={name: logit_adjusted, tau: 1.0, label_smoothing: 0.1}"],
    "subcenter_arcface": BNNECK + [
        "levels.species.head={name: subcenter_arcface, margin: 28.6, scale: 30, sub_centers: 3}",
        "levels.species.loss=subcenter_arcface"],
    "ams": BNNECK + [
        "levels.species.loss={name: ams, margin: 0.0, temperature: 0.1, label_smoothing: 0.1, metric_weight: 1.0}",
        "sampler={name: pk, classes_per_batch: 8, images_per_class: 4}"],
}
CHANCE_DRAWS = 200  # random-guess draws averaged for the chance row (one draw is noisy on 120 images)


def freeze_base(root: Path, workdir: Path, epochs: int | None) -> Path:
    """Resolve the base recipe once and save it; every run starts from this file.

    Recipes change while a benchmark of many minutes runs (a demo recipe's epochs changed
    between two runs once), and re-reading them per run would silently break the equal budget.
    """
    overrides = [f"data.root={root}", f"output_dir={workdir / 'runs'}"]
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    path = workdir / f"{BASE_RECIPE}.frozen.yaml"
    save_config(load_config(BASE_RECIPE, overrides), path)
    return path


def read_history(run_dir: Path) -> list[dict]:
    """The run's per-epoch records (history.jsonl)."""
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line]


def prediction_scores(true: np.ndarray, pred: np.ndarray, taxonomy: Taxonomy) -> dict:
    """Level macro-F1/accuracy and head/tail species macro-F1 of species predictions."""
    return level_scores(true, pred, taxonomy) | head_tail_scores(true, pred, taxonomy)


def score_run(run_dir: Path, root: Path, seconds: float) -> dict:
    """One run's row: train-loss trend, last validation F1 and its test scores."""
    taxonomy = Taxonomy.load(run_dir / "taxonomy.json")
    history = read_history(run_dir)
    test = read_logits(run_dir, "test")
    pred = np.asarray(test.level("species")).argmax(axis=1)
    true = solution_labels(root, taxonomy).loc[test.image_ids].to_numpy()
    first, last = history[0], history[-1]
    return {
        "epochs": last["epoch"], "steps": last["step"], "wall_time_s": seconds,
        "train_loss_first": first["train_loss"], "train_loss_last": last["train_loss"],
        "species_loss_first": first["loss_species"], "species_loss_last": last["loss_species"],
        "val_species_macro_f1": last["val_species_macro_f1"],
        "test": prediction_scores(true, pred, taxonomy),
    }


def chance_row(root: Path, taxonomy: Taxonomy, draws: int = CHANCE_DRAWS) -> dict:
    """Expected test scores of uniform random guessing (mean over ``draws`` draws)."""
    true = solution_labels(root, taxonomy).to_numpy()
    rng = np.random.default_rng(0)
    c = taxonomy.num_classes("species")
    runs = [prediction_scores(true, rng.integers(0, c, size=len(true)), taxonomy) for _ in range(draws)]
    scores = [key for key in runs[0] if key.endswith(("_f1", "_accuracy"))]
    return {key: float(np.mean([r[key] for r in runs])) for key in scores}


def train_all(losses: list[str], base: Path, root: Path) -> dict[str, dict]:
    """Train and score one run per loss, in order, each from the frozen base config."""
    from herbens.training.fit import fit  # heavy import (torch, timm, accelerate): only when training

    rows = {}
    for loss in losses:
        cfg = load_config(base, [f"name=loss_{loss}"] + LOSS_OVERRIDES[loss])
        print(f"\n== {cfg['name']}: species head {cfg['levels']['species']['head']}, "
              f"loss {cfg['levels']['species']['loss']} ==", flush=True)
        t0 = time.perf_counter()
        run_dir = fit(cfg, overwrite=True)
        rows[loss] = score_run(run_dir, root, time.perf_counter() - t0)
    return rows


def trains(row: dict, chance: dict) -> str:
    """The issue's acceptance test: species loss falls and test species F1 beats chance."""
    problems = [what for what, bad in (
        ("loss did not fall", row["species_loss_last"] >= row["species_loss_first"]),
        ("F1 at chance", row["test"]["species_macro_f1"] <= chance["species_macro_f1"])) if bad]
    return "; ".join(problems) or "yes"


def markdown_table(rows: dict[str, dict], chance: dict, taxonomy: Taxonomy, test_images: int) -> str:
    """The comparison as a Markdown table, with a note saying what head and tail are."""
    header = ("| species loss | train loss first → last | species loss first → last | val species F1 "
              "| test species F1 | genus F1 | family F1 | head F1 | tail F1 | steps | time (s) | trains |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for loss, r in rows.items():
        t = r["test"]
        lines.append(
            f"| {loss} | {r['train_loss_first']:.3f} → {r['train_loss_last']:.3f} "
            f"| {r['species_loss_first']:.3f} → {r['species_loss_last']:.3f} "
            f"| {r['val_species_macro_f1']:.3f} | {t['species_macro_f1']:.3f} | {t['genus_macro_f1']:.3f} "
            f"| {t['family_macro_f1']:.3f} | {t['head_macro_f1']:.3f} | {t['tail_macro_f1']:.3f} "
            f"| {r['steps']} | {r['wall_time_s']:.0f} | {trains(r, chance)} |")
    lines.append(f"| chance (uniform) | | | | {chance['species_macro_f1']:.3f} | {chance['genus_macro_f1']:.3f} "
                 f"| {chance['family_macro_f1']:.3f} | {chance['head_macro_f1']:.3f} "
                 f"| {chance['tail_macro_f1']:.3f} | | | |")
    tail, head = head_tail_split(taxonomy.counts)
    counts = taxonomy.counts
    lines.append(
        f"\nTest split: {test_images} images, {taxonomy.num_classes('species')} species. Head / tail: "
        f"the {len(head)} species with the most ({counts[head].min()}-{counts[head].max()}) / the "
        f"{len(tail)} with the fewest ({counts[tail].min()}-{counts[tail].max()}) labelled training images. "
        f"Train loss is the sum over levels weighted by levels.<level>.weight, species loss "
        f"its species part; their scales differ between losses (ArcFace's is scaled by s = 30). "
        f"Genus and family F1 are derived from the species prediction.")
    return "\n".join(lines)


def budget(cfg: dict) -> str:
    """The shared training budget in one line, so the table says what "equal" was."""
    train, opt = cfg["train"], cfg["optimizer"]
    init = "pretrained" if cfg["model"]["pretrained"] else "from scratch"
    return (f"recipe {BASE_RECIPE}, {cfg['model']['backbone']} {init} at "
            f"{cfg['input']['size'][0]}x{cfg['input']['size'][1]}, {train['epochs']} epochs x batch "
            f"{train['batch_size']}, {opt['name']} lr {opt['lr']} wd {opt['weight_decay']}, "
            f"{cfg['scheduler']['name']} schedule, seed {cfg['seed']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/herbens_losses"),
                        help="holds data/demo (reused when it matches) and runs/loss_<name>")
    parser.add_argument("--losses", nargs="+", choices=list(LOSS_OVERRIDES), default=list(LOSS_OVERRIDES),
                        help="species losses to train (default: all)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of every run (default: the {BASE_RECIPE} recipe's)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "loss_comparison",
                        help="writes OUT.md (table) and OUT.json (every number)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    script = Path(__file__).resolve().relative_to(ROOT)
    command = shlex.join(["python", str(script), *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    root = args.workdir / "data" / "demo"
    synthesize_once(root, DEMO_DATA)
    base = freeze_base(root, args.workdir, args.epochs)
    rows = train_all(args.losses, base, root)
    taxonomy = Taxonomy.load(args.workdir / "runs" / f"loss_{args.losses[0]}" / "taxonomy.json")
    chance = chance_row(root, taxonomy)
    test_images = len(solution_labels(root, taxonomy))
    table = markdown_table(rows, chance, taxonomy, test_images)
    wall = time.perf_counter() - start

    print("\n" + table)
    print(f"\ncommand: {command}\nwall time: {wall:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, js = args.out.with_name(args.out.name + ".md"), args.out.with_name(args.out.name + ".json")
    base_cfg = load_config(base)
    with atomic_write(md) as handle:
        handle.write(f"{table}\n\nBudget of every run: {budget(base_cfg)}.\n"
                     f"Command: `{command}` (wall time {wall:.0f} s).\n")
    write_json(js, {"command": command, "wall_time_s": wall, "base_recipe": BASE_RECIPE,
                    "base_config": base_cfg, "data": DEMO_DATA,
                    "overrides": {loss: LOSS_OVERRIDES[loss] for loss in args.losses},
                    "runs": rows, "chance": chance, "test_images": test_images})
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
