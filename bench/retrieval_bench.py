"""Streaming exact kNN search vs a naive load-everything search, peak memory in the same run.

Writes a synthetic index of unit float16 embeddings (default 200,000 x 512, the size of a
NAFlora-scale training split at a 512-d neck, 195 MB) and a query split (default 1,000 rows)
through the embeddings store. Then, each in a fresh subprocess (honest peak RSS: the child's
own VmHWM) after the same page-cache warm-up:

* naive: ``np.load`` the whole index into float32, one ``queries @ index.T`` similarity
  matrix, ``argpartition`` + sort for the top k;
* streaming: :func:`herbens.retrieval.search.exact_topk` on the memory-mapped store (index
  chunks of 8,192 rows, query blocks of 256, pages released after each chunk);
* faiss (when installed, for information): ``IndexFlatIP`` exact search.

Prints wall times, peak RSS above the imports, the ratio streaming / naive, and whether the
neighbours agree.

    python bench/retrieval_bench.py                          # 200k x 512, 1,000 queries, k = 10
    python bench/retrieval_bench.py --index 20000 --queries 200   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ensemble_bench import rss_mb, warm_cache  # noqa: E402  (same RSS reading and warm-up)

from herbens.stores.embeddings import open_embeddings_writer, read_embeddings  # noqa: E402


def generate(workdir: Path, rows: int, queries: int, dim: int, seed: int) -> None:
    """Unit random embeddings written block by block (the generator stays small)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", rows), ("val", queries)):
        with open_embeddings_writer(workdir, split, [str(i) for i in range(n)], dim,
                                    {"taxonomy_hash": "bench"}) as writer:
            for start in range(0, n, 16384):
                writer.write(start, rng.standard_normal((min(16384, n - start), dim), dtype=np.float32))


def child_naive(workdir: Path, k: int) -> np.ndarray:
    index = np.load(workdir / "embeddings" / "train" / "embeddings.npy").astype(np.float32)
    queries = np.load(workdir / "embeddings" / "val" / "embeddings.npy").astype(np.float32)
    sims = queries @ index.T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.lexsort((top, -np.take_along_axis(sims, top, axis=1)), axis=1)
    return np.take_along_axis(top, order, axis=1)


def child_main(kind: str, workdir: Path, k: int) -> None:
    import herbens.ensemble.combine  # noqa: F401  (imported by the store's page release)
    import herbens.retrieval.search as search

    if kind == "faiss":
        import faiss  # noqa: F401
    baseline = rss_mb("VmRSS")
    start = time.perf_counter()
    if kind == "naive":
        rows = child_naive(workdir, k)
    else:
        queries = read_embeddings(workdir, "val").matrix
        fn = search.exact_topk if kind == "streaming" else search.faiss_topk
        rows = fn(queries, read_embeddings(workdir, "train"), k)[1]
    work = time.perf_counter() - start
    np.save(workdir / f"{kind}.npy", rows)
    print("RESULT " + json.dumps({"work_s": work, "peak_rss_mb": rss_mb("VmHWM"), "import_rss_mb": baseline}))


def measure(kind: str, workdir: Path, k: int) -> dict:
    warm_cache([workdir])
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(workdir), "--k", str(k)],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["above_imports_mb"] = result["peak_rss_mb"] - result["import_rss_mb"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=int, default=200_000, help="index rows (default: %(default)s)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the synthetic store goes (default: a temp dir)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("child_dir", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, Path(args.child_dir), args.k)
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        generate(workdir, args.index, args.queries, args.dim, args.seed)
        print(f"index {args.index} x {args.dim} fp16 ({args.index * args.dim * 2 / 2**20:.0f} MB), "
              f"{args.queries} queries, k {args.k}; generated in {time.perf_counter() - start:.1f} s")
        kinds = ["naive", "streaming"]
        try:
            import faiss  # noqa: F401
            kinds.append("faiss")
        except ImportError:
            pass
        results = {kind: measure(kind, workdir, args.k) for kind in kinds}
        ref = np.load(workdir / "naive.npy")
        for kind, r in results.items():
            same = int((np.load(workdir / f"{kind}.npy") == ref).all(axis=1).sum())
            print(f"{kind:<10} work {r['work_s']:7.2f} s   peak RSS {r['peak_rss_mb']:7.0f} MB "
                  f"({r['above_imports_mb']:6.0f} MB above imports)   same neighbours as naive {same}/{len(ref)}")
        naive, stream = results["naive"], results["streaming"]
        print(f"ratio streaming / naive: peak RSS above imports {stream['above_imports_mb'] / naive['above_imports_mb']:.3f}x, "
              f"total peak RSS {stream['peak_rss_mb'] / naive['peak_rss_mb']:.3f}x, "
              f"work time {stream['work_s'] / naive['work_s']:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # a shared 2-core box: one BLAS thread each
    sys.exit(main())
