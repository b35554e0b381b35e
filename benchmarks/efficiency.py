"""Training efficiency: steps and total compute to reach a target accuracy, curated vs uniform, same run.

Two tasks on the embedded digits data (`pipelines.data.make_digits`), each trained from the same initial
weights and the same data stream by every method; only the selection differs:

* pairs (the JEST family): a tiny SigLIP (`tiny_clip`) on image-caption pairs, 40% web noise; metric:
  zero-shot accuracy on the clean test split.
* digits (the RHO-LOSS family): a small CNN on digits with 30% of the training labels flipped; metric:
  test accuracy.

Methods (`METHODS`): uniform, hard_learner, easy_reference, learnability with independent selection
(topk, sample), JEST joint selection (16 chunks; pairs only: for per-example losses joint is sample),
ACL (a small actor trained online scores in the learner's place), and a filter-ratio sweep of the main
method. The reference is trained on the clean curated split, once per task, and its scores are
precomputed once into a Parquet `ScoreCache` reused by every method and seed.

Each run is the `curate run` job's own training loop (`pipelines.train.run_one`: model init, AdamW, loss,
pipeline call, evaluation) over the samples decoded once into memory, without checkpoints. Figures per run:
steps and total FLOPs (training + scoring + actor training, from the pipeline's FLOP ledger) to reach
uniform's best accuracy (same seed) and fixed targets, final accuracy. The offline reference cost
(training + precompute forward) is reported apart and is not in the totals: it is paid once per dataset.

    .venv/bin/python benchmarks/efficiency.py --quick            # smoke test, ~2 min
    .venv/bin/python benchmarks/efficiency.py --jobs 2           # the full grid (see README)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from results_io import write_json  # benchmarks/ is on sys.path when a script runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Per task: the recipe (model, training, reference, actor) and what the benchmark reports.
TASKS = {
    "pairs": {
        "recipe": {"data": {"dataset": "pairs"}, "model": {"kind": "tiny_clip", "loss": "sigmoid"},
                   # 1500 steps, not the recipes' 400: JEST's final accuracy went 0.88 → 0.91 (README, findings)
                   "reference": {"steps": 1500, "batch_size": 128, "lr": 2e-3},
                   "selection": {"filter_ratio": 0.8, "n_chunks": 16, "temperature": 1.0},
                   "train": {"steps": 600, "batch_size": 64, "lr": 1e-3, "eval_every": 25}},
        "actor": {"model": {"kind": "tiny_clip", "loss": "sigmoid", "options": {
            "width": 32, "layers": 1, "text_width": 32, "text_layers": 1, "embed_dim": 32}}, "lr": 2e-3},
        "targets": [0.5, 0.7], "main": "jest",
    },
    "digits": {
        "recipe": {"data": {"dataset": "digits"}, "model": {"kind": "small_cnn"},
                   # a wider CNN trained longer than the learner's twin: test accuracy 0.93 → 0.95 (README, findings)
                   "reference": {"steps": 1000, "batch_size": 128, "lr": 2e-3,
                                 "model": {"kind": "small_cnn", "options": {"width": 64}}},
                   "selection": {"filter_ratio": 0.9, "temperature": 1.0},
                   "train": {"steps": 800, "batch_size": 32, "lr": 1e-3, "eval_every": 25}},
        "actor": {"model": {"kind": "small_cnn", "options": {"width": 8}}, "lr": 2e-3},
        "targets": [0.9, 0.95], "main": "rho",
    },
}

UNIFORM = {"rule": "uniform", "method": "sample", "filter_ratio": 0.0}
METHODS = {  # name -> pipeline options over the recipe's selection (filter_ratio, n_chunks, temperature); "actor": ACL
    "pairs": {
        "uniform": UNIFORM,
        "hard_learner": {"rule": "hard_learner", "method": "joint"},
        "easy_reference": {"rule": "easy_reference", "method": "joint"},
        "learnability_topk": {"rule": "learnability", "method": "topk"},
        "learnability_sample": {"rule": "learnability", "method": "sample"},
        "jest": {"rule": "learnability", "method": "joint"},
        "acl": {"rule": "learnability", "method": "joint", "actor": True},
        "jest_f0.5": {"rule": "learnability", "method": "joint", "filter_ratio": 0.5},
        "jest_f0.9": {"rule": "learnability", "method": "joint", "filter_ratio": 0.9},
    },
    "digits": {
        "uniform": UNIFORM,
        "hard_learner": {"rule": "hard_learner", "method": "topk"},
        "easy_reference": {"rule": "easy_reference", "method": "topk"},
        "rho": {"rule": "learnability", "method": "topk"},
        "learnability_sample": {"rule": "learnability", "method": "sample"},
        "acl": {"rule": "learnability", "method": "topk", "actor": True},
        "rho_f0.5": {"rule": "learnability", "method": "topk", "filter_ratio": 0.5},
        "rho_f0.8": {"rule": "learnability", "method": "topk", "filter_ratio": 0.8},
    },
}
QUICK = {"seeds": 1, "steps": 100, "ref_steps": 100, "n_train": 4000,
         "methods": {"pairs": ["uniform", "jest", "acl"], "digits": ["uniform", "rho", "hard_learner"]}}


def recipe_for(task: str, seed: int, work: Path, data: Path, overrides: list[str], *, actor: bool = False):
    """The task's recipe for `seed` (with the task's ACL actor in `selection.actor` if `actor`). One reference and
    cache per task, shared by every method and seed, under `work` in a folder named by a hash of what makes them
    (data, reference config), so a change retrains."""
    from pipelines.recipe import parse_recipe

    recipe = TASKS[task]["recipe"]
    if actor:
        recipe = {**recipe, "selection": {**recipe["selection"], "actor": TASKS[task]["actor"]}}
    text = yaml.safe_dump({"name": f"efficiency-{task}", **recipe})
    own = [o.split(".", 1)[1] for o in overrides if o.startswith(f"{task}.")]  # "pairs.train.lr=3e-3"
    recipe = parse_recipe(text, f"efficiency:{task}", [f"data.root={data}", *own])
    made_of = json.dumps([str(data), recipe.reference.model_dump(), recipe.model.model_dump()], sort_keys=True)
    tag = f"{task}-{hashlib.sha256(made_of.encode()).hexdigest()[:10]}"
    ov = [f"train.seed={seed}", f"train.out={work}/runs/{task}-s{seed}", "train.device=cpu",
          f"reference.path={work}/reference/{tag}", f"cache.path={work}/cache/{tag}"]
    return parse_recipe(text, f"efficiency:{task}", [f"data.root={data}", *ov, *own])


def prepare(task: str, seed: int, work: Path, data: Path, overrides: list[str]) -> dict:
    """Train the task's reference and precompute its cache, unless there; its test accuracy and offline FLOPs."""
    torch.set_num_threads(1)
    import curate
    from pipelines import precompute, tasks, train_reference

    recipe = recipe_for(task, seed, work, data, overrides)
    quiet = lambda *a: None  # noqa: E731
    if not (recipe.reference_path / "model.safetensors").is_file():
        train_reference.train_reference(recipe, log=quiet)
    if not list(Path(recipe.cache.path).glob("part-*.parquet")):
        precompute.precompute(recipe, log=quiet)
    model, info = tasks.load_model(recipe.reference_path, recipe, recipe.reference_model)
    (batch,) = tasks.in_memory_batches(tasks.load_split(recipe, "test"), batch_size=256)[:1]
    per_sample = curate.forward_flops(model, batch, tasks.scorer_for(recipe, recipe.reference_model)) / 256
    n_pool = tasks.manifest(recipe)[recipe.data.dataset]["splits"]["train"]["count"]
    rc = recipe.reference
    return {"test": info["test"], "forward_flops_per_sample": per_sample,
            "training_flops": 3 * per_sample * rc.steps * rc.batch_size, "precompute_flops": per_sample * n_pool}


