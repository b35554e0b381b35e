"""GPU figures in one command: scoring throughput, the JEST sampler at scale, and the pipeline's device path.

1. **Scoring**: samples/s of `curate.ContrastiveScorer` (softmax loss) on an open_clip ViT-B-32 built from its config
   (`open_clip.create_model("ViT-B-32", pretrained=None)`: random weights, nothing downloaded), one superbatch of
   B = 4096 (micro-batch 1024) of 3×224×224 images and 77 token ids already on the device, scored as the pipeline
   scores it (`curate.resolve_learner(...).provider.scores`): fp32 (TF32 off), fp32 with TF32 matmuls (CUDA),
   bf16 autocast (`ContrastiveScorer(autocast=torch.bfloat16)`), and a bf16 scoring copy
   (`curate.WeightSync(model, dtype=torch.bfloat16)`, inputs cast to bf16).
2. **JEST sampler**: seconds of `joint(SigmoidGain(learner, reference, learnability), b, n_chunks=16)` (what
   `JointSelect` runs) at B = 64k and 160k (b = B/5, random unit embeddings of width `--dim`, default 512 as
   ViT-B-32's), against the 4-matmul bound (every candidate against every selected pair, both models, both
   directions: 4 products (B×d)·(d×b), fp32), as in `benchmarks/sampler.py`, whose functions it runs.
3. **Device path**: source samples/s from a DataLoader (`--workers` workers, pinned memory) of 3×224×224 uint8
   images + 77 token ids, made on the fly, to batches on the device:
   * `bare loop, batch b`: a training loop without curate, `DataLoader(batch_size=b)`, each batch moved with
     `.to(device, non_blocking=True)`;
   * `bare loop, batch B`: the same moving whole superbatches (the bytes the pipeline moves);
   * `curate.pipeline(device=...)`: `DataLoader(batch_size=B)` → pipeline with a trivial scorer (losses from a
     pool on the device), topk, b = B/5, shuffle_buffer=0: its ToDevice stage moves each superbatch once,
     selection runs on the device and the kept batch is handed out there.
   Each epoch ends with a device synchronisation; median of `--repeats` interleaved epochs after a warm-up.

Timing: medians after a warm-up, synchronised on CUDA. Writes `benchmarks/results/gpu.json`.

    .venv/bin/python benchmarks/gpu.py                         # on a GPU machine; a few minutes on an H200
    .venv/bin/python benchmarks/gpu.py --device cpu --quick    # smoke run (small sizes), under 2 minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_json  # benchmarks/ is on sys.path when a script runs
from sampler import bound, embeddings, sampler, timed  # the JEST sampler benchmark's own functions

import curate  # noqa: E402
from curate import ModelScores  # noqa: E402
from curate.batch import batch_size_of  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# 1. scoring ---------------------------------------------------------------------------------------------------


def scoring(device: torch.device, B: int, micro: int, repeats: int) -> list[dict]:
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None).to(device)
    g = torch.Generator().manual_seed(0)
    batch = {"__key__": [f"s{i}" for i in range(B)],
             "image": torch.rand(B, 3, 224, 224, generator=g).to(device),
             "text": torch.randint(0, 49408, (B, 77), generator=g).to(device)}
    variants: list[tuple[str, object, curate.ContrastiveScorer, bool]] = [
        ("fp32 (TF32 off)", model, curate.ContrastiveScorer(loss="softmax"), False)]
    if device.type == "cuda":
        variants.append(("fp32, TF32 matmuls", model, curate.ContrastiveScorer(loss="softmax"), True))
    variants += [("bf16 autocast", model, curate.ContrastiveScorer(loss="softmax", autocast=torch.bfloat16), False),
                 ("bf16 WeightSync copy", curate.WeightSync(model, dtype=torch.bfloat16),
                  curate.ContrastiveScorer(loss="softmax"), False)]
    rows = []
    for name, learner, scorer, tf32 in variants:
        provider = curate.resolve_learner(learner).provider
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32

        def run(provider=provider, scorer=scorer):
            provider.scores(batch, scorer, micro)

        seconds = timed(run, device, repeats, 0.0)
        rows.append({"variant": name, "B": B, "micro_batch": micro, "seconds": seconds, "samples_per_s": B / seconds})
        print(f"  scoring {name}: {B / seconds:,.0f} samples/s", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return rows


# 2. JEST sampler ----------------------------------------------------------------------------------------------


def jest(device: torch.device, B: int, dim: int, repeats: int) -> dict:
    k = B // 5
    learner, reference = embeddings(B, dim, 0, device), embeddings(B, dim, 1, device)
    t_sampler = timed(lambda: sampler(learner, reference, k, 16, 0), device, repeats, 0.0)
    t_bound = timed(lambda: bound(learner, reference, k), device, repeats, 0.0)
    print(f"  JEST B={B}: sampler {t_sampler:.4f} s, bound {t_bound:.4f} s", flush=True)
    return {"B": B, "b": k, "dim": dim, "sampler_seconds": t_sampler, "bound_seconds": t_bound,
            "sampler_over_bound": t_sampler / t_bound, "bound_tflops_per_s": 4 * 2 * B * k * dim / t_bound / 1e12}


# 3. device path -----------------------------------------------------------------------------------------------


class Images(Dataset):
    """3×224×224 uint8 images (a decoded JPEG's size) and 77 token ids, made on the fly."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"__key__": f"s{i:07d}", "image": torch.full((3, 224, 224), i % 256, dtype=torch.uint8),
                "text": torch.full((77,), i % 49408)}


