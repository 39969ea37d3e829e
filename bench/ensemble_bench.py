"""Streaming ensembler vs a naive load-everything numpy baseline, measured in the same run.

Generates R runs of float16 logits on disk (species, genus and family heads; default 3 runs x
50,000 test images x 15,501 species, small validation split) with the logits store's block
writer, so the generator itself stays small. Then, each in a fresh subprocess (honest peak RSS:
the child's own ``ru_maxrss``) and with the page cache warmed the same way before each:

* naive: ``np.load`` every matrix, combine whole matrices with the same fixed parameters
  (weights, tau, alpha, beta), score validation, argmax, write the CSV;
* streaming: ``herbens.ensemble.pipeline.ensemble_runs`` with the same fixed parameters;
* (unless ``--no-fit-run``) streaming with everything fitted on validation, for information,
  and the fit's cost in one process: a plain-mean pass over the validation logits, the fit
  cross-fitted as before issue 24 and the nested fit (time, ratio per fitted value, peak RSS).

Prints wall times, peak RSS, their ratios, whether both wrote the same predictions, and a
linear projection to 8 runs x 210,407 images.

    python bench/ensemble_bench.py                 # full default size (needs ~5.6 GB disk, ~16 GB RAM)
    python bench/ensemble_bench.py --quick         # seconds
    python bench/ensemble_bench.py --images 20000  # any shape in between
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from herbens.data.taxonomy import LEVELS, Taxonomy  # noqa: E402
from herbens.stores.logits import logits_dir, open_logits_writer  # noqa: E402

FIXED = {"weights": [0.5, 0.3, 0.2], "tau": 0.5, "alpha": 0.5, "beta": 0.25}
KAGGLE_RUNS, KAGGLE_IMAGES = 8, 210_407


# ----------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------
def make_taxonomy(species: int, genera: int, families: int, seed: int) -> Taxonomy:
    rng = np.random.default_rng(seed)
    to_genus = np.sort(rng.integers(0, genera, species))
    to_genus[:genera] = np.arange(genera)  # every genus used
    to_genus.sort()
    family_of_genus = np.sort(np.concatenate([np.arange(families), rng.integers(0, families, genera - families)]))
    counts = np.clip(np.round(100 * rng.pareto(1.5, species)), 7, 100).astype(np.int64)
    return Taxonomy(np.arange(species) + np.arange(species) // 1000, [f"S{i}" for i in range(species)],
                    [f"G{g:05d}" for g in range(genera)], [f"F{f:04d}" for f in range(families)],
                    to_genus, family_of_genus[to_genus], counts)


def write_split(run: Path, split: str, tax: Taxonomy, labels: np.ndarray, seed: int, chunk: int,
                with_labels: bool) -> None:
    """Noisy logits around the true class at every level, written block by block.

    Drawing 2.9 G normal numbers would dominate the benchmark's run time, so each (run, level)
    draws one noise block and every chunk uses it rolled by a random number of columns.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    columns = {lv: tax.num_classes(lv) for lv in LEVELS}
    noise = {lv: rng.standard_normal((min(chunk, n), c), dtype=np.float32) for lv, c in columns.items()}
    meta = {"taxonomy_hash": tax.hash, "model": f"bench-{run.name}", "views": ["full"]}
    with open_logits_writer(run, split, [str(i) for i in range(n)], columns, meta,
                            labels=labels if with_labels else None) as writer:
        for start in range(0, n, chunk):
            y = labels[start:start + chunk]
            rows = np.arange(len(y))
            for level in LEVELS:
                block = np.roll(noise[level][:len(y)], int(rng.integers(columns[level])), axis=1)
                block[rows, tax.level_map(level)[y]] += 3.0
                writer.write(level, start, block)


def generate(workdir: Path, args) -> list[Path]:
    tax = make_taxonomy(args.classes, args.genera, args.families, seed=0)
    rng = np.random.default_rng(1)
    labels = {"val": rng.integers(0, args.classes, args.val_images), "test": rng.integers(0, args.classes, args.images)}
    runs = []
    for r in range(args.runs):
        run = workdir / f"run{r}"
        tax.save(run / "taxonomy.json")
        for split in ("val", "test"):
            write_split(run, split, tax, labels[split], seed=100 * r + (split == "test"), chunk=4096,
                        with_labels=split == "val")
        runs.append(run)
    return runs