def run(task: str, name: str, seed: int, work: Path, data: Path, overrides: list[str], samples, test) -> dict:
    """One training run: `curate run`'s loop (`run_one`) over in-memory samples; a record at every evaluation."""
    torch.set_num_threads(1)
    from pipelines.train import run_one

    options = dict(METHODS[task][name])
    actor = options.pop("actor", False)
    recipe = recipe_for(task, seed, work, data, overrides, actor=actor)
    sel = recipe.selection
    options = {"filter_ratio": sel.filter_ratio, "n_chunks": sel.n_chunks, "temperature": sel.temperature, **options}
    records = run_one(recipe, name, options, progress=False, test=test, source=samples, checkpoint=False)
    history, noisy, trained = [], 0, 0
    for record in records:
        stats = record["pipeline"]
        # run_one reports the noisy share of each evaluation interval; this benchmark reports it over the run so
        # far. The pipeline's `kept` counts every sample handed to training (batches at an epoch's end can be
        # short), so the interval's noisy count is its share times its kept samples.
        interval, trained = stats["kept"] - trained, stats["kept"]
        noisy += round(record["noisy_kept"] * interval)
        metrics = {k: v for k, v in record.items() if k not in ("run", "step", "train_loss", "noisy_kept", "seconds",
                                                                 "pipeline")}  # the task's evaluation
        history.append({"step": record["step"], **metrics,
                        "flops": stats["training_flops"] + stats["scoring_flops"] + stats["actor_training_flops"],
                        "training_flops": stats["training_flops"], "noisy_kept": noisy / trained,
                        "seconds": record["seconds"]})
    stats = records[-1]["pipeline"]  # the last evaluation is at the last step
    return {"task": task, "method": name, "seed": seed, "options": {**options, "actor": actor},
            "history": history, "score_seconds": stats["score_seconds"],
            "flops_per_sample": stats["flops_per_sample"], "flops_overhead": stats["flops_overhead"]}


