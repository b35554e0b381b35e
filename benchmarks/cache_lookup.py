"""ScoreCache at scale: lookup throughput, load time and peak memory of a full cache vs one rank's share,
float32 vs float16 embedding parts.

1. Lookups: writes `--rows` keys (webdataset-style "shard-NNNNNN/sample-NNNNNNNNN") with per-example losses
   into `--parts` parts, times `ScoreCache.open` once, then times 4096-key `lookup` and `scores` on random
   present keys, next to a Polars left join of the same keys (the per-step alternative the cache avoids).
2. Loading: writes `--emb-rows` rows with losses and `--dim`-wide image/text embeddings into `--emb-parts`
   parts (as `curate precompute` names them, part i = shard i), once in float32 and once in float16, and opens
   each in a fresh process: the whole cache, and rank 0 of `--world` (`parts=range(0, n, world)`). Each child
   reports its open time and its peak RSS above what it held before `open` (the imports).

    .venv/bin/python benchmarks/cache_lookup.py [--rows 5000000] [--out benchmarks/results/cache_lookup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from results_io import write_json  # benchmarks/ is on sys.path when a script runs

import curate
from curate import ClassificationScorer
from curate.cache import KEY, ScoreCache, write_part

META = {"reference_hash": "benchmark", "scorer": "ClassificationScorer", "dataset": "synthetic"}

# Run in a fresh interpreter per measurement: the peak only grows, so one process cannot measure two opens.
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a child's would start at this process's.
CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from curate.cache import ScoreCache
def status(field):  # bytes
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024
before = status("VmRSS")
start = time.perf_counter()
cache = ScoreCache.open({path!r}, parts={parts})
seconds = time.perf_counter() - start
print(json.dumps({{"rows": len(cache), "open_s": seconds, "peak_above_imports": status("VmHWM") - before,
                  "held_after_open": status("VmRSS") - before}}))
"""


