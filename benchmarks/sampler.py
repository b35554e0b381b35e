"""JEST joint sampler: time and peak memory of `SigmoidGain` (chunked, from embeddings) vs the dense reference.

For each superbatch size B (d = 256, 80% filtered: b = B/5 kept, 16 chunks), on random L2-normalised
learner and reference embeddings (sigmoid loss, t = 10, b = −10, rule = learnability):

* sampler: `joint(SigmoidGain(learner, reference, learnability), b, n_chunks=16)`, what `JointSelect` runs;
* dense: `joint(DenseGain(A), ...)` with A = learner − reference pair losses built as B×B matrices (the
  test reference); run only while it fits (`--dense-max`, and on a GPU until it runs out of memory);
* matmul bound, timed in the same process: the products the exact conditional gain cannot avoid, i.e. every
  candidate against every selected pair, for both models, image→text and text→image: 4 products of
  (B×d)·(d×b). `bound1` is one such product. `tiled_bound` is the same 4 products done as the sampler does
  them, per chunk of b/n_chunks columns in row tiles into a reused buffer (on CPU, where it tiles): the
  sampler's time minus it is what its elementwise work and bookkeeping cost.

Each configuration runs in its own subprocesses (so one's memory cannot hide another's). Time: median
wall seconds over repeats after a warm-up (torch on `--threads` threads on CPU, default 1; synchronised on
CUDA). Peak
memory above what the inputs already hold, in a second subprocess, after a warm-up: on CUDA
`torch.cuda.max_memory_allocated`; on CPU the process's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs before the run) minus its resident size before it, with glibc told to mmap every
allocation ≥ 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed tensors leave the resident set instead of being
reused unseen. It counts everything the run touched, not only tensors.
At small B the sampler and the dense reference are checked to pick the same indices from the same seed.

    .venv/bin/python benchmarks/sampler.py [--device cpu|cuda] [--sizes 4096,...,65536] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_io import write_json  # benchmarks/ is on sys.path when a script runs

from curate import selection  # noqa: E402
from curate.losses import sigmoid_pair_losses  # noqa: E402
from curate.rules import get_rule  # noqa: E402
from curate.scorers import ModelScores  # noqa: E402
from curate.selection import DenseGain, SigmoidGain, chunk_sizes, joint  # noqa: E402

SIZES = [4096, 8192, 16384, 32768, 65536]


def embeddings(n: int, d: int, seed: int, device: torch.device) -> ModelScores:
    """Random unit-norm image/text embeddings, generated in place (no temporaries that would inflate the RSS)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        x = torch.empty(n, d).normal_(generator=g)
        x /= x.norm(dim=1, keepdim=True)
        out.append(x.to(device))
    return ModelScores(kind="sigmoid", image_emb=out[0], text_emb=out[1], scale=10.0, bias=-10.0)


def sampler(learner: ModelScores, reference: ModelScores, k: int, chunks: int, seed: int) -> torch.Tensor:
    gain = SigmoidGain(learner, reference, get_rule("learnability"))
    return joint(gain, k, n_chunks=chunks, generator=torch.Generator().manual_seed(seed))


def dense(learner: ModelScores, reference: ModelScores, k: int, chunks: int, seed: int) -> torch.Tensor:
    pairs = [sigmoid_pair_losses(m.image_emb, m.text_emb, m.scale, m.bias) for m in (learner, reference)]
    gain = DenseGain(get_rule("learnability")(*pairs))
    del pairs
    return joint(gain, k, n_chunks=chunks, generator=torch.Generator().manual_seed(seed))


def bound(learner: ModelScores, reference: ModelScores, k: int, products: int = 4) -> None:
    """`products` (B×d)·(d×b) matmuls against b selected rows (gathered beforehand)."""
    sel = torch.arange(k, device=learner.image_emb.device)
    pairs = [(learner.image_emb, learner.text_emb[sel]), (learner.text_emb, learner.image_emb[sel]),
             (reference.image_emb, reference.text_emb[sel]), (reference.text_emb, reference.image_emb[sel])]
    for x, y in pairs[:products]:
        x @ y.T