# ------------------------------------------------------------------------------------------ aggregation


def reached(history: list[dict], target: float) -> dict | None:
    """The first evaluation at or above `target`, or None."""
    return next((r for r in history if r["accuracy"] >= target), None)


def per_run(result: dict, uniform: dict, targets: list[float]) -> dict:
    """Figures of one run, against the uniform run of the same seed."""
    h, uh = result["history"], uniform["history"]
    u_best = max(r["accuracy"] for r in uh)
    u_at = reached(uh, u_best)
    out = {"final_accuracy": h[-1]["accuracy"], "best_accuracy": max(r["accuracy"] for r in h),
           "total_flops": h[-1]["flops"], "flops_overhead": result["flops_overhead"],
           "noisy_kept": statistics.fmean(r["noisy_kept"] for r in h), "seconds": h[-1]["seconds"],
           "uniform_best": u_best}
    for label, target in [("uniform_best", u_best)] + [(f"{t:g}", t) for t in targets]:
        hit, u_hit = reached(h, target), reached(uh, target)
        out[f"steps_to_{label}"] = hit and hit["step"]
        out[f"flops_to_{label}"] = hit and hit["flops"]
        out[f"step_speedup_{label}"] = hit and u_hit and u_hit["step"] / hit["step"]
        out[f"flops_ratio_{label}"] = hit and u_hit and hit["flops"] / u_hit["flops"]
    assert u_at is not None
    return out


def mean_std(values: list) -> dict:
    got = [v for v in values if v is not None]
    return {"mean": statistics.fmean(got) if got else None,
            "std": statistics.stdev(got) if len(got) > 1 else 0.0 if got else None,
            "n": len(got), "of": len(values)}


def summarise(results: list[dict], targets: dict[str, list[float]]) -> dict:
    summary: dict = {}
    for task in dict.fromkeys(r["task"] for r in results):
        runs = [r for r in results if r["task"] == task]
        uniform = {r["seed"]: r for r in runs if r["method"] == "uniform"}
        rows = {}
        for name in dict.fromkeys(r["method"] for r in runs):
            figures = [per_run(r, uniform[r["seed"]], targets[task]) for r in runs if r["method"] == name]
            rows[name] = {key: mean_std([f[key] for f in figures]) if not isinstance(figures[0][key], str) else None
                          for key in figures[0]}
        summary[task] = rows
    return summary


