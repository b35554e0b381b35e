"""ScoreCache lookup throughput: 4096-key lookups against a multi-million-row cache of Parquet parts.

Writes `--rows` keys (webdataset-style "shard-NNNNNN/sample-NNNNNNNNN") with per-example losses into
`--parts` parts under a temporary directory, times `ScoreCache.open` (read + hash + sort, once), then times
`lookup` and `scores` on random present keys, next to a Polars left join of the same keys (the per-step
alternative the cache avoids).

    .venv/bin/python benchmarks/cache_lookup.py [--rows 5000000] [--out benchmarks/results/cache_lookup.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import polars as pl
from results_io import write_json  # benchmarks/ is on sys.path when a script runs

from curate import ClassificationScorer
from curate.cache import KEY, ScoreCache, write_part


def median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (all of the process's threads) per call. On a shared machine
    the wall time includes waiting for a CPU; the CPU time is what a lookup costs when it has one."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--parts", type=int, default=10)
    parser.add_argument("--lookup", type=int, default=4096, help="keys per lookup (a superbatch)")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/cache_lookup.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    ids = pl.Series(rng.permutation(args.rows))
    keys = pl.select(pl.format("shard-{}/sample-{}", (ids // 10_000).cast(pl.String).str.zfill(6),
                               ids.cast(pl.String).str.zfill(9))).to_series()
    losses = rng.gamma(2.0, 1.0, args.rows).astype(np.float32)
    meta = {"reference_hash": "benchmark", "scorer": "ClassificationScorer", "dataset": "synthetic"}
    # the load average says whether other processes shared the CPUs while this ran
    results: dict = {"rows": args.rows, "parts": args.parts, "lookup_keys": args.lookup, "cpus": os.cpu_count(),
                     "load_average_1min": os.getloadavg()[0], "cpu": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        bounds = np.linspace(0, args.rows, args.parts + 1).astype(int)
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            write_part(os.path.join(root, f"part-{i:05d}.parquet"), keys[lo:hi], ref_loss=losses[lo:hi], metadata=meta)
        results["write_s"] = time.perf_counter() - start
        results["bytes_on_disk"] = sum(os.path.getsize(os.path.join(root, f)) for f in os.listdir(root))
        start = time.perf_counter()
        cache = ScoreCache.open(root)
        results["open_s"] = time.perf_counter() - start

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
    results["lookups"] = {
        name: {"ms": wall * 1e3, "keys_per_s": args.lookup / wall, "cpu_ms": cpu * 1e3,
               "keys_per_cpu_s": args.lookup / max(cpu, 1e-9)}
        for name, (wall, cpu) in timings.items()
    }
    results["join_over_lookup"] = timings["polars left join"][0] / timings["lookup (list of str)"][0]

    print(f"ScoreCache: {args.rows:,} rows in {args.parts} parts ({results['bytes_on_disk'] / 2**20:.0f} MiB); "
          f"write {results['write_s']:.2f} s, open (read + hash + sort) {results['open_s']:.2f} s")
    print(f"{'operation':<28}{'ms / ' + str(args.lookup) + ' keys':>18}{'M keys/s':>12}{'CPU ms':>10}"
          f"{'M keys/CPU-s':>14}")
    for name, row in results["lookups"].items():
        print(f"{name:<28}{row['ms']:>18.3f}{row['keys_per_s'] / 1e6:>12.2f}{row['cpu_ms']:>10.3f}"
              f"{row['keys_per_cpu_s'] / 1e6:>14.2f}")
    print(f"polars join / lookup: {results['join_over_lookup']:.1f}x  (1-min load average at start: "
          f"{results['load_average_1min']:.1f} on {os.cpu_count()} CPUs)")
    write_json(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
