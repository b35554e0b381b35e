"""`curate run RECIPE`: train a learner on curated batches (and baselines in the same run).

Each run trains from the same initial weights on the same data; only the selection differs. Every
`eval_every` steps: evaluation on the test split, a line in `metrics.jsonl`, and a checkpoint holding
model, optimizer and pipeline state, so `--resume` continues to exactly the same result.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import curate
from curate.recipe import Recipe

from . import tasks

__all__ = ["run", "run_one", "plan_runs"]


def plan_runs(recipe: Recipe) -> dict[str, dict]:
    """Run name → pipeline options: the recipe's own selection, then each baseline in `compare`."""
    sel = recipe.selection
    main = {"rule": sel.rule, "method": sel.method, "filter_ratio": sel.filter_ratio, "n_chunks": sel.n_chunks,
            "temperature": sel.temperature}
    runs = {sel.rule if sel.rule != "rho" else "learnability": main}
    for rule in recipe.compare:
        if rule == "uniform":  # the baseline: data as it comes, no superbatch to score
            runs["uniform"] = {"rule": "uniform", "method": "sample", "filter_ratio": 0.0}
        else:
            runs[rule] = {**main, "rule": rule}
    return runs


def _reference(recipe: Recipe, device: torch.device):
    if recipe.cache.path:
        from curate.cache import ScoreCache

        return ScoreCache.open(recipe.cache.path, storage_options=recipe.data.storage_options)
    model, _ = tasks.load_model(recipe.reference_path, recipe, recipe.reference_model)
    return model.to(device)


def run_one(recipe: Recipe, name: str, options: dict, *, resume: bool = False, progress: bool = True,
            test: list[dict] | None = None) -> list[dict]:
    """Train one run; returns its metrics history (one dict per evaluation)."""
    device = tasks.resolve_device(recipe.train.device)
    tc, cfg = recipe.train, recipe.model
    out = recipe.out / name
    out.mkdir(parents=True, exist_ok=True)
    model = tasks.build_model(cfg, recipe, seed=tc.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    uses_models = options["rule"] != "uniform"
    learner = model
    if uses_models and recipe.selection.actor:  # ACL: a small proxy scores in the learner's place
        actor_cfg = recipe.selection.actor
        proxy = tasks.build_model(actor_cfg.model, recipe, seed=tc.seed + 2_000).to(device)
        learner = curate.Actor(proxy, torch.optim.AdamW(proxy.parameters(), lr=actor_cfg.lr),
                               loss_fn=tasks.actor_loss(actor_cfg.model))
    batches = curate.pipeline(
        tasks.load_split(recipe, "train"),
        learner=learner if uses_models else None,
        reference=_reference(recipe, device) if uses_models else None,
        scorer=tasks.scorer_for(recipe, patch_dropout=recipe.selection.score_patch_dropout if uses_models else 0),
        train_model=model,
        batch_size=tc.batch_size,
        shuffle_buffer=recipe.selection.shuffle_buffer,
        seed=tc.seed,
        **options,
    )
    test = test if test is not None else tasks.in_memory_batches(tasks.load_split(recipe, "test"))
    step, history, noisy, seen, seconds = 0, [], 0, 0, 0.0
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["pipeline"])
        step, history, noisy, seen, seconds = (state[k] for k in ("step", "history", "noisy", "seen", "seconds"))
    bar = tqdm(total=tc.steps, initial=step, desc=name, unit="step", disable=not progress, file=sys.stderr)
    it = iter(batches)
    model.train()
    start = time.perf_counter() - seconds
    while step < tc.steps:
        try:
            batch = next(it)
        except StopIteration:  # next epoch
            it = iter(batches)
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = tasks.train_loss(model, batch, cfg, device)
        loss.backward()
        optimizer.step()
        step += 1
        noisy += int(batch["is_noisy"].sum())
        seen += len(batch["is_noisy"])
        bar.update(1)
        if step % tc.eval_every == 0 or step == tc.steps:
            record = {"run": name, "step": step, "train_loss": loss.item(),
                      **tasks.evaluate(model, test, cfg, device),
                      "noisy_kept": noisy / seen, "seconds": time.perf_counter() - start,
                      "pipeline": batches.stats()}
            history.append(record)
            noisy = seen = 0
            bar.set_postfix(acc=f"{record['accuracy']:.3f}")
            _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "pipeline": batches.state_dict(), "step": step, "history": history,
                          "noisy": noisy, "seen": seen, "seconds": record["seconds"]}, checkpoint)
            _write_jsonl(out / "metrics.jsonl", history)
    bar.close()
    return history


def run(recipe: Recipe, *, resume: bool = False, progress: bool | None = None, log=print) -> dict:
    """All runs of a recipe (the selection and its `compare` baselines), then the summary and the plot."""
    progress = sys.stderr.isatty() if progress is None else progress
    tasks.manifest(recipe)  # fail early, before any training, if the data is missing
    test = tasks.in_memory_batches(tasks.load_split(recipe, "test"))
    histories = {}
    for name, options in plan_runs(recipe).items():
        histories[name] = run_one(recipe, name, options, resume=resume, progress=progress, test=test)
        last = histories[name][-1]
        log(f"{name}: step {last['step']} accuracy {last['accuracy']:.3f} "
            f"({last['seconds']:.1f}s, {last['step'] / last['seconds']:.1f} steps/s)")
    summary = summarise(histories)
    _write_jsonl(recipe.out / "metrics.jsonl", [r for h in histories.values() for r in h])
    (recipe.out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(histories, recipe.out / "learning_curve.png", title=recipe.name)
    log(format_summary(summary))
    log(f"wrote {recipe.out / 'metrics.jsonl'}, {recipe.out / 'summary.json'}, {recipe.out / 'learning_curve.png'}")
    return summary


def summarise(histories: dict[str, list[dict]]) -> dict:
    """Per run: final and best accuracy, and steps to reach uniform's best (when uniform ran)."""
    target = max(r["accuracy"] for r in histories["uniform"]) if "uniform" in histories else None
    summary = {}
    for name, history in histories.items():
        best = max(history, key=lambda r: r["accuracy"])
        reached = next((r["step"] for r in history if target is not None and r["accuracy"] >= target), None)
        summary[name] = {"final_accuracy": history[-1]["accuracy"], "best_accuracy": best["accuracy"],
                         "best_step": best["step"], "steps_to_uniform_best": reached,
                         "noisy_kept": sum(r["noisy_kept"] for r in history) / len(history),
                         "seconds": history[-1]["seconds"],
                         "score_seconds": history[-1]["pipeline"].get("score_seconds", 0.0)}
        if "r1" in history[-1]:
            summary[name]["final_r1"] = history[-1]["r1"]
    if target is not None:
        uniform_steps = summary["uniform"]["steps_to_uniform_best"]
        for row in summary.values():
            row["speedup_to_uniform_best"] = (uniform_steps / row["steps_to_uniform_best"]
                                              if row["steps_to_uniform_best"] else None)
    return summary


def format_summary(summary: dict) -> str:
    columns = ["final_accuracy", "best_accuracy", "steps_to_uniform_best", "speedup_to_uniform_best", "noisy_kept",
               "seconds"]
    width = max(len(n) for n in summary) + 2
    lines = ["run".ljust(width) + "".join(c.replace("_", " ")[:14].rjust(16) for c in columns)]
    for name, row in summary.items():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)).rjust(16))
        lines.append(name.ljust(width) + "".join(cells))
    return "\n".join(lines)


def plot(histories: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        ax.plot([r["step"] for r in history], [r["accuracy"] for r in history], marker="o", label=name)
    ax.set(xlabel="training step", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
