"""`curate train-reference RECIPE`: train the reference model on the clean curated split."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from . import tasks
from .recipe import Recipe
from .schedule import lr_factor

__all__ = ["fit", "train_reference"]


def fit(model: torch.nn.Module, pool: dict, recipe: Recipe, *, steps: int, device: torch.device,
        on_step: Callable[[int, torch.Tensor], None] | None = None, flexi=None) -> torch.Tensor:
    """The reference's training loop: `steps` AdamW steps of `recipe.reference`'s batch size and learning rate
    over `pool` (a split collated into one batch), a fresh permutation every pass; returns the last loss.
    The learning rate follows `recipe.reference.schedule` over these `steps`. `on_step(step, loss)` runs after
    each step; it may evaluate the model (`evaluate` restores training mode). `flexi` (a `FlexiConfig`, for
    `benchmarks/reference_curve.py`): train at Flexi-JEST's mixed resolution, as its learner does."""
    task, cfg, rc = tasks.task_of(recipe), recipe.reference_model, recipe.reference
    n = len(pool["__key__"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=rc.lr, weight_decay=recipe.train.weight_decay)
    generator = torch.Generator().manual_seed(recipe.train.seed)
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for step in range(1, steps + 1):
        if len(order) < rc.batch_size:  # a fresh permutation every pass over the pool
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:rc.batch_size], order[rc.batch_size:]
        batch = {k: v[idx] for k, v in pool.items() if isinstance(v, torch.Tensor)}
        optimizer.zero_grad(set_to_none=True)
        loss = task.train_loss(model, batch, cfg, device, flexi=flexi)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = rc.lr * lr_factor(step - 1, steps, rc.warmup, rc.schedule)
        optimizer.step()
        if on_step is not None:
            on_step(step, loss)
    return loss


def train_reference(recipe: Recipe, *, log=print) -> dict:
    """Train the reference (the recipe's `reference.model`, default the learner's architecture) on the
    curated split, evaluate it on the test split, and save it to `recipe.reference_path`."""
    if recipe.reference.checkpoint is not None:
        raise ValueError(f"train-reference: the recipe gives a trained reference (reference.checkpoint: "
                         f"{recipe.reference.checkpoint}); unset it to train one on data.curated")
    task = tasks.task_of(recipe)
    device = tasks.resolve_device(recipe.train.device)
    cfg, rc = recipe.reference_model, recipe.reference
    model = tasks.build_model(cfg, recipe, seed=recipe.train.seed + 1_000).to(device)
    (pool,) = tasks.in_memory_batches(tasks.load_split(recipe, "curated"), batch_size=1 << 30)
    test = tasks.in_memory_batches(tasks.load_split(recipe, "test"))
    start = time.perf_counter()
    loss = fit(model, pool, recipe, steps=rc.steps, device=device)
    seconds = time.perf_counter() - start
    metrics = task.evaluate(model, test, cfg, device)
    info = {"recipe": recipe.name, "model": cfg.model_dump(), "steps": rc.steps, "train_seconds": round(seconds, 2),
            "final_loss": loss.item(), "test": metrics}
    tasks.save_model(model, recipe.reference_path, info)
    log(f"reference: {rc.steps} steps in {seconds:.1f}s, test {metrics} → {recipe.reference_path}")
    return info