def bytes_needed(args) -> int:
    cols = args.classes + args.genera + args.families
    return args.runs * (args.images + args.val_images) * cols * 2


def warm_cache(runs: list[Path]) -> None:
    """Read every logits file once so that both contenders start from the same page cache."""
    for run in runs:
        for file in sorted(run.rglob("*.npy")):
            with open(file, "rb") as handle:
                while handle.read(64 << 20):
                    pass


# ----------------------------------------------------------------------------------------
# The contenders (run in child processes)
# ----------------------------------------------------------------------------------------
def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, from /proc."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_streaming(runs: list[str], out: str, chunk_rows: int | None, fit: bool) -> dict:
    from herbens.ensemble.pipeline import ensemble_runs

    options = {} if fit else dict(weights=tuple(FIXED["weights"][:len(runs)]), calibrate=False,
                                  tau=FIXED["tau"], hierarchy=(FIXED["alpha"], FIXED["beta"]))
    summary = ensemble_runs(runs, out, chunk_rows=chunk_rows, progress=False, log=lambda m: None, **options)
    return {"val": summary["val"]["in_sample"] if summary["val"] else None}


def child_naive(runs: list[str], out: str) -> dict:
    """What one writes without a streaming tool: load everything, combine whole matrices."""
    import pandas as pd

    from herbens.metrics import level_scores

    tax = Taxonomy.load(Path(runs[0]) / "taxonomy.json")
    weights = np.asarray(FIXED["weights"][:len(runs)]) / np.sum(FIXED["weights"][:len(runs)])
    counts = np.maximum(tax.counts, 1).astype(np.float64)
    log_prior = np.log(counts / counts.sum()).astype(np.float32)

    def load(split):
        ids = [json.loads((logits_dir(r, split) / "image_ids.json").read_text()) for r in runs]
        arrays = []
        for r, run_ids in zip(runs, ids):
            order = None if run_ids == ids[0] else np.array([{i: k for k, i in enumerate(run_ids)}[i] for i in ids[0]])
            loaded = {lv: np.load(logits_dir(r, split) / f"{lv}.npy") for lv in LEVELS}
            arrays.append(loaded if order is None else {lv: a[order] for lv, a in loaded.items()})
        return ids[0], arrays

    def combined(arrays, level):
        total = np.zeros(arrays[0][level].shape, np.float32)
        for w, a in zip(weights, arrays):
            total += a[level] * np.float32(w)
        return total

    def log_softmax(x):
        shifted = x - x.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    def predict(arrays):
        scores = combined(arrays, "species")
        scores -= np.float32(FIXED["tau"]) * log_prior
        scores += np.float32(FIXED["alpha"]) * log_softmax(combined(arrays, "genus"))[:, tax.species_to_genus]
        scores += np.float32(FIXED["beta"]) * log_softmax(combined(arrays, "family"))[:, tax.species_to_family]
        return scores.argmax(axis=1)

    val_ids, val = load("val")
    labels = np.load(logits_dir(runs[0], "val") / "labels.npy")
    val_scores = level_scores(labels, predict(val), tax)
    del val
    test_ids, test = load("test")
    pred = predict(test)
    pd.DataFrame({"Id": test_ids, "Predicted": tax.category_of(pred)}).to_csv(out, index=False)
    return {"val": val_scores}