def tiled_bound(learner: ModelScores, reference: ModelScores, k: int, chunks: int) -> None:
    """The same 4 products, chunk by chunk, in `SigmoidGain`'s row tiles written into one reused buffer."""
    device = learner.image_emb.device
    n = learner.image_emb.shape[0]
    start = 0
    for c in chunk_sizes(k, chunks):
        sel = torch.arange(start, start + c, device=device)
        start += c
        rows = min(n, max(1, selection._TILE // c)) if device.type == "cpu" else n
        block = torch.empty(rows, c, device=device)
        for m in (learner, reference):
            for x, y in ((m.image_emb, m.text_emb[sel]), (m.text_emb, m.image_emb[sel])):
                for r in range(0, n, rows):
                    torch.mm(x[r:r + rows], y.T, out=block[: min(rows, n - r)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, min_repeats: int, min_seconds: float) -> float:
    """Median wall seconds of `fn()` over at least `min_repeats` calls and `min_seconds`, after a warm-up call.
    A call that takes over 5 s is timed once, its warm-up being the measurement (one-off costs are noise there)."""
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    if first > 5:
        return first
    times: list[float] = []
    while len(times) < min_repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_bytes(fn, device: torch.device) -> tuple[int, str]:
    """Peak memory `fn()` adds above what is allocated before it, and how it was measured."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024, "VmHWM - VmRSS (process resident memory)"


def child(args) -> dict:
    """One (impl, B) configuration, in this process: time, peak memory and the matmul bound."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, d, chunks = args.child_size, args.dim, args.chunks
    k = round(n * (1 - args.filter))
    learner, reference = embeddings(n, d, 1, device), embeddings(n, d, 2, device)
    impl = {"sampler": sampler, "dense": dense}[args.child]
    fn = lambda: impl(learner, reference, k, chunks, 0)  # noqa: E731
    row = {"impl": args.child, "B": n, "b": k, "d": d, "n_chunks": chunks, "device": str(device)}
    try:
        if args.memory:  # a warm-up first, so code pages loaded and caches built on first use are not counted
            if n <= 16384 or device.type == "cuda":  # beyond on a CPU, one-off megabytes are noise, runs long
                fn()
            row["peak_bytes"], row["memory_measure"] = peak_bytes(fn, device)
            return row
        row["seconds"] = timed(fn, device, args.repeats, args.min_seconds)
    except torch.cuda.OutOfMemoryError as error:
        return {**row, "error": f"out of memory: {str(error).splitlines()[0]}"}
    if args.child == "sampler":
        row["bound_seconds"] = timed(lambda: bound(learner, reference, k), device, args.repeats, args.min_seconds)
        row["bound1_seconds"] = timed(lambda: bound(learner, reference, k, 1), device, args.repeats,
                                      args.min_seconds)
        row["tiled_bound_seconds"] = timed(lambda: tiled_bound(learner, reference, k, chunks), device, args.repeats,
                                           args.min_seconds)
        row["flops_bound"] = 4 * 2 * n * d * k
    elif n <= 4096:  # exactness: same seed, same picks
        row["same_selection_as_sampler"] = bool(torch.equal(fn().cpu(), sampler(learner, reference, k, chunks, 0)
                                                            .cpu()))
    return row


def run_child(args, impl: str, n: int) -> dict:
    """Time in one subprocess, peak memory in another: glibc then serves every allocation of 64 KiB or more
    with its own mmap, returned on free, so the resident size follows the live tensors (the default would
    keep freed heap memory resident and reuse it unseen)."""
    cmd = [sys.executable, __file__, "--child", impl, "--child-size", str(n), "--device", args.device,
           "--dim", str(args.dim), "--chunks", str(args.chunks), "--filter", str(args.filter),
           "--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds), "--threads", str(args.threads)]
    row = {}
    for extra, env in (([], os.environ), (["--memory"], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})):
        done = subprocess.run(cmd + extra, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            return {"impl": impl, "B": n, "error": f"subprocess failed: {tail[0]}"}
        got = json.loads(done.stdout.strip().splitlines()[-1])
        if "error" in got:
            return got
        row.update(got)
    return row


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def table(rows: list[dict]) -> str:
    lines = ["| B | b | sampler s | 4-matmul bound s | sampler / bound | tiled matmuls s | sampler / tiled | "
             "sampler / 1 matmul | sampler peak | B·b/16 floats | dense s | dense peak | dense / sampler |",
             "|---" * 13 + "|"]
    for n in sorted({r["B"] for r in rows}):
        s = next(r for r in rows if r["B"] == n and r["impl"] == "sampler")
        dn = next((r for r in rows if r["B"] == n and r["impl"] == "dense"), None)
        if "error" in s:
            lines.append(f"| {n} | — | {s['error']} |" + " |" * 10)
            continue
        if dn is None:
            dense_cells = ["not run (--dense-max)", "—", "—"]
        elif "error" in dn:
            dense_cells = [dn["error"][:40], "—", "—"]
        else:
            dense_cells = [f"{dn['seconds']:.4f}", fmt_bytes(dn["peak_bytes"]), f"{dn['seconds'] / s['seconds']:.1f}×"]
        lines.append(f"| {n} | {s['b']} | {s['seconds']:.4f} | {s['bound_seconds']:.4f} | "
                     f"{s['seconds'] / s['bound_seconds']:.2f} | {s['tiled_bound_seconds']:.4f} | "
                     f"{s['seconds'] / s['tiled_bound_seconds']:.2f} | {s['seconds'] / s['bound1_seconds']:.2f} | "
                     f"{fmt_bytes(s['peak_bytes'])} | {fmt_bytes(4 * n * s['b'] / s['n_chunks'])} | "
                     + " | ".join(dense_cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, key, label in (("sampler", "seconds", "chunked sampler"), ("dense", "seconds", "dense reference"),
                             ("sampler", "bound_seconds", "matmul bound (4 products)"),
                             ("sampler", "tiled_bound_seconds", "the 4 products in the sampler's tiles")):
        got = [r for r in rows if r["impl"] == impl and key in r]
        ax_t.plot([r["B"] for r in got], [r[key] for r in got], marker="o", label=label)
    for impl in ("sampler", "dense"):
        got = [r for r in rows if r["impl"] == impl and "peak_bytes" in r]
        ax_m.plot([r["B"] for r in got], [max(r["peak_bytes"], 1) / 2**20 for r in got], marker="o", label=impl)
    got = [r for r in rows if r["impl"] == "sampler" and "b" in r]
    ax_m.plot([r["B"] for r in got], [4 * r["B"] * r["b"] / r["n_chunks"] / 2**20 for r in got], ls="--",
              label="one B×c float block")
    ax_t.set(xscale="log", yscale="log", xlabel="superbatch B", ylabel="seconds per selection", title=title)
    ax_m.set(xscale="log", yscale="log", xlabel="superbatch B", ylabel="peak MiB above inputs", title="peak memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--filter", type=float, default=0.8)
    parser.add_argument("--dense-max", type=int, default=None,
                        help="largest B for the dense reference (default: 16384 on CPU, all on CUDA until OOM)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (on CPU)")
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--out", default=None, help="default benchmarks/results/sampler_<device>[_<n>threads].json "
                        "(+ .png)")
    parser.add_argument("--child", choices=["sampler", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    start = time.perf_counter()
    dense_max = args.dense_max or (1 << 40 if args.device == "cuda" else 16384)
    rows, dense_failed = [], False
    for n in [int(s) for s in args.sizes.split(",")]:
        rows.append(run_child(args, "sampler", n))
        if n <= dense_max and not dense_failed:
            rows.append(run_child(args, "dense", n))
            dense_failed = "error" in rows[-1]  # larger B will not fit either
        print(table(rows).splitlines()[-1], flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"\n{args.device} ({device_name}), d={args.dim}, filter {args.filter}, {args.chunks} chunks\n" + table(rows))
    threads = f"_{args.threads}threads" if args.device == "cpu" and args.threads != 1 else ""
    out = Path(args.out or f"benchmarks/results/sampler_{args.device}{threads}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out.with_suffix(".png"), f"joint sampler on {args.device} ({device_name})")
    report = {"benchmark": "sampler", "device": args.device, "device_name": device_name,
              "torch": torch.__version__, "cpu_count": os.cpu_count(), "dim": args.dim, "filter_ratio": args.filter,
              "n_chunks": args.chunks, "dense_max": args.dense_max, "rows": rows,
              "seconds": time.perf_counter() - start, "torch_threads": args.threads if args.device == "cpu" else None,
              "load_average_after": os.getloadavg()}
    write_json(report, out)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
