"""Learner side: prefetch overlap, WeightSync push cost, and the FLOP ledger of live learner vs ACL actor.

A real MLP learner trains (forward, backward, SGD) on batches selected from superbatches of B = 5·b.
Measured side by side on the same data and models:

* seconds per training step with prefetch=0 (score, select, then train, in one thread) and prefetch=1
  (superbatch n+1 scored in a background thread while batch n trains); torch uses one intra-op thread
  so the two Python threads can each run on a core;
* `WeightSync.push()` milliseconds (in-process and shared-memory) for the learner's size;
* the FLOP ledger (`Pipeline.stats()`): scoring with the learner vs with a small ACL actor.

    .venv/bin/python benchmarks/learner_side.py [--steps 30] [--out benchmarks/results/learner_side.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F
from results_io import write_json  # benchmarks/ is on sys.path when a script runs
from torch import nn

import curate
from curate.actor import Actor
from curate.sync import WeightSync


def mlp(dims: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, c) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers += [nn.Linear(a, c)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
    return nn.Sequential(*layers)


def samples(n: int, dim: int, classes: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, dim, generator=g), torch.randint(classes, (n,), generator=g)
    return [{"__key__": f"s{i}", "input": x[i], "target": y[i]} for i in range(n)]


def train(pipe, model, steps: int) -> tuple[float, dict]:
    """Seconds per step over `steps` steps after one warm-up step, and the pipeline's stats."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    it = iter(pipe)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        batch = next(it)
        opt.zero_grad()
        F.cross_entropy(model(batch["input"]), batch["target"]).backward()
        opt.step()
    return (time.perf_counter() - start) / steps, pipe.stats()


def median_ms(fn, repeats: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dims", default="512,2048,2048,10", help="learner layer widths")
    parser.add_argument("--actor-dims", default="512,64,10")
    parser.add_argument("--out", default="benchmarks/results/learner_side.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dims, actor_dims = [int(d) for d in args.dims.split(",")], [int(d) for d in args.actor_dims.split(",")]
    b, superbatch = args.batch, 5 * args.batch
    data = samples(superbatch * (args.steps + 2), dims[0], dims[-1])
    scorer = curate.ClassificationScorer()
    results: dict = {"learner_dims": dims, "actor_dims": actor_dims, "batch_size": b, "superbatch_size": superbatch,
                     "steps": args.steps, "cpus": os.cpu_count(), "torch_threads": 1,
                     "load_average_1min": os.getloadavg()[0], "cpu": platform.processor() or platform.machine()}

    common = dict(batch_size=b, superbatch_size=superbatch, scorer=scorer, rule="hard_learner", method="topk",
                  shuffle_buffer=0)
    runs = {}
    for prefetch in (0, 1):
        model = mlp(dims, seed=0)
        runs[f"learner, prefetch={prefetch}"] = train(curate.pipeline(data, learner=model, prefetch=prefetch,
                                                                      **common), model, args.steps)
        model = mlp(dims, seed=0)
        small = mlp(actor_dims, seed=1)
        actor = Actor(small, torch.optim.SGD(small.parameters(), lr=0.05))
        runs[f"actor, prefetch={prefetch}"] = train(curate.pipeline(data, learner=actor, prefetch=prefetch,
                                                                    train_model=model, **common), model, args.steps)
    results["runs"] = {name: {"ms_per_step": sec * 1e3, **{k: stats.get(k) for k in (
        "score_lag_steps", "flops_per_sample", "scoring_flops", "actor_training_flops", "training_flops",
        "flops_overhead", "break_even_step_saving")}} for name, (sec, stats) in runs.items()}
    for kind in ("learner", "actor"):
        results[f"{kind}_prefetch_speedup"] = (results["runs"][f"{kind}, prefetch=0"]["ms_per_step"]
                                               / results["runs"][f"{kind}, prefetch=1"]["ms_per_step"])

    model = mlp(dims, seed=0)
    megabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    results["push"] = {"learner_MiB": megabytes,
                       "in_process_ms": median_ms(WeightSync(model).push),
                       "shared_memory_ms": median_ms(WeightSync(model, shared=True).push)}

    print(f"learner {dims} ({megabytes:.1f} MiB), actor {actor_dims}; b={b}, B={superbatch}, "
          f"{args.steps} steps, 1 torch thread, load average {results['load_average_1min']:.1f} on "
          f"{os.cpu_count()} CPUs")
    print(f"{'run':<22}{'ms/step':>9}{'lag':>5}{'scoring GFLOP':>15}{'training GFLOP':>16}{'overhead':>10}"
          f"{'break-even':>12}")
    for name, row in results["runs"].items():
        print(f"{name:<22}{row['ms_per_step']:>9.1f}{row['score_lag_steps']:>5}"
              f"{(row['scoring_flops'] + row['actor_training_flops']) / 1e9:>15.2f}"
              f"{row['training_flops'] / 1e9:>16.2f}{row['flops_overhead']:>10.3f}"
              f"{row['break_even_step_saving']:>11.3f}x")
    print(f"prefetch speedup: learner {results['learner_prefetch_speedup']:.2f}x, "
          f"actor {results['actor_prefetch_speedup']:.2f}x")
    print(f"WeightSync.push of {megabytes:.1f} MiB: in-process {results['push']['in_process_ms']:.2f} ms, "
          f"shared memory {results['push']['shared_memory_ms']:.2f} ms")
    write_json(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