class DeviceScores:
    """The trivial scorer: per-example losses sliced from a pool made once on the device."""

    def __init__(self, device: torch.device, pool: int):
        self.losses, self.calls = torch.rand(pool, generator=torch.Generator().manual_seed(0)).to(device), 0

    def scores(self, batch: dict, scorer, micro_batch_size: int) -> ModelScores:
        n = batch_size_of(batch)
        start = self.calls * 1237 % (len(self.losses) - n + 1)
        self.calls += 1
        return ModelScores.of_losses(self.losses[start:start + n])


def bare_loop(data: DataLoader, device: torch.device):
    for batch in data:
        yield {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def device_path(device: torch.device, n: int, B: int, workers: int, repeats: int) -> list[dict]:
    dataset, pin = Images(n), device.type == "cuda"

    def loader(batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=pin,
                          persistent_workers=workers > 0)

    pipe = curate.pipeline(loader(B), batch_size=B // 5, superbatch_size=B, learner=DeviceScores(device, 2 * B),
                           scorer=curate.ContrastiveScorer(), rule="hard_learner", method="topk", shuffle_buffer=0,
                           device=device)
    small, big = loader(B // 5), loader(B)
    candidates = {f"bare loop, batch b = {B // 5}": lambda: bare_loop(small, device),
                  f"bare loop, batch B = {B}": lambda: bare_loop(big, device),
                  "curate.pipeline(device=...), topk": lambda: pipe}

    def epoch(make) -> float:
        start = time.perf_counter()
        for batch in make():
            assert batch["image"].device.type == device.type
        sync(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in candidates}
    for make in candidates.values():
        epoch(make)
    for _ in range(repeats):
        for name, make in candidates.items():
            times[name].append(epoch(make))
    sample_bytes = 3 * 224 * 224 + 77 * 8
    rows = []
    for name, ts in times.items():
        seconds = statistics.median(ts)
        rows.append({"config": name, "samples": n, "B": B, "workers": workers, "pin_memory": pin,
                     "epoch_seconds": seconds, "samples_per_s": n / seconds,
                     "source_gb_per_s": n * sample_bytes / seconds / 1e9, "all_seconds": ts})
        print(f"  device path {name}: {n / seconds:,.0f} samples/s", flush=True)
    for data in (small, big, pipe.stages["source"].iterable):  # stop the persistent workers now, not at the gc
        if getattr(data, "_iterator", None) is not None:
            data._iterator._shutdown_workers()
    return rows


# report -------------------------------------------------------------------------------------------------------


def tables(report: dict) -> str:
    out = [f"device: {report['device_name']}  (torch {report['torch']}, load average {report['loadavg_start']})", "",
           f"1. Scoring, open_clip ViT-B-32 (random init), B = {report['scoring'][0]['B']}, micro-batch "
           f"{report['scoring'][0]['micro_batch']}, inputs on the device", "",
           "| precision | samples/s | s / superbatch | vs fp32 |", "|---|---|---|---|"]
    fp32 = report["scoring"][0]["samples_per_s"]
    for r in report["scoring"]:
        out.append(f"| {r['variant']} | {r['samples_per_s']:,.0f} | {r['seconds']:.4f} | "
                   f"{r['samples_per_s'] / fp32:.2f}× |")
    out += ["", f"2. JEST sampler (16 chunks, b = B/5, d = {report['jest'][0]['dim']}) vs the 4-matmul bound, fp32", "",
            "| B | b | sampler s | 4-matmul bound s | sampler / bound | bound TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in report["jest"]:
        out.append(f"| {r['B']:,} | {r['b']:,} | {r['sampler_seconds']:.4f} | {r['bound_seconds']:.4f} | "
                   f"{r['sampler_over_bound']:.2f} | {r['bound_tflops_per_s']:.1f} |")
    dp = report["device_path"]
    out += ["", f"3. Device path: {dp[0]['samples']:,} samples of 3×224×224 uint8 + 77 tokens, {dp[0]['workers']} "
            f"workers, pin_memory={dp[0]['pin_memory']}, B = {dp[0]['B']}", "",
            "| configuration | source samples/s | source GB/s | vs bare loop, batch b |", "|---|---|---|---|"]
    for r in dp:
        out.append(f"| {r['config']} | {r['samples_per_s']:,.0f} | {r['source_gb_per_s']:.2f} | "
                   f"{100 * r['samples_per_s'] / dp[0]['samples_per_s']:.1f}% |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repeat (for --device cpu)")
    parser.add_argument("--dim", type=int, default=512, help="embedding width for the JEST sampler")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.quick:
        score_b, micro, jest_sizes, n, B, args.repeats, args.workers = 8, 4, [2048, 4096], 1280, 320, 1, 2
        args.dim = min(args.dim, 256)
    else:
        score_b, micro, jest_sizes, n, B = 4096, 1024, [65536, 163840], 32 * 4096, 4096
    load_start, start = os.getloadavg(), time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {name}; scoring", flush=True)
    report: dict = {"benchmark": "gpu", "device": str(device), "device_name": name, "quick": args.quick,
                    "torch": torch.__version__, "cpu_count": os.cpu_count(), "loadavg_start": load_start}
    report["scoring"] = scoring(device, score_b, micro, args.repeats)
    print("JEST sampler", flush=True)
    report["jest"] = []
    for size in jest_sizes:
        report["jest"].append(jest(device, size, args.dim, args.repeats))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("device path", flush=True)
    report["device_path"] = device_path(device, n, B, args.workers, args.repeats)
    report |= {"loadavg_end": os.getloadavg(), "seconds": time.perf_counter() - start}
    print()
    print(tables(report))
    out = write_json(report, args.out)
    print(f"\nwrote {out} in {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
