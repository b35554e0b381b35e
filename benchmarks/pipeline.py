"""Stage cost and checkpoints of `curate.pipeline` on batched sources, with a scorer that costs nothing.

**Throughput.** For superbatches B = 320 and 4096 (b = B/5 kept, filter ratio 0.8), source samples read per second by
`curate.pipeline` against the bare batched loader it wraps, `DataLoader(ds, batch_size=..., num_workers=2)`
(persistent workers). The scorer is `RandomScores`: per-example losses (or unit embeddings for the joint sampler)
sliced from a pool made once, so scoring costs nothing and what remains is the stages: Source, Shuffle, Superbatch,
Score's bookkeeping, selection, the FLOP ledger. Two sources:

* `in-memory`: a map-style dataset of ready tensors (a 3×64×64 uint8 image, 16 token ids, a label, a key), the
  cheapest loader there is, so the worst case for the stages' relative cost;
* `pairs-webdataset`: the digit-pair shards (`pipelines.data`, tar parsing and decoding) as `curate.Shards`, so the
  two workers read two shards each (a webdataset loader cannot shuffle by index: its B rows are unshuffled).

Loader set-ups: the recommended one, a loader whose batch is the superbatch (batch_size=B, the loader shuffles,
shuffle_buffer=0; a batch of exactly B passes through Superbatch uncopied), with topk / sample / joint and with
curate's shuffle block on top; and a loader batch of 256 joined into superbatches, with and without curate's
shuffle block (shuffle_buffer rounds up to one superbatch). Each is compared with the bare loader of the same
batch size. "stages alone" runs the same pipeline over a list of pre-collated in-memory batches (no loader at
all): its time is the stages' own cost, without the noise of the loader's worker processes. The joint (JEST)
sampler's compute is timed on its own (same B, d = 64 embeddings) and shown apart: it is selection compute, not
stage overhead. Median of `--repeats` interleaved epochs after a warm-up epoch; torch on one thread in the main
process.

**Checkpoints.** `torch.save(pipe.state_dict())` bytes, and seconds from a fresh pipeline's `load_state_dict` to
its first batch, at 10%, 50% and 90% of an epoch (and a fresh start, 0%), for samples of 3×224×224 fp32 images
made on the fly (600 KiB each; B = 320, loader batch B, 2 workers, shuffled by the loader): a plain DataLoader
(fast-forwarded: re-reads what was consumed), a torchdata `StatefulDataLoader` (resumes from its own state), and
`curate.Shards` over the digit-pair shards read directly (resumes at (shard, offset), skipping within one shard).

    .venv/bin/python benchmarks/pipeline.py [--quick] [--repeats 3] [--out benchmarks/results/pipeline.json]
"""

from __future__ import annotations

import argparse
import functools
import gc
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_json  # benchmarks/ is on sys.path when a script runs

import curate  # noqa: E402
from curate import ModelScores  # noqa: E402
from curate.batch import batch_size_of  # noqa: E402
from curate.selection import SigmoidGain, joint  # noqa: E402

SIZES = (320, 4096)  # superbatch sizes B; b = B / 5
WORKERS = 2
DIM = 64  # embedding width of the joint rows


class RandomScores:
    """The trivial scorer: per-example losses, or unit embeddings (sigmoid kind) for JEST, sliced from a pool made
    once (a view at a rotating offset), so scoring costs nothing next to the stages."""

    def __init__(self, contrastive: bool = False, pool: int = 2 * max(SIZES)):
        g = torch.Generator().manual_seed(0)
        self.contrastive, self.calls = contrastive, 0
        self.losses = torch.rand(pool, generator=g)
        self.emb = [F.normalize(torch.randn(pool, DIM, generator=g), dim=1) for _ in range(2)]

    def scores(self, batch: dict, scorer, micro_batch_size: int) -> ModelScores:
        n = batch_size_of(batch)
        start = self.calls * 1237 % (len(self.losses) - n + 1)
        self.calls += 1
        if not self.contrastive:
            return ModelScores.of_losses(self.losses[start:start + n])
        return ModelScores(kind="sigmoid", image_emb=self.emb[0][start:start + n],
                           text_emb=self.emb[1][start:start + n], scale=10.0, bias=-10.0)