def fmt(cell: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    if cell is None or cell["mean"] is None:
        return "—"
    text = f"{cell['mean'] / scale:.{digits}f}±{cell['std'] / scale:.{digits}f}"
    return text + (f" ({cell['n']}/{cell['of']})" if cell["n"] < cell["of"] else "")


def table(summary: dict, targets: dict[str, list[float]]) -> str:
    lines = []
    for task, rows in summary.items():
        cols = [("final acc", "final_accuracy", 3, 1), ("steps→U best", "steps_to_uniform_best", 0, 1),
                ("speedup", "step_speedup_uniform_best", 2, 1), ("TFLOPs→U best", "flops_to_uniform_best", 2, 1e12),
                ("FLOP ratio", "flops_ratio_uniform_best", 2, 1)]
        for t in targets[task]:
            cols += [(f"steps→{t:g}", f"steps_to_{t:g}", 0, 1), (f"FLOP ratio→{t:g}", f"flops_ratio_{t:g}", 2, 1)]
        cols += [("total TFLOPs", "total_flops", 2, 1e12), ("noisy kept", "noisy_kept", 2, 1)]
        lines.append(f"\n{task} (mean ± std over seeds; (k/n): only k of n seeds reached the target)")
        lines.append("| method | " + " | ".join(c[0] for c in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for name, row in rows.items():
            lines.append(f"| {name} | " + " | ".join(fmt(row[key], d, s) for _, key, d, s in cols) + " |")
    return "\n".join(lines)


def plot(results: list[dict], summary: dict, path_stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in summary:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in summary[task]:
            runs = [r for r in results if r["task"] == task and r["method"] == name]
            steps = [x["step"] for x in runs[0]["history"]]
            acc = torch.tensor([[x["accuracy"] for x in r["history"]] for r in runs])
            flops = torch.tensor([[x["flops"] for x in r["history"]] for r in runs]).mean(0) / 1e12
            mean, std = acc.mean(0), acc.std(0) if len(runs) > 1 else torch.zeros(len(steps))
            main = name in ("uniform", TASKS[task]["main"])
            for ax, x in zip(axes, (steps, flops.tolist()), strict=True):
                line, = ax.plot(x, mean, label=name, lw=2.4 if main else 1.2)
                if main:  # ± std bands for the two that matter most; all of them would hide the lines
                    ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line.get_color())
        axes[0].set(xlabel="training step", ylabel="test accuracy", title=f"{task}: accuracy vs steps")
        axes[1].set(xlabel="total TFLOPs (training + scoring), log scale", ylabel="test accuracy", xscale="log",
                    title=f"{task}: accuracy vs compute")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        path = path_stem.with_name(f"{path_stem.name}_{task}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


# ------------------------------------------------------------------------------------------------- main

_SHARED: dict = {}  # per task: samples and test batches, loaded before the worker processes fork


def _prepare_job(args):
    return args[:2], prepare(*args)


def _cost(task: str, name: str) -> float:
    """Rough relative cost of a run (for scheduling): superbatch size, pairs ~3× digits per step."""
    options = METHODS[task][name]
    ratio = options.get("filter_ratio", TASKS[task]["recipe"]["selection"]["filter_ratio"])
    return (3 if task == "pairs" else 1) * (1 if options["rule"] == "uniform" else 1 / (1 - ratio))


def _run_job(args):
    task = args[0]
    return run(*args, *_SHARED[task])


def load_task(task: str, work: Path, data: Path, overrides: list[str]):
    from pipelines import tasks

    recipe = recipe_for(task, 0, work, data, overrides)
    drop = ("caption", "noise")
    samples = [{k: v for k, v in s.items() if k not in drop} for s in tasks.load_split(recipe, "train")]
    return samples, tasks.in_memory_batches(tasks.load_split(recipe, "test"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke version: 1 seed, 100 steps, 3 methods a task")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default="pairs,digits")
    parser.add_argument("--methods", default=None, help="comma list (default: all of each task's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (one torch thread each)")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.KEY=VALUE",
                        help="recipe override for one task, e.g. pairs.train.lr=3e-3 or digits.train.steps=800")
    parser.add_argument("--data", default="/tmp/curate-bench/data", help="made with make_digits if missing")
    parser.add_argument("--work", default="/tmp/curate-bench/work", help="references and score caches")
    parser.add_argument("--out", default="benchmarks/results/efficiency.json")
    parser.add_argument("--replot", action="store_true", help="redraw the PNGs and table of an existing --out JSON")
    args = parser.parse_args()
    if args.replot:
        report = json.loads(Path(args.out).read_text())
        print(table(report["summary"], {t: TASKS[t]["targets"] for t in report["summary"]}))
        print("wrote", ", ".join(plot(report["runs"], report["summary"], Path(args.out).with_suffix(""))))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    overrides, seeds = list(args.set), args.seeds
    data, work = Path(args.data), Path(args.work)
    task_names = args.tasks.split(",")
    if args.quick:
        data, work, seeds = data.with_name(data.name + "-quick"), work.with_name(work.name + "-quick"), QUICK["seeds"]
        for task in task_names:
            overrides = [f"{task}.train.steps={QUICK['steps']}", f"{task}.reference.steps={QUICK['ref_steps']}",
                         *overrides]
    if not (data / "manifest.json").is_file():
        from pipelines.data import make_digits

        make_digits(data, n_train=QUICK["n_train"] if args.quick else 20_000)
    methods = {t: ([m for m in args.methods.split(",") if m in METHODS[t]] if args.methods else
                   QUICK["methods"][t] if args.quick else list(METHODS[t])) for t in task_names}
    for task in task_names:
        methods[task] = ["uniform"] + [m for m in methods[task] if m != "uniform"]  # the baseline always runs
    jobs = [(t, 0, work, data, overrides) for t in task_names]
    ctx = mp.get_context("fork")
    with ctx.Pool(args.jobs) as pool:
        references = {t: info for (t, _), info in pool.imap(_prepare_job, jobs)}
    print(f"references ready ({time.perf_counter() - start:.0f}s)", flush=True)
    for task in task_names:
        _SHARED[task] = load_task(task, work, data, overrides)
    runs = [(t, m, s, work, data, overrides) for t in task_names for s in range(seeds) for m in methods[t]]
    runs.sort(key=lambda job: -_cost(job[0], job[1]))  # longest first: the pool ends together
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.jsonl")  # runs so far, should the grid be interrupted
    partial.unlink(missing_ok=True)
    with ctx.Pool(args.jobs) as pool:  # forked after loading: workers share the decoded samples
        for result in pool.imap_unordered(_run_job, runs):
            results.append(result)
            with partial.open("a") as stream:
                stream.write(json.dumps(result) + "\n")
            last = result["history"][-1]
            print(f"{result['task']:>6} {result['method']:<20} seed {result['seed']}: final {last['accuracy']:.3f} "
                  f"in {last['seconds']:.0f}s ({time.perf_counter() - start:.0f}s elapsed)", flush=True)
    results.sort(key=lambda r: (task_names.index(r["task"]), methods[r["task"]].index(r["method"]), r["seed"]))
    targets = {t: TASKS[t]["targets"] for t in task_names}
    summary = summarise(results, targets)
    print(table(summary, targets))
    pngs = plot(results, summary, out.with_suffix(""))
    report = {"benchmark": "efficiency", "argv": sys.argv[1:], "quick": args.quick, "seeds": seeds,
              "overrides": overrides, "tasks": {t: {**TASKS[t], "methods": {m: METHODS[t][m] for m in methods[t]}}
                                                for t in task_names},
              "references": references, "summary": summary, "runs": results, "plots": pngs,
              "seconds": time.perf_counter() - start, "torch_threads": 1, "cpu_count": os.cpu_count(),
              "offline_cost_in_totals": False}
    write_json(report, out)
    partial.unlink()
    print(f"wrote {out} and {', '.join(pngs)} in {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