def reset_peak_rss() -> None:
    """Restart this process's VmHWM at its current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def child_fit_cost(runs: list[str], chunk_rows: int | None) -> dict:
    """In one process, on the validation split: one plain-mean pass (the read every fit needs),
    the fit cross-fitted as before issue 24 (no nesting) and the nested fit; time and peak RSS
    above the starting point of each."""
    from herbens.ensemble.combine import Params
    from herbens.ensemble.options import EnsembleOptions
    from herbens.ensemble.pipeline import fit_ensemble, predict_split
    from herbens.ensemble.stores import align_split, auto_chunk_rows, class_space, labelled, load_runs

    loaded = load_runs(runs)
    space = class_space(loaded, log=lambda m: None)
    val = labelled(align_split(loaded, "val", space, exact=False, log=lambda m: None))
    opts = EnsembleOptions().check(len(runs))
    opts.chunk_rows = chunk_rows or auto_chunk_rows(space.num_classes)
    out = {}

    def timed(name, work):
        reset_peak_rss()
        before, start = rss_mb("VmRSS"), time.perf_counter()
        result = work()
        out[name] = {"s": time.perf_counter() - start, "peak_above_mb": rss_mb("VmHWM") - before}
        return result

    timed("plain", lambda: predict_split(val, Params.initial(len(runs)), opts.chunk_rows, progress=False))
    for name, nested in (("flat", False), ("nested", True)):
        _, steps, _ = timed(name, lambda: fit_ensemble(val, space, opts, ("species", "genus", "family"), len(runs),
                                                       log=lambda m: None, nested=nested))
        out[name]["steps"] = [s["step"] for s in steps]
    # Fitted values of one fit: a temperature per run and level, the weights (runs - 1), tau,
    # alpha and beta (what the fit below chooses, whether kept or not).
    out["fitted_values"] = 3 * len(runs) + (len(runs) - 1) + 1 + 2
    return out


def child_main(argv: list[str]) -> None:
    kind, out, chunk_rows, *runs = argv
    # Import everything either contender uses first, so that "above imports" is the work's own.
    import pandas  # noqa: F401
    import scipy.optimize  # noqa: F401

    import herbens.ensemble.pipeline  # noqa: F401
    import herbens.ensemble.fit  # noqa: F401
    import herbens.metrics  # noqa: F401

    baseline = rss_mb("VmRSS")
    start = time.perf_counter()
    if kind == "naive":
        result = child_naive(runs, out)
    elif kind == "fitcost":
        result = child_fit_cost(runs, int(chunk_rows) or None)
    else:
        result = child_streaming(runs, out, int(chunk_rows) or None, fit=kind == "fit")
    result["work_s"] = time.perf_counter() - start
    result["peak_rss_mb"] = rss_mb("VmHWM")
    result["import_rss_mb"] = baseline
    print("RESULT " + json.dumps(result))


def measure(kind: str, runs: list[Path], out: Path, chunk_rows: int | None) -> dict:
    warm_cache(runs)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(out), str(chunk_rows or 0), *map(str, runs)],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "wall_s": wall}


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------
def same_predictions(a: Path, b: Path) -> tuple[int, int]:
    import pandas as pd

    x = pd.read_csv(a, dtype={"Id": str}).set_index("Id")["Predicted"]
    y = pd.read_csv(b, dtype={"Id": str}).set_index("Id")["Predicted"].reindex(x.index)
    return int((x == y).sum()), len(x)


def report(args, gen_s: float, disk: int, naive: dict, stream: dict, fitted: dict | None, agree) -> None:
    scale_data = (KAGGLE_RUNS * KAGGLE_IMAGES) / (args.runs * args.images)
    scale_runs = KAGGLE_RUNS / args.runs
    from herbens.ensemble.stores import auto_chunk_rows

    chunk = args.chunk_rows or auto_chunk_rows(args.classes)
    print(f"\nensemble benchmark: {args.runs} runs x {args.images:,} test images x {args.classes:,} species "
          f"(+{args.genera:,} genera, +{args.families:,} families), float16; val {args.val_images:,} images; "
          f"streaming chunk {chunk} rows")
    print(f"logits on disk: {disk / 1e9:.2f} GB, generated in {gen_s:.0f} s")
    print(f"{'':<36}{'wall (s)':>10}{'work (s)':>10}{'peak RSS (MB)':>15}{'above imports':>15}")
    rows = [("naive numpy (load everything)", naive), ("streaming (same fixed params)", stream)]
    if fitted:
        rows.append(("streaming, fitting all on val", fitted))
    for name, m in rows:
        print(f"{name:<36}{m['wall_s']:>10.1f}{m['work_s']:>10.1f}{m['peak_rss_mb']:>15.0f}"
              f"{m['peak_rss_mb'] - m['import_rss_mb']:>15.0f}")
    print(f"streaming / naive: wall time {stream['wall_s'] / naive['wall_s']:.2f}x (work only "
          f"{stream['work_s'] / naive['work_s']:.2f}x), peak RSS {stream['peak_rss_mb'] / naive['peak_rss_mb']:.3f}x "
          f"(above imports {_above(stream) / max(_above(naive), 1):.3f}x)")
    print(f"identical predictions: {agree[0]:,} / {agree[1]:,}; val species macro-F1 "
          f"naive {naive['val']['species_macro_f1']:.4f}, streaming {stream['val']['species_macro_f1']:.4f}")
    print(f"linear projection to {KAGGLE_RUNS} runs x {KAGGLE_IMAGES:,} images (x{scale_data:.1f} data; "
          "a projection, not a measurement; imports counted once):")
    print(f"  naive:     ~{naive['work_s'] * scale_data:.0f} s, "
          f"~{(naive['import_rss_mb'] + _above(naive) * scale_data) / 1024:.0f} GB "
          "(time and memory linear in runs x images)")
    print(f"  streaming: ~{stream['work_s'] * scale_data:.0f} s (linear in runs x images), "
          f"~{(stream['import_rss_mb'] + _above(stream) * scale_runs) / 1024:.1f} GB (one chunk per run: "
          "linear in runs, not in images, apart from ids: ~50 MB per run at 210k images)")


def report_fit_cost(cost: dict) -> None:
    plain, values = cost["plain"], cost["fitted_values"]
    print(f"\nfit on validation, one process ({values} fitted values; peak RSS above each start):")
    print(f"{'':<44}{'time (s)':>10}{'x plain':>9}{'x plain / value':>17}{'peak RSS (MB)':>15}")
    for name, label in (("plain", "plain mean: one pass over val logits"),
                        ("flat", "fit, cross-fitted (before issue 24)"), ("nested", "fit, nested (honest estimate)")):
        m = cost[name]
        ratio = m["s"] / max(plain["s"], 1e-9)
        print(f"{label:<44}{m['s']:>10.2f}{ratio:>9.1f}{ratio / values:>17.2f}{m['peak_above_mb']:>15.0f}")
    print(f"nested / cross-fitted: time {cost['nested']['s'] / cost['flat']['s']:.2f}x")


def _above(m: dict) -> float:
    return m["peak_rss_mb"] - m["import_rss_mb"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        child_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--images", type=int, default=50_000, help="test images")
    p.add_argument("--val-images", type=int, default=2_000)
    p.add_argument("--classes", type=int, default=15_501)
    p.add_argument("--genera", type=int, default=2_564)
    p.add_argument("--families", type=int, default=272)
    p.add_argument("--chunk-rows", type=int, default=0, help="streaming chunk rows (default: the ensembler's)")
    p.add_argument("--workdir", type=Path, default=None, help="where to generate (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated runs")
    p.add_argument("--no-fit-run", action="store_true", help="skip the informational fitted streaming run")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a check that it all works")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.val_images, args.classes, args.genera, args.families = 3000, 500, 2000, 300, 40
    if args.runs > len(FIXED["weights"]):
        FIXED["weights"] = list(np.linspace(1.0, 0.2, args.runs))
    workdir = Path(tempfile.mkdtemp(prefix="herbens-bench-", dir=args.workdir))
    try:
        need, free = bytes_needed(args), shutil.disk_usage(workdir).free
        if need * 1.1 > free:
            raise SystemExit(f"needs {need / 1e9:.1f} GB of disk in {workdir}, {free / 1e9:.1f} GB free; "
                             "shrink --images or --runs")
        start = time.perf_counter()
        runs = generate(workdir / "runs", args)
        gen_s = time.perf_counter() - start
        naive = measure("naive", runs, workdir / "naive.csv", args.chunk_rows)
        stream = measure("streaming", runs, workdir / "streaming.csv", args.chunk_rows)
        fitted = None if args.no_fit_run else measure("fit", runs, workdir / "fitted.csv", args.chunk_rows)
        agree = same_predictions(workdir / "naive.csv", workdir / "streaming.csv")
        report(args, gen_s, need, naive, stream, fitted, agree)
        if not args.no_fit_run:
            report_fit_cost(measure("fitcost", runs, workdir / "unused.csv", args.chunk_rows))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
