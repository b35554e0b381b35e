"""Stage overhead: samples/s of `curate.pipeline` with a trivial scorer vs the bare DataLoader it wraps.

The scorer costs nothing (a `ScoreProvider` returning random per-example losses, or random embeddings
for the JEST sampler), so the difference between the two rates is what the stages themselves cost:
shuffle buffer, superbatch collation, the Score stage's bookkeeping, selection, the FLOP ledger, and the
final batch collation. Rates count *source* samples read per second: with filter ratio f the pipeline
reads B = b / (1 − f) samples per training batch of b, as the bare loader reads them.

Sources (each wrapped as `DataLoader(dataset, batch_size=None)`, the loader the pipeline wraps):

* `pairs-webdataset`: the digit pairs shards (tar parsing, .npy and caption decoding), as `curate run` reads them;
* `in-memory`: a map-style dataset of ready tensors, the cheapest loader there is, so the worst case for
  the stages' relative cost.

`bare (batched)` is the same DataLoader collating batches of b itself, what a training loop without curate
would iterate. Median of `--repeats` epochs, interleaved, torch on one thread.

    .venv/bin/python benchmarks/pipeline.py [--samples 20000] [--out benchmarks/results/pipeline.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_json  # benchmarks/ is on sys.path when a script runs

import curate  # noqa: E402
from curate import ModelScores  # noqa: E402


class RandomScores:
    """The trivial scorer: random per-example losses, or random unit embeddings (sigmoid kind) for JEST."""

    def __init__(self, contrastive: bool = False, dim: int = 64):
        self.contrastive, self.dim = contrastive, dim
        self.generator = torch.Generator().manual_seed(0)

    def scores(self, batch: dict, scorer, micro_batch_size: int) -> ModelScores:
        n = len(batch["__key__"])
        if not self.contrastive:
            return ModelScores.of_losses(torch.rand(n, generator=self.generator))
        emb = [torch.nn.functional.normalize(torch.randn(n, self.dim, generator=self.generator), dim=1)
               for _ in range(2)]
        return ModelScores(kind="sigmoid", image_emb=emb[0], text_emb=emb[1], scale=10.0, bias=-10.0)


class InMemory(Dataset):
    """Ready samples: a 3×16×16 image, 16 token ids and a label, like a decoded digit pair."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.image = torch.rand(n, 3, 16, 16, generator=g)
        self.text = torch.randint(0, 4096, (n, 16), generator=g)
        self.label = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict:
        return {"__key__": f"s{i:07d}", "image": self.image[i], "text": self.text[i], "label": self.label[i]}


CONFIGS = {  # name -> pipeline options (the trivial scorer stands in for the learner)
    "passthrough (uniform, f=0)": {"rule": "uniform", "method": "sample", "filter_ratio": 0.0},
    "topk f=0.8": {"rule": "hard_learner", "method": "topk", "filter_ratio": 0.8},
    "topk f=0.8, no shuffle buffer": {"rule": "hard_learner", "method": "topk", "filter_ratio": 0.8,
                                      "shuffle_buffer": 0},
    "sample f=0.8": {"rule": "hard_learner", "method": "sample", "filter_ratio": 0.8},
    "joint (JEST, 16 chunks) f=0.8": {"rule": "hard_learner", "method": "joint", "filter_ratio": 0.8,
                                      "contrastive": True},
}


def epoch_seconds(iterable) -> tuple[float, int]:
    """Wall seconds to exhaust one epoch of `iterable`, and the items it yielded."""
    start, n = time.perf_counter(), 0
    for _ in iterable:
        n += 1
    return time.perf_counter() - start, n


def make_pipeline(loader, options: dict, batch_size: int):
    options = dict(options)
    contrastive = options.pop("contrastive", False)
    uses_learner = curate.get_rule(options["rule"]).uses_learner
    return curate.pipeline(loader, batch_size=batch_size, learner=RandomScores(contrastive) if uses_learner else None,
                           scorer=curate.ContrastiveScorer(image_key="image", text_key="text"), **options)


def measure(dataset, name: str, batch_size: int, repeats: int) -> list[dict]:
    samples = DataLoader(dataset, batch_size=None)
    batched = DataLoader(dataset, batch_size=batch_size)
    candidates = {"bare (samples)": samples, "bare (batched)": batched}
    candidates.update({c: make_pipeline(samples, o, batch_size) for c, o in CONFIGS.items()})
    times: dict[str, list[float]] = {c: [] for c in candidates}
    n_source = sum(1 for _ in samples)
    for it in candidates.values():  # warm-up epoch: decoders, tokenizer caches, the FLOP ledger
        epoch_seconds(it)
    for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits every candidate
        for name_c, it in candidates.items():
            times[name_c].append(epoch_seconds(it)[0])
    base = sorted(times["bare (samples)"])[repeats // 2]
    rows = []
    for name_c, ts in times.items():
        seconds = sorted(ts)[repeats // 2]
        rows.append({"source": name, "config": name_c, "epoch_seconds": seconds, "source_samples": n_source,
                     "samples_per_s": n_source / seconds, "us_per_sample": 1e6 * seconds / n_source,
                     "stage_us_per_sample": 1e6 * (seconds - base) / n_source,
                     "overhead_vs_bare": seconds / base - 1, "all_seconds": ts})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| source | configuration | samples/s | µs / sample | stages µs / sample | vs bare (samples) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['source']} | {r['config']} | {r['samples_per_s']:,.0f} | {r['us_per_sample']:.1f} | "
                     f"{r['stage_us_per_sample']:+.1f} | {100 * r['overhead_vs_bare']:+.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000, help="in-memory source size")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default="/tmp/curate-bench/data", help="digits data (made if missing)")
    parser.add_argument("--out", default="benchmarks/results/pipeline.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    from pipelines import data as digits

    if not (Path(args.data) / "manifest.json").is_file():
        digits.make_digits(args.data)
    pairs = digits.load_pairs(digits.shard_urls(args.data, "pairs", "train"))
    rows = measure(pairs, "pairs-webdataset", args.batch, args.repeats)
    rows += measure(InMemory(args.samples), "in-memory", args.batch, args.repeats)
    print(table(rows))
    report = {"benchmark": "pipeline", "batch_size": args.batch, "repeats": args.repeats, "rows": rows,
              "torch_threads": 1, "cpu_count": os.cpu_count(), "seconds": time.perf_counter() - start}
    out = write_json(report, args.out)
    print(f"wrote {out} in {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
