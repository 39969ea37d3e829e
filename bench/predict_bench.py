"""``herbens predict`` against ``herbens infer``: images/s on the same images, members and views,
with 1 and 2 processes, and peak RSS of predict at two input sizes.

    python bench/predict_bench.py [--workdir /tmp/predict_bench] [--test-per-species 50]
                                  [--rss 10000 100000] [--batch 32] [--name predict_bench]

Builds a synthetic herbarium, trains one tiny run (demo_ce, 48 x 32 px) and exports it as a
bundle (one member, the run's views: centre + hflip), then on the run's test images:

* ``herbens infer RUN --split test`` and ``herbens predict BUNDLE LIST`` (same images, member
  and views), each timed as a whole command in a child process (model/bundle loading included),
  with one process and with two (``torchrun --nproc_per_node 2``, CPU, gloo);
* peak RSS (``ru_maxrss`` of the child) of ``herbens predict`` over lists of ``--rss`` paths
  (the test images repeated), showing memory stays flat in the number of images.

Writes ``bench/results/<name>.json`` and ``.md``. On a GPU, pass ``--device cuda`` and a larger
``--batch``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["train.epochs=1", "train.batch_size=8", "input.size=[48,32]", "data.num_workers=0",
        "data.val_fraction=0.25", "name=bench"]


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def timed(command: list[str], processes: int = 1) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, largest child) of ``python -m herbens COMMAND``."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run([*launcher, "-m", "herbens", *command], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}")
    return seconds, max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, before)


def peak_rss(command: list[str]) -> int:
    """Peak RSS (KiB) of one fresh child running ``herbens COMMAND``."""
    code = ("import resource, sys; from herbens.cli.main import main; status = main(sys.argv[1:]); "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(status)")
    proc = subprocess.run([sys.executable, "-c", code, *command], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}")
    return int(proc.stdout.split("RSS")[-1].split()[0])


def prepare(work: Path, test_per_species: int) -> tuple[Path, Path, Path, list[str]]:
    from herbens.bundle.export import export_bundle
    from herbens.data.metadata import load_test_metadata
    from herbens.data.synth import synthesize
    from herbens.train import main as train_main

    data = work / "data"
    if not (data / "test_metadata.json").exists():
        synthesize(data, species=6, seed=3, long_edge=64, min_images=4, max_images=12,
                   test_per_species=test_per_species, progress=False)
    run = work / "runs" / "bench"
    if not (run / "model.pt").exists():
        assert train_main(["demo_ce", f"data.root={data}", f"output_dir={work / 'runs'}", *TINY]) == 0
    bundle = work / "bundle"
    if not bundle.exists():
        export_bundle(run, bundle, log=lambda _: None)
    test = load_test_metadata(data / "test_metadata.json")
    paths = [str(test.attrs["images_dir"] / f) for f in test["file_name"]]
    return data, run, bundle, paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/predict_bench"))
    parser.add_argument("--test-per-species", type=int, default=50)
    parser.add_argument("--rss", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="predict_bench")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data, run, bundle, paths = prepare(work, args.test_per_species)
    listing = work / "test.txt"
    listing.write_text("".join(p + "\n" for p in paths))
    result = {"images": len(paths), "batch": args.batch, "device": args.device, "threads": child_env()["OMP_NUM_THREADS"],
              "throughput": {}, "peak_rss_MiB": {}}
    for processes in (1, 2):
        infer_s, _ = timed(["infer", str(run), "--split", "test", "--data-root", str(data),
                            "--batch-size", str(args.batch)], processes)
        out = work / f"pred_{processes}.csv"
        predict_s, _ = timed(["predict", str(bundle), str(listing), "-o", str(out), "--batch-size", str(args.batch),
                              "--device", args.device, "--no-progress"], processes)
        result["throughput"][processes] = {"infer_img_s": len(paths) / infer_s, "predict_img_s": len(paths) / predict_s,
                                           "predict_over_infer": infer_s / predict_s}
        print(processes, "process(es):", result["throughput"][processes], flush=True)
    for n in args.rss:
        big = work / f"list_{n}.txt"
        with open(big, "w") as handle:
            for i in range(n):
                handle.write(paths[i % len(paths)] + "\n")
        rss = peak_rss(["predict", str(bundle), str(big), "-o", str(work / f"pred_{n}.parquet"), "--format", "parquet",
                        "--batch-size", str(args.batch), "--device", args.device, "--no-progress"])
        result["peak_rss_MiB"][n] = rss / 1024
        print(f"{n} paths: peak RSS {rss / 1024:.0f} MiB", flush=True)
    out = ROOT / "bench" / "results" / args.name
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {args.name}", "", f"{len(paths)} test images, batch {args.batch}, {args.device}, "
             f"OMP_NUM_THREADS={result['threads']}", "", "| processes | infer img/s | predict img/s | predict / infer |",
             "|---|---|---|---|"]
    lines += [f"| {p} | {t['infer_img_s']:.1f} | {t['predict_img_s']:.1f} | {t['predict_over_infer']:.2f} |"
              for p, t in result["throughput"].items()]
    lines += ["", "| paths | peak RSS MiB |", "|---|---|"]
    lines += [f"| {n:,} | {v:.0f} |" for n, v in result["peak_rss_MiB"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