class InMemory(Dataset):
    """Ready samples: a 3×64×64 uint8 image carried along, 16 token ids, a label and a key."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.image = torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)
        self.text = torch.randint(0, 4096, (n, 16), generator=g)
        self.label = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.label)

    def __getitem__(self, i: int) -> dict:
        return {"__key__": f"s{i:07d}", "image": self.image[i], "text": self.text[i], "label": self.label[i]}


class BigImages(Dataset):
    """3×224×224 fp32 images (600 KiB a sample) made on the fly, so the dataset itself holds no memory."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"__key__": f"s{i:07d}", "image": torch.full((3, 224, 224), (i % 256) / 255.0),
                "text": torch.full((16,), i % 4096), "label": i % 10}


def loader(dataset, batch_size: int, shuffle: bool, cls=DataLoader):
    """The batched loader: 2 workers collating, shuffled through a seeded generator when `shuffle`."""
    generator = torch.Generator().manual_seed(0) if shuffle else None
    return cls(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=WORKERS,
               persistent_workers=True)


def make_pipeline(source, B: int, method: str, shuffle_buffer: int):
    """b = B // 5 of every superbatch of B, set directly: filter_ratio=0.8 alone would give round(819 / 0.2) = 4095
    for B = 4096, and a loader batch of 4096 would then be re-cut (copied) into every superbatch."""
    return curate.pipeline(source, batch_size=B // 5, superbatch_size=B, learner=RandomScores(method == "joint"),
                           scorer=curate.ContrastiveScorer(image_key="image", text_key="text"),
                           rule="hard_learner", method=method, shuffle_buffer=shuffle_buffer)


def close(loaders: list) -> None:
    """Stop the loaders' worker processes now. (Left to the garbage collector, which is what frees a pipeline, every
    loader's shutdown waits out a 5 s join timeout per worker.)"""
    for data in loaders:
        if getattr(data, "_iterator", None) is not None:
            data._iterator._shutdown_workers()
            data._iterator = None


def configs(B: int) -> list[tuple[str, int, str | None, int]]:
    """(name, loader batch size, method or None for the bare loader, shuffle_buffer)."""
    return [
        (f"bare loader, batch {B}", B, None, 0),
        ("topk, loader batch B", B, "topk", 0),
        ("sample, loader batch B", B, "sample", 0),
        ("joint, loader batch B", B, "joint", 0),
        ("topk, loader batch B + shuffle block", B, "topk", B),
        ("bare loader, batch 256", 256, None, 0),
        ("topk, loader batch 256 + shuffle block", 256, "topk", B),
        ("topk, loader batch 256, no shuffle", 256, "topk", 0),
    ]


def epoch_seconds(iterable) -> float:
    start = time.perf_counter()
    for _ in iterable:
        pass
    return time.perf_counter() - start


def interleaved(candidates: dict, repeats: int) -> dict[str, list[float]]:
    """Epoch seconds of every candidate, `repeats` times in turn (a slow spell of a shared machine hits all)."""
    for it in candidates.values():  # warm-up: workers, caches, the FLOP ledger
        epoch_seconds(it)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, it in candidates.items():
            times[name].append(epoch_seconds(it))
    return times


