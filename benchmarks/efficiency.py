"""Training efficiency: steps and total compute to reach a target accuracy, curated vs uniform, same run.

Three tasks, each trained from the same initial weights and the same data stream by every method; only the
selection differs:

* pairs (the JEST family): a tiny SigLIP (`tiny_clip`) on the digits world's image-caption pairs
  (`pipelines.data.make_digits`), 40% web noise; metric: zero-shot accuracy on the clean test split.
* digits (the RHO-LOSS family): a small CNN on digits with 30% of the training labels flipped; metric:
  test accuracy.
* web (the JEST family at its own regime): the web world (`pipelines.web.make_web`), a never-repeating
  long-tailed stream of 600 compositional concepts (coloured two-digit numbers) with misaligned and junk
  captions and near-duplicates; metric: zero-shot accuracy over the 600 concepts on a balanced test split.
  Uniform trains 4× the curated runs' steps, so savings are measured both ways: the curated run's steps to the
  long uniform run's best, and uniform's steps to the curated run's final accuracy. Its grid holds the controls
  that isolate each claim (joint with 1/4/16 chunks at temperature 1 and 0; independent selection from the
  diagonal, i.e. joint with 1 chunk, and in superbatch context; the filter ratio) and ACL as published (a small
  actor and a small reference of its architecture, both scored online, per-example softmax sampling at filter
  0.5, three actor sizes).
* web_distinct (not in the default --tasks): the web task on the web world whose rare concepts are made of their
  own parts (`make_web(tail="distinct")`: numbers 50-99, which the head never shows), else the same world.

Methods (`METHODS`): uniform, hard_learner, easy_reference, learnability with independent selection
(topk, sample), JEST joint selection (16 chunks; pairs and web only: for per-example losses joint is sample),
a proxy actor trained online scoring in the learner's place against the cached reference (`acl` of pairs and
digits), and a filter-ratio sweep of the main method. The task's reference is trained on the clean curated
split once per task, and its scores are precomputed once into a Parquet `ScoreCache` reused by every method and
seed (ACL's small references are scored online instead).

Each run is the `curate run` job's own training loop (`pipelines.train.run_one`: model init, AdamW, loss,
pipeline call, evaluation) over the samples decoded once into memory, without checkpoints. Figures per run:
steps and total FLOPs (training + scoring + actor training, from the pipeline's FLOP ledger) to reach
uniform's best accuracy (same seed) and fixed targets (web: fractions of the reference's accuracy), final
accuracy, and the per-batch diagnostics (noisy, duplicate and tail share, concept coverage, the sampling
entropy of the first and later chunks). The offline reference cost (training + precompute forward) is
reported apart, and added to the runs that read the reference amortised over 1 and 10 runs.

    .venv/bin/python benchmarks/efficiency.py --quick --jobs 2   # smoke test of all three tasks, ~2 min
    .venv/bin/python benchmarks/efficiency.py --jobs 2           # the full grid (see README)
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch
import yaml
from results_io import write_json  # benchmarks/ is on sys.path when a script runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The image-text tasks' (pairs, web) recipe without its dataset, and their ACL actor: a tiny SigLIP.
CLIP_RECIPE = {"model": {"kind": "tiny_clip", "loss": "sigmoid"},
               # 1500 steps, not the recipes' 400: pairs' JEST final accuracy went 0.88 → 0.91 (README, findings)
               "reference": {"steps": 1500, "batch_size": 128, "lr": 2e-3},
               "selection": {"filter_ratio": 0.8, "n_chunks": 16, "temperature": 1.0},
               "train": {"steps": 600, "batch_size": 64, "lr": 1e-3, "eval_every": 25}}
CLIP_ACTOR = {"model": {"kind": "tiny_clip", "loss": "sigmoid", "options": {
    "width": 32, "layers": 1, "text_width": 32, "text_layers": 1, "embed_dim": 32}}, "lr": 2e-3}

# Per task: the recipe (model, training, reference, actor) and what the benchmark reports.
TASKS = {
    "pairs": {
        "recipe": {"data": {"dataset": "pairs"}, **CLIP_RECIPE}, "actor": CLIP_ACTOR,
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
    # the web world (`pipelines.web`): a never-repeating long-tailed stream of 600 concepts; uniform trains 4× the
    # curated runs' steps, so "uniform's best" is a long run's. 3000 curated steps: every run, curated or not, sits
    # on a plateau (colour and tens) until it learns the units digit, and which step it leaves it at varies by
    # seed; at 1500 steps the curated runs were mid-rise (JEST 0.19 / 0.04 / 0.09) and 2 of 3 seeds never reached
    # uniform's best, so the steps to it went unmeasured. A constant lr after a 500-step warmup: a cosine decay over
    # 1500 steps stalled the rise (JEST 0.05 / 0.03 / 0.03) and over 6000 left uniform no better (0.092, seed 0),
    # and at a constant lr a long run's step s is an s-step run, so one uniform run gives its steps to any accuracy
    "web": {
        "world": "web",
        # the reference: CLIP's schedule (500 warmup steps, cosine to 0) over 6000 steps, where its accuracy on a
        # held-out tenth of the curated split reaches 0.84 (2 seeds). At a constant 2e-3 (or 1e-3) some runs learn
        # colour and tens but never the units digit and stay at 0.09 (3 of 6 runs; 0 of 3 with the schedule:
        # `reference_curve.py`, benchmarks/README §1b)
        "recipe": {"data": {"dataset": "web"}, **CLIP_RECIPE,
                   "reference": {**CLIP_RECIPE["reference"], "steps": 6000, "schedule": "cosine", "warmup": 500},
                   "train": {**CLIP_RECIPE["train"], "steps": 3000, "warmup": 500, "eval_every": 100}},
        "actor": CLIP_ACTOR,
        # ACL's width-32 reference at its own best schedule: held-out 0.22 / 0.22 at a constant 2e-3, 0.17 / 0.18
        # with the cosine (2 seeds each, 6000 steps, `reference_curve.py --acl 32`)
        "acl_reference": {"schedule": "constant", "warmup": 0},
        # no fixed accuracies: the targets are fractions of the reference's own zero-shot accuracy (a model trained
        # on the curated set alone), set before any method ran
        "targets": [], "reference_targets": [0.5, 0.75, 1.0], "uniform_steps_factor": 4, "main": "jest",
    },
}

# the web world whose tail is made of its own parts (`make_web(tail="distinct")`: numbers the head never shows), else
# the same world and the same task: what learnability gains over the offline filter when "already learnt" is not
# the whole tail too. One knob changed, fixed from that property (web.TAILS) before any method ran on it
TASKS["web_distinct"] = {**TASKS["web"], "world": "web_distinct"}
WEB_TAILS = {"web": "shared", "web_distinct": "distinct"}  # world -> make_web's tail

UNIFORM = {"rule": "uniform", "method": "sample", "filter_ratio": 0.0}
# the image-text tasks' shared arms
CONTRASTIVE = {
    "uniform": UNIFORM,
    "hard_learner": {"rule": "hard_learner", "method": "joint"},
    "easy_reference": {"rule": "easy_reference", "method": "joint"},
    "learnability_topk": {"rule": "learnability", "method": "topk"},
    "learnability_sample": {"rule": "learnability", "method": "sample"},
    "jest": {"rule": "learnability", "method": "joint"},
}
FILTER_SWEEP = {"jest_f0.5": {"rule": "learnability", "method": "joint", "filter_ratio": 0.5},
                "jest_f0.9": {"rule": "learnability", "method": "joint", "filter_ratio": 0.9}}
METHODS = {  # name -> pipeline options over the recipe's selection (filter_ratio, n_chunks, temperature); "actor":
    # the task's proxy actor; "acl": ACL's actor and reference options; "flexi": selection.flexi
    "pairs": {**CONTRASTIVE, "acl": {"rule": "learnability", "method": "joint", "actor": True}, **FILTER_SWEEP},
    # the web grid isolates each claim: joint selection with 1 chunk is independent sampling from the diagonal
    # (each pair scored alone), `learnability_*` score each pair against the whole superbatch (independent, in
    # context); chunks 1/4/16 at temperature 1 and at 0 (greedy); the offline filter and the learner-only rule
    "web": {
        **CONTRASTIVE,
        # uniform at the curated budget and twice it, each its own run: with a decaying lr (the web learner's
        # cosine) a long run's accuracy at step s is not an s-step run's (`uniform_reached`)
        "uniform_x1": {**UNIFORM, "steps_factor": 1}, "uniform_x2": {**UNIFORM, "steps_factor": 2},
        # and at 10x it: where a curated run passes the 4x run's best, uniform's steps to its accuracy measured up to
        # the moonshot's 10x (3000 steps x 10 x 64 pairs, or 1500 x 10 x 128, is 1.92M: the 2M-pair pool never
        # repeats). At a constant lr (the web learner's) it continues the 4x run exactly, so `default_methods` leaves
        # it out with the shorter budgets: name it in --methods
        "uniform_x10": {**UNIFORM, "steps_factor": 10},
        # curated runs at twice the budget (6000 steps at batch 64 reads 1.92M pairs at filter 0.8): whether the step
        # saving against uniform_x10 keeps growing with the budget (JEST's did up to 3000 steps: 1.7x at 1000, 3.6x at
        # 2000, 4.8x at 3000, 4-head learner, §1i), and whether the learner's score pulls ahead of the offline filter
        # once more of the stream is learnt (the papers' mechanism). Left out of the default grid like uniform_x10
        **{f"{name}_x2": {**CONTRASTIVE[name], "steps_factor": 2} for name in ("easy_reference", "jest")},
        "jest_c1": {"rule": "learnability", "method": "joint", "n_chunks": 1},
        "jest_c4": {"rule": "learnability", "method": "joint", "n_chunks": 4},
        "jest_c1_T0": {"rule": "learnability", "method": "joint", "n_chunks": 1, "temperature": 0.0},
        "jest_c4_T0": {"rule": "learnability", "method": "joint", "n_chunks": 4, "temperature": 0.0},
        "jest_T0": {"rule": "learnability", "method": "joint", "temperature": 0.0},
        **FILTER_SWEEP,
        # a quarter of each batch drawn uniformly from the superbatch, the rest by the method (`uniform_share`):
        # whether the stream's own mix frees runs that selection holds on the units plateau (section 1c: it does not)
        **{f"{name}_u25": {**CONTRASTIVE[name], "uniform_share": 0.25}
           for name in ("easy_reference", "jest", "learnability_sample")},
        # selection after a uniform warmup (`selection_warmup`) of a third of the curated budget, fixed before any
        # run: 500 steps of the distinct-tail grid's 1500 at batch 128, 1000 of the web grid's 3000 at 64. Whether a
        # learner that first learns the stream's shared features (the units digit) escapes the plateau that
        # selection from step 0 holds most distinct-tail seeds on, and what it costs where selection works (§1e)
        **{f"{name}_w{w}": {**CONTRASTIVE[name], "selection_warmup": w}
           for name in ("easy_reference", "jest", "learnability_sample") for w in (500, 1000)},
        # the offline alignment filter first (`curate.alignment_filter`, as `curate curate-set --aligned-share`: the
        # 70% of the stream whose cached reference image and text embeddings agree best, a run trains on them through
        # `curation.train_on_curated`), then the method. 0.7 is 1 - the world's declared noise share (20% misaligned
        # + 10% junk), so it drops as many pairs as `web_plateau.py --drop-noisy`'s oracle, chosen by the reference
        **{f"{name}_a70": {**CONTRASTIVE[name], "aligned_share": 0.7}
           for name in ("easy_reference", "jest", "learnability_sample")},
        # Flexi-JEST as published: the learner scores at half resolution and trains half of each batch at it
        "flexi_jest": {"rule": "learnability", "method": "joint", "flexi": {"downsample": 2, "train_share": 0.5}},
        # ACL as published (Evans et al. 2023): per-example learnability of a small actor trained online against a
        # small reference of its architecture, both scored online, sampled by softmax at filter 0.5; actor sizes
        **{f"acl_w{w}": {"rule": "learnability", "method": "sample", "filter_ratio": 0.5,
                         "acl": {"width": w, "layers": 1, "text_width": w, "text_layers": 1, "embed_dim": w}}
           for w in (16, 32, 64)},
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
METHODS["web_distinct"] = METHODS["web"]
QUICK = {"seeds": 1, "steps": 100, "ref_steps": 100,
         "world": {"digits": {"n_train": 4000}, **{w: {"n_train": 40_000, "n_curated": 6_000} for w in WEB_TAILS}},
         "methods": {"pairs": ["uniform", "jest", "acl"], "digits": ["uniform", "rho", "hard_learner"],
                     **{w: ["uniform", "jest", "easy_reference"] for w in WEB_TAILS}}}
# the worlds the grid makes (else make_*'s defaults): the web stream holds the longest arm's reads, 3000 steps of
# superbatch 640 (filter 0.9), so no run scores a pair twice
WORLDS = {"digits": {"n_train": 20_000}, **{w: {"n_train": 2_000_000} for w in WEB_TAILS}}


def recipe_for(task: str, seed: int, work: Path, data: Path, overrides: list[str], *, actor: bool = False,
               acl: dict | None = None, flexi: dict | None = None, steps_factor: int = 1,
               aligned_share: float | None = None):
    """The task's recipe for `seed`, `steps_factor` times its training steps. `actor`: the task's proxy in
    `selection.actor` (scoring in the learner's place, against the cached reference). `acl`: ACL as published,
    the actor's architecture with these options both as the online actor and as the reference, which is scored
    online (no cache: its forward is in the ledger). `flexi`: `selection.flexi` (Flexi-JEST). `aligned_share`: the
    run trains only on `aligned_keys`' list (`curation.train_on_curated`, in a run folder of its own). One
    reference (and cache) per reference configuration, shared by every method, seed and learner, under `work` in
    a folder named by a hash of what makes it, so a change to it retrains."""
    from pipelines.recipe import parse_recipe

    recipe = TASKS[task]["recipe"]
    if actor:
        recipe = {**recipe, "selection": {**recipe["selection"], "actor": TASKS[task]["actor"]}}
    if flexi is not None:
        recipe = {**recipe, "selection": {**recipe["selection"], "flexi": flexi}}
    if acl is not None:
        small = {**TASKS[task]["actor"]["model"], "options": acl}
        reference = {**recipe["reference"], "model": small, **TASKS[task].get("acl_reference", {})}
        recipe = {**recipe, "reference": reference,
                  "selection": {**recipe["selection"], "actor": {**TASKS[task]["actor"], "model": small}}}
    text = yaml.safe_dump({"name": f"efficiency-{task}", **recipe})
    own = [o.split(".", 1)[1] for o in overrides if o.startswith(f"{task}.")]  # "pairs.train.lr=3e-3"
    recipe = parse_recipe(text, f"efficiency:{task}", [f"data.root={data}", *own])
    # what the reference and its cache are made of: the world and the reference's own configuration, its model
    # resolved (the learner's when `reference.model` is unset) and the weight decay it trains with (`train`'s),
    # so that changing only the learner reuses them
    reference = {**recipe.reference.model_dump(), "model": recipe.reference_model.model_dump(),
                 "weight_decay": recipe.train.weight_decay}
    made_of = json.dumps([str(data), reference], sort_keys=True)
    tag = f"{task}-{hashlib.sha256(made_of.encode()).hexdigest()[:10]}"
    run = f"{task}-s{seed}" + (f"-a{aligned_share}" if aligned_share else "")
    ov = [f"train.seed={seed}", f"train.out={work}/runs/{run}", "train.device=cpu",
          *(["curation.train_on_curated=true"] if aligned_share else []),
          f"reference.path={work}/reference/{tag}", f"cache.path={'null' if acl else f'{work}/cache/{tag}'}"]
    steps = [f"train.steps={recipe.train.steps * steps_factor}"] if steps_factor != 1 else []
    return parse_recipe(text, f"efficiency:{task}", [f"data.root={data}", *ov, *own, *steps])


def aligned_keys(task: str, share: float, work: Path, data: Path, overrides: list[str]) -> Path:
    """The key list of the `share` of the task's stream that its cached reference finds best aligned
    (`curate.alignment_filter` over the cache, written with `curate.write_keys`), made once beside the cache."""
    from curate.cache import ScoreCache
    from curate.curation import alignment_filter, write_keys

    recipe = recipe_for(task, 0, work, data, overrides)
    path = Path(f"{recipe.cache.path}-aligned{share}.parquet")
    if not path.is_file():
        cache = ScoreCache.open(recipe.cache.path)
        result = alignment_filter(cache.keys.to_list(), cache.image_emb, cache.text_emb, share=share)
        write_keys(path, result.kept_keys, metadata={"aligned_share": share, "cutoff": result.cutoff})
    return path


def prepare(task: str, seed: int, work: Path, data: Path, overrides: list[str], acl: dict | None = None) -> dict:
    """Train the reference (the task's, or an ACL configuration's) and precompute its cache (when it has one),
    unless there; its test accuracy and offline FLOPs."""
    torch.set_num_threads(1)
    import curate
    from pipelines import precompute, tasks, train_reference

    recipe = recipe_for(task, seed, work, data, overrides, acl=acl)
    quiet = lambda *a: None  # noqa: E731
    if not (recipe.reference_path / "model.safetensors").is_file():
        train_reference.train_reference(recipe, log=quiet)
    cached = recipe.cache.path is not None
    if cached and not list(Path(recipe.cache.path).glob("part-*.parquet")):
        precompute.precompute(recipe, log=quiet)
    model, info = tasks.load_model(recipe.reference_path, recipe, recipe.reference_model)
    (batch,) = tasks.in_memory_batches(tasks.load_split(recipe, "test"), batch_size=256)[:1]
    per_sample = curate.forward_flops(model, batch, tasks.scorer_for(recipe, recipe.reference_model)) / 256
    n_pool = tasks.manifest(recipe)[recipe.data.dataset]["splits"]["train"]["count"]
    rc = recipe.reference
    return {"test": info["test"], "forward_flops_per_sample": per_sample,
            "training_flops": 3 * per_sample * rc.steps * rc.batch_size,
            "precompute_flops": per_sample * n_pool if cached else 0.0}


def steps_factor(task: str, name: str) -> int:
    """How many times the task's curated budget a method trains: its own `steps_factor`, else the task's
    `uniform_steps_factor` for plain uniform (the long baseline) and 1 for every other method."""
    default = TASKS[task].get("uniform_steps_factor", 1) if name == "uniform" else 1
    return METHODS[task][name].get("steps_factor", default)


def run(task: str, name: str, seed: int, work: Path, data: Path, overrides: list[str], samples, test) -> dict:
    """One training run: `curate run`'s loop (`run_one`) over in-memory samples; a record at every evaluation."""
    torch.set_num_threads(1)
    import curate
    from pipelines.train import run_one

    options = dict(METHODS[task][name])
    actor, acl, flexi = options.pop("actor", False), options.pop("acl", None), options.pop("flexi", None)
    aligned = options.pop("aligned_share", None)
    options.pop("steps_factor", None)
    factor = steps_factor(task, name)
    recipe = recipe_for(task, seed, work, data, overrides, actor=actor, acl=acl, flexi=flexi, steps_factor=factor,
                        aligned_share=aligned)
    if aligned:  # where `curate run` reads the key list `curate curate-set` writes
        recipe.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(aligned_keys(task, aligned, work, data, overrides), recipe.curated_keys_path)
    sel = recipe.selection
    options = {"filter_ratio": sel.filter_ratio, "n_chunks": sel.n_chunks, "temperature": sel.temperature, **options}
    records = run_one(recipe, name, options, progress=False, test=test, source=samples, checkpoint=False)
    history = []
    for record in records:
        stats = record["pipeline"]
        # the task's evaluation and run_one's diagnostics of the interval's trained batches (noisy_kept, ...)
        metrics = {k: v for k, v in record.items() if k not in ("run", "step", "train_loss", "seconds", "pipeline")}
        history.append({"step": record["step"], **metrics,
                        "flops": stats["training_flops"] + stats["scoring_flops"] + stats["actor_training_flops"],
                        "training_flops": stats["training_flops"], "seconds": record["seconds"],
                        # the last superbatch's per-chunk sampling entropy, a snapshot at each evaluation
                        "chunk_entropy": stats.get("chunk_entropy", {}).get("last_superbatch")})
    stats = records[-1]["pipeline"]  # the last evaluation is at the last step
    return {"task": task, "method": name, "seed": seed,
            "options": {**options, "actor": actor, "acl": acl, "flexi": flexi, "aligned_share": aligned},
            "reference": reference_key(task, name),
            "budget": recipe.train.steps // factor, "schedule": recipe.train.schedule, "history": history,
            "superbatch": curate.superbatch_size_for(recipe.train.batch_size, options["filter_ratio"]),
            "score_seconds": stats["score_seconds"],
            "flops_per_sample": stats["flops_per_sample"], "flops_overhead": stats["flops_overhead"],
            "chunk_entropy": stats.get("chunk_entropy")}  # over the whole run: first chunk, later chunks


# ------------------------------------------------------------------------------------------ aggregation


def reached(history: list[dict], target: float) -> dict | None:
    """The first evaluation at or above `target`, or None."""
    return next((r for r in history if r["accuracy"] >= target), None)


def uniform_reached(uniforms: list[dict], target: float) -> dict | None:
    """Uniform's steps and FLOPs to `target` (its runs of one seed), or None.

    At a constant lr a longer run continues a shorter one, so the longest run's first evaluation at the target is
    it. A run whose lr decays (cosine) has its best only at its end: its accuracy at step s is not what an s-step
    run reaches, so each budget is its own run and the steps are the smallest budget whose final accuracy reaches
    the target, interpolated linearly between the two budgets around it. Below the smallest budget's final, that
    run's own first evaluation at the target (an upper bound: its lr had not decayed there yet).
    """
    runs = sorted(uniforms, key=lambda r: r["history"][-1]["step"])
    if runs[-1].get("schedule", "constant") == "constant":
        return reached(runs[-1]["history"], target)
    finals = [(r["history"][-1]["step"], r["history"][-1]["accuracy"]) for r in runs]
    if target <= finals[0][1]:
        return reached(runs[0]["history"], target)
    per_step = runs[-1]["history"][-1]["flops"] / finals[-1][0]  # uniform's FLOPs per step do not vary
    for (s0, a0), (s1, a1) in zip(finals, finals[1:], strict=False):
        if a1 >= target:
            step = s0 + (s1 - s0) * (target - a0) / (a1 - a0) if a1 > a0 else s1
            return {"step": step, "flops": step * per_step}
    return None


DIAGNOSTICS = ("noisy_kept", "duplicate_kept", "tail_kept", "label_coverage")  # means over a run's intervals
AMORTISED_OVER = (1, 10)  # runs that share one reference's training and precompute


def per_run(result: dict, uniforms: list[dict], targets: list[float], reference: dict) -> dict:
    """Figures of one run, against the uniform runs of the same seed (`uniform_reached`; "uniform's best" is the
    longest run's). The reference's offline cost is charged, amortised over n runs, to the runs that read it: its
    training, and the precompute of the samples the run has read when it reaches a target (a cache's rows are the
    reference's forwards over what the runs read; the grid's pool is sized for its longest arm, and charging all of
    it to a shorter run would bill forwards it never used)."""
    import curate

    h = result["history"]
    u_best = max(r["accuracy"] for r in max(uniforms, key=lambda r: r["history"][-1]["step"])["history"])
    final = h[-1]["accuracy"]
    at_budget = next(r for r in h if r["step"] >= result["budget"])  # the curated runs' steps (uniform's may be more)
    u_to_final = uniform_reached(uniforms, final)  # the other way round: uniform's steps to this run's final
    out = {"final_accuracy": final, "best_accuracy": max(r["accuracy"] for r in h),
           "accuracy_at_budget": at_budget["accuracy"], "total_flops": h[-1]["flops"],
           "flops_overhead": result["flops_overhead"], "seconds": h[-1]["seconds"], "uniform_best": u_best,
           "uniform_steps_to_final": u_to_final and u_to_final["step"],
           "step_speedup_to_final": u_to_final and u_to_final["step"] / h[-1]["step"]}
    for key in ("tail_accuracy", "number_accuracy", "tens_accuracy", "units_accuracy"):
        if key in h[-1]:
            out[f"final_{key}"] = h[-1][key]
    for key in DIAGNOSTICS:
        values = [r[key] for r in h if r.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
    entropy = result.get("chunk_entropy") or {}
    out["entropy_first_chunk"], out["entropy_later_chunks"] = entropy.get("first"), entropy.get("later")
    reads = curate.get_rule(result["options"]["rule"]).uses_reference
    cached = reference["precompute_flops"] > 0  # an online reference's forwards are in the run's ledger already
    superbatch = result.get("superbatch") or curate.superbatch_size_for(  # runs before the field: the task's batch
        TASKS[result["task"]]["recipe"]["train"]["batch_size"], result["options"]["filter_ratio"])

    def offline(step: int) -> float:
        precompute = reference["forward_flops_per_sample"] * step * superbatch if cached else 0.0
        return reads * (reference["training_flops"] + precompute)

    def flops_ratios(key: str, hit: dict | None, u_hit: dict | None) -> None:
        """`key`: this run's FLOPs at `hit` over uniform's at `u_hit`; `key_amortised_n`: with the offline reference
        cost spread over n runs (uniform pays none). None where either point is missing."""
        for n in (None, *AMORTISED_OVER):
            spent = hit and u_hit and hit["flops"] + (offline(hit["step"]) / n if n else 0.0)
            out[key + (f"_amortised_{n}" if n else "")] = hit and u_hit and spent / u_hit["flops"]

    # the other way in compute: this run's whole ledger against uniform's FLOPs to this run's final accuracy
    flops_ratios("flops_ratio_to_final", h[-1], u_to_final)
    for label, target in [("uniform_best", u_best)] + [(f"{t:g}", t) for t in targets]:
        hit, u_hit = reached(h, target), uniform_reached(uniforms, target)
        out[f"steps_to_{label}"] = hit and hit["step"]
        out[f"flops_to_{label}"] = hit and hit["flops"]
        out[f"step_speedup_{label}"] = hit and u_hit and u_hit["step"] / hit["step"]
        flops_ratios(f"flops_ratio_{label}", hit, u_hit)
    return out


def mean_std(values: list) -> dict:
    """Mean, std and the 95% confidence half-width of the mean (Student's t) of the values that are not None."""
    from scipy.stats import t as student

    got = [v for v in values if v is not None]
    std = statistics.stdev(got) if len(got) > 1 else 0.0 if got else None
    ci = float(student.ppf(0.975, len(got) - 1)) * std / len(got) ** 0.5 if len(got) > 1 and std is not None else None
    return {"mean": statistics.fmean(got) if got else None, "std": std, "ci95": ci, "n": len(got), "of": len(values)}


def summarise(results: list[dict], targets: dict[str, list[float]], references: dict[str, dict]) -> dict:
    summary: dict = {}
    for task in dict.fromkeys(r["task"] for r in results):
        runs = [r for r in results if r["task"] == task]
        uniform = {seed: [r for r in runs if r["seed"] == seed and r["options"]["rule"] == "uniform"]
                   for seed in {r["seed"] for r in runs}}
        rows = {}
        for name in dict.fromkeys(r["method"] for r in runs):
            figures = [per_run(r, uniform[r["seed"]], targets[task], references[r.get("reference", task)])
                       for r in runs if r["method"] == name]
            rows[name] = {key: mean_std([f[key] for f in figures]) for key in figures[0]}
        summary[task] = rows
    return summary


def fmt(cell: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """mean ± the 95% CI half-width (± 0 for one seed); (k/n) when only k of n seeds have a value."""
    if cell is None or cell["mean"] is None:
        return "—"
    text = f"{cell['mean'] / scale:.{digits}f}±{(cell.get('ci95') or 0.0) / scale:.{digits}f}"
    return text + (f" ({cell['n']}/{cell['of']})" if cell["n"] < cell["of"] else "")


def table(summary: dict, targets: dict[str, list[float]]) -> str:
    lines = []
    for task, rows in summary.items():
        cols = [("final acc", "final_accuracy", 3, 1), ("acc at budget", "accuracy_at_budget", 3, 1),
                ("steps→U best", "steps_to_uniform_best", 0, 1), ("speedup", "step_speedup_uniform_best", 2, 1),
                ("U steps→final", "uniform_steps_to_final", 0, 1),
                ("speedup (other way)", "step_speedup_to_final", 2, 1),
                ("FLOP ratio (other way)", "flops_ratio_to_final", 2, 1),
                *[(f"amortised ×{n} (other way)", f"flops_ratio_to_final_amortised_{n}", 2, 1) for n in AMORTISED_OVER],
                ("FLOP ratio→U best", "flops_ratio_uniform_best", 2, 1)]
        cols += [(f"amortised ×{n}", f"flops_ratio_uniform_best_amortised_{n}", 2, 1) for n in AMORTISED_OVER]
        for t in targets[task]:
            cols += [(f"steps→{t:g}", f"steps_to_{t:g}", 0, 1), (f"FLOP ratio→{t:g}", f"flops_ratio_{t:g}", 2, 1)]
        cols += [("total TFLOPs", "total_flops", 2, 1e12)]
        diagnostics = [("noisy kept", "noisy_kept", 2), ("dup kept", "duplicate_kept", 3),
                       ("tail kept", "tail_kept", 3),
                       ("coverage", "label_coverage", 3), ("H chunk 1", "entropy_first_chunk", 3),
                       ("H later", "entropy_later_chunks", 3), ("tail acc", "final_tail_accuracy", 3),
                       ("number acc", "final_number_accuracy", 3), ("tens acc", "final_tens_accuracy", 3),
                       ("units acc", "final_units_accuracy", 3)]
        diagnostics = [(n, k, d, 1) for n, k, d in diagnostics
                       if any((row.get(k) or {}).get("mean") is not None for row in rows.values())]
        for title, columns in (("", cols), (" diagnostics", diagnostics)):
            lines.append(f"\n{task}{title} (mean ± 95% CI over seeds; (k/n): only k of n seeds have a value)")
            lines.append("| method | " + " | ".join(c[0] for c in columns) + " |")
            lines.append("|---" * (len(columns) + 1) + "|")
            for name, row in rows.items():
                lines.append(f"| {name} | " + " | ".join(fmt(row.get(key), d, sc) for _, key, d, sc in columns) + " |")
    return "\n".join(lines)


def plot(results: list[dict], summary: dict, path_stem: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in summary:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for i, name in enumerate(summary[task]):
            runs = [r for r in results if r["task"] == task and r["method"] == name]
            steps = [x["step"] for x in runs[0]["history"]]
            acc = torch.tensor([[x["accuracy"] for x in r["history"]] for r in runs])
            flops = torch.tensor([[x["flops"] for x in r["history"]] for r in runs]).mean(0) / 1e12
            mean, std = acc.mean(0), acc.std(0) if len(runs) > 1 else torch.zeros(len(steps))
            main = name in ("uniform", TASKS[task]["main"])
            for ax, x in zip(axes, (steps, flops.tolist()), strict=True):
                # the colour cycle has 10 colours: past them, dashed lines
                line, = ax.plot(x, mean, label=name, lw=2.4 if main else 1.2, ls="-" if i < 10 else "--")
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


def reference_key(task: str, name: str) -> str:
    """Which reference a run reads: the task's, or its own ACL configuration's."""
    return f"{task}:{name}" if name and "acl" in METHODS[task][name] else task


def _prepare_job(args):
    task, name, *rest = args
    return reference_key(task, name), prepare(task, *rest, acl=METHODS[task][name].get("acl") if name else None)


def default_methods(task: str, work: Path, data: Path, overrides: list[str]) -> list[str]:
    """All of a task's methods, but uniform's shorter budgets only where the lr decays (`uniform_reached`)."""
    decays = recipe_for(task, 0, work, data, overrides).train.schedule != "constant"
    return [m for m in METHODS[task] if decays or "steps_factor" not in METHODS[task][m]]


def _cost(task: str, name: str) -> float:
    """Rough relative cost of a run (for scheduling): superbatch size and steps, pairs ~3× digits per step (uniform's
    filter ratio is 0: its superbatch is its batch)."""
    ratio = METHODS[task][name].get("filter_ratio", TASKS[task]["recipe"]["selection"]["filter_ratio"])
    return (1 if task == "digits" else 3) / (1 - ratio) * steps_factor(task, name)


def _run_job(args):
    task = args[0]
    return run(*args, *_SHARED[task])


def world_maker(world: str):
    """The function that writes a world: `curate data` for digits, `curate data web [--tail T]` for the web worlds."""
    from pipelines.data import make_digits
    from pipelines.web import make_web

    return functools.partial(make_web, tail=WEB_TAILS[world]) if world in WEB_TAILS else make_digits


def check_world(root: Path, world: str, sizes: dict) -> None:
    """Refuse a world on disk whose splits are not the sizes the grid makes (an older default, another run's)."""
    import inspect

    make = world_maker(world)
    defaults = {k: p.default for k, p in inspect.signature(make).parameters.items() if k.startswith("n_")}
    manifest = json.loads((root / "manifest.json").read_text())
    datasets = [manifest["web"]] if world in WEB_TAILS else [manifest[d] for d in ("pairs", "digits")]
    if world in WEB_TAILS and (tail := manifest["web"].get("tail", "shared")) != WEB_TAILS[world]:
        raise SystemExit(f"efficiency: the web world at {root} has a {tail} tail, the {world} grid reads a "
                         f"{WEB_TAILS[world]} one; pass another --data")
    for name, want in {**defaults, **sizes}.items():
        got = {d["splits"][name[2:]]["count"] for d in datasets}
        if got != {want}:
            raise SystemExit(f"efficiency: the {world} world at {root} has {name[2:]} {sorted(got)}, the grid makes "
                             f"{want}; move it aside (it is remade) or pass another --data")


# rows per in-memory train batch: the pipeline re-chunks rows, so any size gives the same stream
TRAIN_CHUNK = 4096


def load_task(task: str, work: Path, data: Path, overrides: list[str]):
    """The task's train split and test batches, decoded once, before the workers fork.

    The train split is kept collated, in batches of `TRAIN_CHUNK` rows, not as one dict per sample: the pipeline
    reads the same rows either way (its Source passes batches, its stages re-chunk rows), but a forked worker that
    touches a million per-sample objects copies every page they share with their tensors (2M web samples: ~10 GB a
    worker, and the grid was killed for memory), while a few big tensors stay shared."""
    from pipelines import tasks

    recipe = recipe_for(task, 0, work, data, overrides)
    train = tasks.in_memory_batches(tasks.load_split(recipe, "train"), batch_size=TRAIN_CHUNK)
    return train, tasks.in_memory_batches(tasks.load_split(recipe, "test"))


def task_config(task: str) -> dict:
    """A task's configuration as a report holds it (JSON types), to tell whether two grids ran the same task."""
    return json.loads(json.dumps(TASKS[task]))


def read_partial(path: Path) -> dict:
    """An interrupted grid's runs: its partial file's header (overrides, quick) and the runs it finished."""
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])
    if "overrides" not in header:
        raise SystemExit(f"--extend: {path} has no header line (overrides, quick); move it aside")
    runs = []
    for i, line in enumerate(lines[1:], 2):
        try:
            runs.append(json.loads(line))
        except ValueError:
            if i < len(lines):  # only the last line can be cut short, by a kill mid-write
                raise SystemExit(f"--extend: line {i} of {path} is not a run; move the file aside") from None
    return {**header, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke version: 1 seed, 100 steps, 3 methods a task")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", default="pairs,digits,web")
    parser.add_argument("--methods", default=None, help="comma list (default: all of each task's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (one torch thread each)")
    parser.add_argument("--set", action="append", default=[], metavar="TASK.KEY=VALUE",
                        help="recipe override for one task, e.g. pairs.train.lr=3e-3 or digits.train.steps=800")
    parser.add_argument("--data", default="/tmp/curate-bench/data",
                        help="the worlds' roots: DATA (digits, for pairs and digits), DATA-web and DATA-web_distinct; "
                        "made if missing")
    parser.add_argument("--work", default="/tmp/curate-bench/work", help="references and score caches")
    parser.add_argument("--out", help="the results JSON (default benchmarks/results/efficiency.json; with --quick, "
                        "/tmp/curate-bench/efficiency-quick.json, so a smoke run never replaces the committed results)")
    parser.add_argument("--replot", action="store_true",
                        help="recompute the summary of an existing --out JSON from its runs; redraw its table and PNGs")
    parser.add_argument("--extend", action="store_true",
                        help="add runs to an existing --out JSON (same overrides): the runs it holds are not rerun")
    args = parser.parse_args()
    if args.out is None:
        args.out = "/tmp/curate-bench/efficiency-quick.json" if args.quick else "benchmarks/results/efficiency.json"
    if args.replot:  # the summary recomputed from the runs (this script's figures may have changed since)
        report = json.loads(Path(args.out).read_text())
        targets = report.get("targets") or {t: TASKS[t]["targets"] for t in report["summary"]}
        report["summary"] = summarise(report["runs"], targets, report["references"])
        print(table(report["summary"], targets))
        report["plots"] = plot(report["runs"], report["summary"], Path(args.out).with_suffix(""))
        print("wrote", ", ".join(report["plots"]))
        write_json(report, Path(args.out))
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
                         f"{task}.reference.warmup=0", f"{task}.train.warmup=0",
                         *overrides]
    roots = {"digits": data, **{w: data.with_name(f"{data.name}-{w}") for w in WEB_TAILS}}
    for world in dict.fromkeys(TASKS[t].get("world", "digits") for t in task_names):
        sizes = (QUICK["world"] if args.quick else WORLDS)[world]
        if (roots[world] / "manifest.json").is_file():
            check_world(roots[world], world, sizes)
        else:
            world_maker(world)(roots[world], **sizes)
    roots = {t: roots[TASKS[t].get("world", "digits")] for t in task_names}  # each task's world
    methods = {t: ([m for m in args.methods.split(",") if m in METHODS[t]] if args.methods else
                   QUICK["methods"][t] if args.quick else default_methods(t, work, roots[t], overrides))
               for t in task_names}
    out = Path(args.out)
    partial = out.with_suffix(".partial.jsonl")  # runs so far: --extend continues an interrupted grid from them
    prior: list[dict] = []
    if args.extend:
        for path, made in [(out, out.is_file() and json.loads(out.read_text())),
                           (partial, partial.is_file() and read_partial(partial))]:
            if not made:
                continue
            if made["overrides"] != overrides or made["quick"] != args.quick:
                raise SystemExit(f"--extend: {path} was made with overrides {made['overrides']} (quick: "
                                 f"{made['quick']}), not {overrides} (quick: {args.quick}); write to another --out")
            for task in task_names:  # the defaults may have changed since (budgets, schedules, references)
                if task_config(task) != {k: v for k, v in made.get("tasks", {}).get(task, {}).items()
                                         if k != "methods"}:
                    raise SystemExit(f"--extend: {path} was made with another configuration of task {task} (this "
                                     "script's TASKS changed since, or the file predates the check); write to "
                                     "another --out")
            held = {(r["task"], r["method"], r["seed"]) for r in prior}
            prior += [r for r in made["runs"] if r["task"] in task_names and (r["task"], r["method"], r["seed"])
                      not in held]
        for task in task_names:  # the methods it holds first, in their order
            methods[task] = [*dict.fromkeys([r["method"] for r in prior if r["task"] == task] + methods[task])]
    for task in task_names:
        methods[task] = ["uniform"] + [m for m in methods[task] if m != "uniform"]  # the baseline always runs
    jobs = [(t, name, 0, work, roots[t], overrides) for t in task_names
            for name in [None, *(m for m in methods[t] if "acl" in METHODS[t][m])]]
    ctx = mp.get_context("fork")
    with ctx.Pool(args.jobs) as pool:
        references = dict(pool.imap(_prepare_job, jobs))
    print(f"references ready ({time.perf_counter() - start:.0f}s)", flush=True)
    targets = {t: TASKS[t]["targets"] + [round(f * references[t]["test"]["accuracy"], 4)
                                         for f in TASKS[t].get("reference_targets", [])] for t in task_names}
    aligned = [(t, share, work, roots[t], overrides) for t in task_names
               for share in {METHODS[t][m]["aligned_share"] for m in methods[t] if "aligned_share" in METHODS[t][m]}]
    if aligned:
        with ctx.Pool(1) as pool:  # once, before the runs; in a child: Polars' threads in this process would
            pool.starmap(aligned_keys, aligned)  # deadlock the workers forked from it
    for task in task_names:
        _SHARED[task] = load_task(task, work, roots[task], overrides)
    done = {(r["task"], r["method"], r["seed"]) for r in prior}
    runs = [(t, m, s, work, roots[t], overrides) for t in task_names for s in range(seeds) for m in methods[t]
            if (t, m, s) not in done]
    runs.sort(key=lambda job: -_cost(job[0], job[1]))  # longest first: the pool ends together
    results = list(prior)
    out.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("w") as stream:  # what this grid holds so far, should it be interrupted
        stream.write(json.dumps({"overrides": overrides, "quick": args.quick,
                                 "tasks": {t: task_config(t) for t in task_names}}) + "\n")
        stream.writelines(json.dumps(result) + "\n" for result in prior)
    # forked after loading: workers share the decoded samples. A worker that dies (killed for memory) breaks the
    # executor, which fails here instead of waiting for its run forever, as a multiprocessing.Pool would
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        try:
            for future in as_completed([pool.submit(_run_job, job) for job in runs]):
                result = future.result()
                results.append(result)
                with partial.open("a") as stream:
                    stream.write(json.dumps(result) + "\n")
                last = result["history"][-1]
                print(f"{result['task']:>6} {result['method']:<20} seed {result['seed']}: final "
                      f"{last['accuracy']:.3f} in {last['seconds']:.0f}s ({time.perf_counter() - start:.0f}s elapsed)",
                      flush=True)
        except BrokenProcessPool:
            raise SystemExit(f"efficiency: a worker process died (killed for memory? `dmesg` says); the {len(results)} "
                             f"runs done are in {partial}: rerun with --extend (and fewer --jobs) to go on") from None
    results.sort(key=lambda r: (task_names.index(r["task"]), methods[r["task"]].index(r["method"]), r["seed"]))
    summary = summarise(results, targets, references)
    print(table(summary, targets))
    pngs = plot(results, summary, out.with_suffix(""))
    report = {"benchmark": "efficiency", "argv": sys.argv[1:], "quick": args.quick, "seeds": seeds,
              "overrides": overrides, "tasks": {t: {**task_config(t), "methods": {m: METHODS[t][m] for m in methods[t]}}
                                                for t in task_names},
              "references": references, "targets": targets, "summary": summary, "runs": results, "plots": pngs,
              "seconds": time.perf_counter() - start, "torch_threads": 1, "cpu_count": os.cpu_count(),
              "offline_cost_in_totals": "only in the amortised columns"}
    write_json(report, out)
    partial.unlink()
    print(f"wrote {out} and {', '.join(pngs)} in {report['seconds']:.0f}s")


if __name__ == "__main__":
    main()
