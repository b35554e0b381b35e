"""Semantic dedup at scale: wall time and peak RSS of `curate.curation.semantic_dedup` on N × d embeddings.

The data: N float32 rows around `topics` random unit centres (siblings have cosine ≈ 0.5, so none is a
duplicate), of which `dup_frac` are planted copies of random base rows, half exact and half with small
noise (cosine ≈ 0.99). Keys are a random permutation, so the planted copy is not always the higher key.
Each configuration runs in a fresh subprocess, so ru_maxrss is that run's own peak (faiss allocates outside
Python's allocator, so tracemalloc would not see it); the peak RSS before dedup (interpreter, imports and
the data) is printed beside it, the difference being what dedup itself added. CPU seconds are printed
beside wall seconds, with the load average: on a shared machine wall time moves with other processes.

    .venv/bin/python benchmarks/dedup.py                          # 1M × 256, k = 1000 ≈ √N
    .venv/bin/python benchmarks/dedup.py --n-clusters 500 1000 2000  # the k sweep, one subprocess each
    .venv/bin/python benchmarks/dedup.py --n 200000 --n-clusters 250 500 1000
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

import numpy as np
from results_io import write_json  # benchmarks/ is on sys.path when a script runs

GIB = 1 << 30


def make_data(n: int, d: int, dup_frac: float, topics: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Keys, embeddings (n, d) float32 and the planted group of each row (the row index it copies, or itself)."""
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup_frac)
    n_base = n - n_dup
    centres = rng.standard_normal((topics, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), np.float32)
    for a in range(0, n_base, 1 << 16):  # chunked so no float64 N × d temporary
        b = min(a + (1 << 16), n_base)
        x[a:b] = centres[rng.integers(topics, size=b - a)] + 0.06 * rng.standard_normal((b - a, d), dtype=np.float32)
    source = rng.integers(n_base, size=n_dup)
    x[n_base:] = x[source]
    near = n_base + np.arange(n_dup // 2, n_dup)
    x[near] += 0.01 * rng.standard_normal((len(near), d), dtype=np.float32)
    group = np.concatenate([np.arange(n_base), source])
    keys = [f"{k:08d}" for k in rng.permutation(n)]
    return keys, x, group


def precision_recall(group: np.ndarray, removed: np.ndarray) -> tuple[float, float]:
    """Against the planted groups, whichever member a group keeps: each group may lose all but one member."""
    size = np.bincount(group)
    lost = np.bincount(group[removed], minlength=len(size))
    correct = np.minimum(lost, np.maximum(size - 1, 0)).sum()
    return float(correct / max(removed.sum(), 1)), float(correct / max((size - 1).clip(0).sum(), 1))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(args: argparse.Namespace) -> dict:
    from curate.curation import semantic_dedup

    t0 = time.perf_counter()
    keys, x, group = make_data(args.n, args.d, args.dup_frac, args.topics, args.seed)
    gen_s = time.perf_counter() - t0
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load = os.getloadavg()[0]
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    result = semantic_dedup(keys, x, n_clusters=args.n_clusters[0], threshold=args.threshold, seed=args.seed)
    dedup_s, cpu_s = time.perf_counter() - t0, cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    removed = ~result.kept
    precision, recall = precision_recall(group, removed)
    sizes = np.bincount(result.clusters)
    return {
        "n": args.n,
        "d": args.d,
        "n_clusters": args.n_clusters[0],
        "threshold": args.threshold,
        "planted": int(args.n * args.dup_frac),
        "removed": int(removed.sum()),
        "precision": precision,
        "recall": recall,
        "largest_cluster": int(sizes.max()),
        "generate_s": gen_s,
        "dedup_s": dedup_s,
        "dedup_cpu_s": cpu_s,
        "load_before": load,
        "rss_before_dedup_gib": rss_data / GIB,
        "peak_rss_gib": peak / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--n-clusters", type=int, nargs="+", default=[1000])
    parser.add_argument("--dup-frac", type=float, default=0.05)
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dedup.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    rows = []
    for k in args.n_clusters:
        argv = [sys.executable, __file__, "--child", "--n-clusters", str(k)]
        for name in ("n", "d", "dup_frac", "topics", "threshold", "seed"):
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        proc = subprocess.run(argv, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    cols = ["n", "d", "n_clusters", "largest_cluster", "planted", "removed", "precision", "recall"]
    cols += ["dedup_s", "dedup_cpu_s", "load_before", "rss_before_dedup_gib", "peak_rss_gib"]
    print(" ".join(f"{c:>18}" for c in cols))
    for row in rows:
        print(" ".join(f"{row[c]:>18.3f}" if isinstance(row[c], float) else f"{row[c]:>18}" for c in cols))
    write_json({"cpus": len(os.sched_getaffinity(0)), "runs": rows}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