def median_time(fn, repeats: int) -> tuple[float, float, float]:
    """Median wall seconds, median CPU seconds (all of the process's threads) and fastest wall seconds per call.
    On a shared machine the median wall time includes waiting for a CPU and caches other processes thrash;
    the fastest call is what a lookup costs when it has the CPU to itself."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu)), float(np.min(wall))


def synthetic_keys(rng: np.random.Generator, rows: int) -> pl.Series:
    ids = pl.Series(rng.permutation(rows))
    return pl.select(pl.format("shard-{}/sample-{}", (ids // 10_000).cast(pl.String).str.zfill(6),
                               ids.cast(pl.String).str.zfill(9))).to_series()


def lookups(args, rng: np.random.Generator) -> dict:
    keys = synthetic_keys(rng, args.rows)
    losses = rng.gamma(2.0, 1.0, args.rows).astype(np.float32)
    out: dict = {}
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        bounds = np.linspace(0, args.rows, args.parts + 1).astype(int)
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            write_part(os.path.join(root, f"part-{i:05d}.parquet"), keys[lo:hi], ref_loss=losses[lo:hi], metadata=META)
        out["write_s"] = time.perf_counter() - start
        out["bytes_on_disk"] = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))
        start = time.perf_counter()
        cache = ScoreCache.open(root)
        out["open_s"] = time.perf_counter() - start

    queries = [keys.gather(rng.integers(0, args.rows, args.lookup)) for _ in range(16)]
    lists = [q.to_list() for q in queries]  # what Score passes: batch["__key__"], a list of str
    rows, found = cache.lookup(lists[0])
    assert found.all() and (cache.keys.gather(rows.numpy()) == queries[0]).all(), "lookup returned wrong rows"
    absent = [f"absent-{i}" for i in range(args.lookup)]
    assert not cache.lookup(absent)[1].any()

    step = iter(range(10**9))
    scorer = ClassificationScorer()
    frame = pl.DataFrame({KEY: cache.keys, "ref_loss": cache.ref_loss})
    timings = {
        "lookup (list of str)": median_time(lambda: cache.lookup(lists[next(step) % 16]), args.repeats),
        "lookup (absent keys)": median_time(lambda: cache.lookup(absent), args.repeats),
        "scores (lookup + gather)": median_time(lambda: cache.scores({KEY: lists[next(step) % 16]}, scorer),
                                                args.repeats),
        "polars left join": median_time(lambda: pl.DataFrame({KEY: lists[next(step) % 16]}).join(
            frame, on=KEY, how="left"), max(5, args.repeats // 20)),
    }
    out["lookups"] = {
        name: {"ms": wall * 1e3, "keys_per_s": args.lookup / wall, "cpu_ms": cpu * 1e3,
               "keys_per_cpu_s": args.lookup / max(cpu, 1e-9), "fastest_ms": fastest * 1e3,
               "fastest_keys_per_s": args.lookup / fastest}
        for name, (wall, cpu, fastest) in timings.items()
    }
    out["join_over_lookup"] = timings["polars left join"][0] / timings["lookup (list of str)"][0]
    return out


def loading(args, rng: np.random.Generator) -> dict:
    keys = synthetic_keys(rng, args.emb_rows)
    losses = rng.gamma(2.0, 1.0, args.emb_rows).astype(np.float32)
    bounds = np.linspace(0, args.emb_rows, args.emb_parts + 1).astype(int)
    root = str(Path(curate.__file__).resolve().parents[1])  # the children import the curate this process does
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float16"):
            path = os.path.join(tmp, dtype)
            for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                image, text = (rng.standard_normal((hi - lo, args.dim), dtype=np.float32) for _ in range(2))
                image /= np.linalg.norm(image, axis=1, keepdims=True)
                text /= np.linalg.norm(text, axis=1, keepdims=True)
                write_part(os.path.join(path, f"part-{i:05d}.parquet"), keys[lo:hi], ref_loss=losses[lo:hi],
                           image_emb=image, text_emb=text, logit_scale=2.3, logit_bias=-10.0, metadata=META,
                           emb_dtype=dtype)
            row = {"part_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))}
            for name, parts in (("full", "None"), (f"rank 0 of {args.world}", f"range(0, {args.emb_parts}, "
                                                                                f"{args.world})")):
                code = CHILD.format(root=root, path=path, parts=parts)
                child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                row[name] = json.loads(child.stdout)
            out[dtype] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--parts", type=int, default=10)
    parser.add_argument("--lookup", type=int, default=4096, help="keys per lookup (a superbatch)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--emb-rows", type=int, default=1_000_000, help="rows of the embedding cache (loading)")
    parser.add_argument("--emb-parts", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128, help="embedding width")
    parser.add_argument("--world", type=int, default=4, help="ranks sharing the embedding cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/cache_lookup.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    # the load average says whether other processes shared the CPUs while this ran
    results: dict = {"rows": args.rows, "parts": args.parts, "lookup_keys": args.lookup, "cpus": os.cpu_count(),
                     "load_average_1min": os.getloadavg()[0], "cpu": platform.processor() or platform.machine(),
                     "emb_rows": args.emb_rows, "emb_parts": args.emb_parts, "dim": args.dim, "world": args.world}
    results |= lookups(args, rng)
    results["loading"] = loading(args, rng)

    print(f"ScoreCache: {args.rows:,} rows in {args.parts} parts ({results['bytes_on_disk'] / 2**20:.0f} MiB); "
          f"write {results['write_s']:.2f} s, open (read + hash + sort) {results['open_s']:.2f} s")
    print(f"{'operation':<28}{'ms / ' + str(args.lookup) + ' keys':>18}{'M keys/s':>12}{'CPU ms':>10}"
          f"{'M keys/CPU-s':>14}{'fastest ms':>12}{'M keys/s':>10}")
    for name, row in results["lookups"].items():
        print(f"{name:<28}{row['ms']:>18.3f}{row['keys_per_s'] / 1e6:>12.2f}{row['cpu_ms']:>10.3f}"
              f"{row['keys_per_cpu_s'] / 1e6:>14.2f}{row['fastest_ms']:>12.3f}{row['fastest_keys_per_s'] / 1e6:>10.2f}")
    print(f"polars join / lookup: {results['join_over_lookup']:.1f}x")
    print(f"\nLoading {args.emb_rows:,} rows (ref_loss + image/text emb of {args.dim}) in {args.emb_parts} parts; "
          f"each open in a fresh process, peak RSS above the imports")
    print(f"{'parts':<10}{'part MiB':>10}  {'loaded':<20}{'rows':>11}{'open s':>9}{'peak MiB':>10}{'held MiB':>10}")
    for dtype, row in results["loading"].items():
        for name in (n for n in row if n != "part_bytes"):
            child = row[name]
            print(f"{dtype:<10}{row['part_bytes'] / 2**20:>10.0f}  {name:<20}{child['rows']:>11,}"
                  f"{child['open_s']:>9.2f}{child['peak_above_imports'] / 2**20:>10.0f}"
                  f"{child['held_after_open'] / 2**20:>10.0f}")
    print(f"(1-min load average at start: {results['load_average_1min']:.1f} on {os.cpu_count()} CPUs)")
    write_json(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