def jest_seconds(B: int, repeats: int) -> float:
    """Median seconds of the joint sampler alone on one superbatch of B (what JointSelect runs for these rows)."""
    scores = RandomScores(contrastive=True).scores({"__key__": [0] * B}, None, 0)
    rule, k = curate.get_rule("hard_learner"), B // 5
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        joint(SigmoidGain(scores, None, rule), k, n_chunks=16, generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def throughput(source_name: str, dataset, n: int, B: int, repeats: int, shards: bool) -> list[dict]:
    """Rows of one source at one B: every configuration's epoch time against the bare loader of its batch size."""
    candidates, alone, loaders = {}, {}, []
    for name, batch, method, buffer in configs(B):
        shuffle = batch == B and not shards  # the loader shuffles in the recommended set-up; curate's block otherwise
        loaders.append(data := loader(dataset, batch, shuffle))
        candidates[name] = data if method is None else make_pipeline(data, B, method, buffer)
        if method is not None and not shards:  # the same stages over pre-collated batches: no loader cost at all
            batches = list(DataLoader(dataset, batch_size=batch, shuffle=shuffle,
                                      generator=torch.Generator().manual_seed(0)))
            alone[name] = make_pipeline(batches, B, method, buffer)
    times = interleaved(candidates, repeats)
    alone_times = interleaved(alone, repeats)
    measured_alone = set(alone)
    close(loaders)
    del candidates, alone, loaders
    gc.collect()
    sampler = jest_seconds(B, max(3, repeats))
    rows = []
    for name, batch, method, buffer in configs(B):
        seconds = statistics.median(times[name])
        bare = statistics.median(times[f"bare loader, batch {batch}"])
        row = {"source": source_name, "B": B, "b": B // 5, "config": name, "loader_batch": batch, "method": method,
               "shuffle_buffer": buffer, "samples": n, "epoch_seconds": seconds, "samples_per_s": n / seconds,
               "vs_bare": bare / seconds, "stage_us_per_sample": 1e6 * (seconds - bare) / n, "all_seconds": times[name]}
        if name in measured_alone:
            row["alone_us_per_sample"] = 1e6 * statistics.median(alone_times[name]) / n
        if method == "joint":
            row["jest_sampler_us_per_sample"] = 1e6 * sampler * (n / B) / n
        rows.append(row)
    return rows


def state_bytes(pipe) -> int:
    buffer = io.BytesIO()
    torch.save(pipe.state_dict(), buffer)
    return buffer.tell()


def checkpoints(make_source, kind: str, n: int, B: int, fractions: tuple[float, ...]) -> list[dict]:
    """State bytes and resume seconds (fresh pipeline → load_state_dict → first batch) at each fraction of the epoch."""
    rows, buffer = [], 0 if kind != "curate.Shards" else B  # Shards: read in order, so curate shuffles
    for fraction in fractions:
        pipe = make_pipeline(source := make_source(), B, "topk", buffer)
        state, consumed = None, max(1, round(fraction * n / B)) if fraction else 0
        if consumed:
            it = iter(pipe)
            for _ in range(consumed):
                next(it)
            state = pipe.state_dict()
            size = state_bytes(pipe)
            del it
        close([source])
        fresh = make_pipeline(source := make_source(), B, "topk", buffer)
        start = time.perf_counter()
        if state is not None:
            fresh.load_state_dict(state)
        next(iter(fresh))
        seconds = time.perf_counter() - start
        rows.append({"source": kind, "position": fraction, "superbatches_consumed": consumed,
                     "state_bytes": size if consumed else None, "resume_seconds": seconds})
        close([source])
        del pipe, fresh
        gc.collect()
        print(f"  {kind}: {fraction:.0%} -> {rows[-1]['state_bytes']} bytes, {seconds:.2f} s", flush=True)
    return rows


def throughput_table(rows: list[dict]) -> str:
    lines = ["| source | B | configuration | samples/s | vs bare loader | stage µs/sample vs bare | "
             "stages alone µs/sample | JEST sampler µs/sample |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bare = r["method"] is None
        alone = f"{r['alone_us_per_sample']:.2f}" if "alone_us_per_sample" in r else "—"
        jest = f"{r['jest_sampler_us_per_sample']:.2f}" if "jest_sampler_us_per_sample" in r else ""
        vs = "—" if bare else f"{100 * r['vs_bare']:.1f}%"
        cost = "—" if bare else f"{r['stage_us_per_sample']:+.2f}"
        lines.append(f"| {r['source']} | {r['B']} | {r['config']} | {r['samples_per_s']:,.0f} | {vs} | {cost} | "
                     f"{'' if bare else alone} | {jest} |")
    return "\n".join(lines)


def checkpoint_table(rows: list[dict], sample_bytes: int, B: int) -> str:
    lines = ["| source | position in epoch | state bytes | resume s (load_state_dict → first batch) |",
             "|---|---|---|---|"]
    for r in rows:
        size = "— (fresh start)" if r["state_bytes"] is None else f"{r['state_bytes']:,}"
        lines.append(f"| {r['source']} | {r['position']:.0%} | {size} | {r['resume_seconds']:.2f} |")
    lines.append(f"\n(one 3×224×224 fp32 sample: {sample_bytes:,} bytes; one superbatch of {B}: "
                 f"{sample_bytes * B / 2**20:,.0f} MiB)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small epochs, one repeat")
    parser.add_argument("--samples", type=int, default=40_960, help="in-memory source size")
    parser.add_argument("--big-samples", type=int, default=6400, help="3×224×224 source size (checkpoints)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="/tmp/curate-bench/data", help="digits data (made if missing)")
    parser.add_argument("--out", default="benchmarks/results/pipeline.json")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.big_samples, args.repeats = 8192, 1280, 1
    torch.set_num_threads(1)
    load_start, start = os.getloadavg(), time.perf_counter()
    from pipelines import data as digits

    if not (Path(args.data) / "manifest.json").is_file():
        digits.make_digits(args.data)
    urls = digits.shard_urls(args.data, "pairs", "train")
    pairs = curate.Shards(urls, digits.load_pairs)
    n_pairs = sum(1 for _ in pairs)

    rows = []
    memory = InMemory(args.samples)
    for B in SIZES:
        print(f"throughput, B = {B}", flush=True)
        rows += throughput("in-memory", memory, args.samples, B, args.repeats, shards=False)
        rows += throughput("pairs-webdataset", pairs, n_pairs, B, args.repeats, shards=True)
    del memory
    print(throughput_table(rows), flush=True)

    from torchdata.stateful_dataloader import StatefulDataLoader

    B, fractions, big = SIZES[0], (0.0, 0.1, 0.5, 0.9), BigImages(args.big_samples)
    sample_bytes = big[0]["image"].numel() * 4
    print(f"checkpoints, B = {B}, {args.big_samples} samples of 3×224×224 fp32", flush=True)
    ckpt = checkpoints(lambda: loader(big, B, True), "DataLoader (fast-forward)",
                       args.big_samples, B, fractions)
    ckpt += checkpoints(lambda: loader(big, B, True, cls=StatefulDataLoader),
                        "StatefulDataLoader", args.big_samples, B, fractions)
    ckpt += checkpoints(lambda: curate.Shards(urls, functools.partial(digits.load_pairs)),
                        "curate.Shards", n_pairs, B, fractions)
    print(checkpoint_table(ckpt, sample_bytes, B))

    report = {"benchmark": "pipeline", "sizes": list(SIZES), "filter_ratio": 0.8, "workers": WORKERS,
              "repeats": args.repeats, "quick": args.quick, "in_memory_samples": args.samples,
              "pairs_samples": n_pairs, "big_samples": args.big_samples, "big_sample_bytes": sample_bytes,
              "rows": rows, "checkpoints": ckpt, "torch_threads": 1, "cpu_count": os.cpu_count(),
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "torch": torch.__version__,
              "machine": platform.platform(), "seconds": time.perf_counter() - start}
    out = write_json(report, args.out)
    print(f"wrote {out} in {report['seconds']:.0f}s (load average {load_start} at the start, "
          f"{report['loadavg_end']} at the end)")


if __name__ == "__main__":
    main()
