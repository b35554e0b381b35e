"""`curate run RECIPE`: train a learner on curated batches (and baselines in the same run).

Each run trains from the same initial weights on the same data; only the selection differs. Every
`eval_every` steps: evaluation on the test split, a line in `metrics.jsonl`, and a checkpoint holding
model, optimizer and pipeline state, so `--resume` continues to exactly the same result.

Under torchrun (`torchrun --nproc_per_node=N -m pipelines.cli run RECIPE`, WORLD_SIZE > 1) every rank runs
this: the process group is initialised from the recipe's `distributed` section, the ranks check that they
run the same recipe, each reads its own shards and trains a DistributedDataParallel model on
train.batch_size / N samples per step; rank 0 evaluates and writes metrics, checkpoints (holding every
rank's pipeline state) and plots.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

import curate
from curate.batch import batch_size_of
from curate.distributed import Comm, Shards, local_sizes, peer_failure, resolve_world, stalled_error
from curate.files import atomic_write, stale_temps, write_json
from curate.pipeline import superbatch_size_for

from . import tasks
from .extras import needs_extra
from .progress import progress as show_progress
from .recipe import Recipe
from .schedule import lr_factor

__all__ = ["run", "run_one", "plan_runs", "distributed_session", "load_checkpoint"]


def plan_runs(recipe: Recipe) -> dict[str, dict]:
    """Run name → pipeline options: the recipe's own selection, then each baseline in `compare`."""
    sel = recipe.selection
    main = {"rule": sel.rule, "method": sel.method, "filter_ratio": sel.filter_ratio, "n_chunks": sel.n_chunks,
            "temperature": sel.temperature, "uniform_share": sel.uniform_share, "selection_warmup": sel.warmup}
    runs = {sel.rule if sel.rule != "rho" else "learnability": main}
    for rule in recipe.compare:
        if rule == "uniform":  # the baseline: data as it comes, no superbatch to score
            runs["uniform"] = {"rule": "uniform", "method": "sample", "filter_ratio": 0.0}
        else:
            runs[rule] = {**main, "rule": rule}
    return runs


def _curated_keys(recipe: Recipe) -> Path | None:
    if not recipe.curation.train_on_curated:
        return None
    if not recipe.curated_keys_path.is_file():
        raise tasks.MissingDataError(f"curation.train_on_curated: no key list at {recipe.curated_keys_path}; make it "
                                     "with `curate curate-set RECIPE`")
    return recipe.curated_keys_path


def _reference(recipe: Recipe, device: torch.device, comm: Comm):
    """The reference scores: the cache when the recipe has one, else the reference model itself.

    A cache must have been written for this recipe: by its reference (the hash in the trained reference's
    model.json; not checked when there is no trained reference here), for its train data (the manifest's shard
    list) and for its scorer's kind (per-example losses, softmax or sigmoid embeddings). Anything else is refused
    (curate.cache.ProvenanceError) naming both values and the fix, `curate precompute RECIPE`, which rescores
    exactly the parts made otherwise."""
    if recipe.cache.path:
        from curate.cache import ScoreCache

        parts = None
        if comm.world_size > 1:  # only this rank's shards' parts (part i scores shard i; Shards gives i % W == rank)
            mine = set(range(comm.rank, len(tasks.shard_urls(recipe, "train")), comm.world_size))
            parts = lambda name: int(name.split("-")[1].split(".")[0]) in mine  # noqa: E731
        expect = {"reference_hash": tasks.reference_hash(recipe), "dataset": tasks.dataset_identity(recipe),
                  "kind": tasks.scorer_for(recipe).kind}  # the kind the run's scorer asks the cache for
        return ScoreCache.open(recipe.cache.path, storage_options=recipe.data.storage_options, parts=parts,
                               expect=expect)
    model, _ = tasks.load_reference(recipe)
    return model.to(device)


@contextmanager
def distributed_session(recipe: Recipe) -> Iterator[Comm]:
    """The ranks of this job: under torchrun (WORLD_SIZE > 1) the process group is initialised (and destroyed on
    exit) from `recipe.distributed`, and every rank checks that all run the same recipe; else a single rank."""
    import torch.distributed as dist

    if resolve_world()[1] == 1:
        yield Comm(0, 1)
        return
    started = not dist.is_initialized()
    if started:
        backend = recipe.distributed.backend
        if backend == "auto":
            backend = "nccl" if tasks.resolve_device(recipe.train.device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=recipe.distributed.timeout_s))
    try:
        comm = Comm(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, recipe.distributed.timeout_s)
        comm.check_same("recipe", _flatten(recipe.model_dump(mode="json")))
        yield comm
        # on success only (a failed rank must not wait): no rank tears gloo down while another's collectives still
        # run; one once aborted at exit with "terminate called without an active exception"
        if started:
            dist.barrier()
    except (RuntimeError, OSError) as error:  # DDP's all-reduce on the default group: name the rank that stalled
        if not peer_failure(error):
            raise
        raise stalled_error(error, "collectives of training (gradients, metrics, checkpoints)", comm.rank,
                            comm.world_size, recipe.distributed.timeout_s) from error
    finally:
        if started:
            dist.destroy_process_group()


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _sizes(recipe: Recipe, options: dict, world_size: int) -> dict:
    """Per-rank pipeline sizes: the recipe's global batch and superbatch split over the ranks."""
    if world_size == 1:
        return {"batch_size": recipe.train.batch_size}
    batch = recipe.train.batch_size
    superbatch = superbatch_size_for(batch, options["filter_ratio"])
    try:
        b, big_b = local_sizes(batch, superbatch, world_size)
    except ValueError as error:
        raise ValueError(f"train.batch_size={batch} with selection.filter_ratio={options['filter_ratio']} (superbatch "
                         f"{superbatch}) on {world_size} ranks: {error}") from None
    return {"batch_size": b} if big_b == b else {"batch_size": b, "superbatch_size": big_b}


def _train_source(recipe: Recipe, task: tasks.Task, comm: Comm):
    """This rank's training data: all shards in one process, shard i % N == rank under N ranks."""
    if comm.world_size == 1:
        return tasks.load_split(recipe, "train")
    load = functools.partial(task.load, storage_options=recipe.data.storage_options)
    return Shards(tasks.shard_urls(recipe, "train"), load, rank=comm.rank, world_size=comm.world_size)


class _TrainLoss(nn.Module):
    """The training loss as a module's forward: DistributedDataParallel only synchronises gradients of a
    backward that follows its own forward (the loss calls encode_image / encode_text, not forward)."""

    def __init__(self, task: tasks.Task, model: nn.Module, cfg, device: torch.device, flexi):
        super().__init__()
        self.task, self.model, self.cfg, self.device, self.flexi = task, model, cfg, device, flexi

    def forward(self, batch: dict) -> torch.Tensor:
        return self.task.train_loss(self.model, batch, self.cfg, self.device, flexi=self.flexi)


def run_one(recipe: Recipe, name: str, options: dict, *, resume: bool = False, progress: bool = True,
            test: list[dict] | None = None, comm: Comm | None = None, source: Iterable[dict] | None = None,
            checkpoint: bool = True, resume_anyway: bool = False) -> list[dict]:
    """Train one run; returns its metrics history (one dict per evaluation).

    With `comm` of several ranks (`distributed_session`) this rank trains its part; the history is rank 0's.
    `source`: samples to train on instead of the recipe's train shards (e.g. decoded once into memory and
    shared by a benchmark's runs). `test`: collated test batches (default: the recipe's test split).
    `checkpoint=False` writes no checkpoint (the run cannot be resumed); `metrics.jsonl` is still written.
    The checkpoint holds the resolved recipe; `resume` under a recipe that differs in a key that changes the
    result (`recipe_changes`) is refused naming the keys, unless `resume_anyway` (then a logged warning).
    """
    if resume and not checkpoint:
        raise ValueError(f"run_one: run {name!r} with resume=True needs checkpoint=True (nothing else to resume from)")
    comm = comm or Comm(0, 1)
    task = tasks.task_of(recipe)
    device = tasks.resolve_device(recipe.train.device)
    if comm.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    tc, cfg = recipe.train, recipe.model
    out = recipe.out / name
    if comm.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out, ("checkpoint.pt", "metrics.jsonl"))
    model = tasks.build_model(cfg, recipe, seed=tc.seed).to(device)
    rule = curate.get_rule(options["rule"])
    # Flexi-JEST: where the learner scores, it scores at low resolution and trains at mixed resolution
    flexi = recipe.selection.flexi if rule.uses_learner else None
    if flexi is not None:
        from .flexi import downsample, make_flexible

        make_flexible(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    forward = lambda batch: task.train_loss(model, batch, cfg, device, flexi=flexi)  # noqa: E731
    if comm.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = None if device.type == "cpu" else [device]
        forward = DistributedDataParallel(_TrainLoss(task, model, cfg, device, flexi), device_ids=ids)
    learner = model
    if rule.uses_learner and recipe.selection.actor:  # ACL: a small proxy scores in the learner's place
        actor_cfg = recipe.selection.actor
        proxy = tasks.build_model(actor_cfg.model, recipe, seed=tc.seed + 2_000).to(device)
        learner = curate.Actor(proxy, torch.optim.AdamW(proxy.parameters(), lr=actor_cfg.lr),
                               loss_fn=task.actor_loss(actor_cfg.model))
    reference = _reference(recipe, device, comm) if rule.uses_reference else None
    if flexi is not None and isinstance(reference, nn.Module):  # scored online, at the learner's resolution
        make_flexible(reference)
    batches = curate.pipeline(
        _train_source(recipe, task, comm) if source is None else source,
        learner=learner if rule.uses_learner else None,
        reference=reference,
        scorer=tasks.scorer_for(recipe),
        # Flexi-JEST: the superbatch scored downsampled; the ledger measures the mixed-resolution training forward
        score_transform=None if flexi is None else functools.partial(downsample, factor=flexi.downsample),
        train_model=model,
        train_scorer=None if flexi is None else tasks.scorer_for(recipe, flexi=flexi),
        keep_keys=_curated_keys(recipe),
        shuffle_buffer=recipe.selection.shuffle_buffer,
        seed=tc.seed,
        rank=comm.rank,
        world_size=comm.world_size,
        selection_scope=recipe.distributed.selection_scope,
        **options,
        **_sizes(recipe, options, comm.world_size),
    )
    try:  # the pipeline's background thread, DataLoader workers and process group end with the run, also on an error
        if comm.rank == 0 and test is None:
            test = tasks.in_memory_batches(tasks.load_split(recipe, "test"))
        step, history, tally, seconds = 0, [], _new_tally(), 0.0
        checkpoint_path = out / "checkpoint.pt"
        state = load_checkpoint(checkpoint_path) if resume and comm.rank == 0 and checkpoint_path.is_file() else None
        state = comm.broadcast_object(state)  # rank 0 reads: other nodes need not share its file system
        if state is not None:
            _check_recipe(state, recipe, checkpoint_path, resume_anyway)
            if state.get("world_size", 1) != comm.world_size:
                raise ValueError(f"--resume: {checkpoint_path} was written by {state.get('world_size', 1)} processes, "
                                 f"this run has {comm.world_size}; resume with the same number of processes")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            batches.load_state_dict(state["pipelines"][comm.rank] if "pipelines" in state else state["pipeline"])
            step, history, tally, seconds = (state[k] for k in ("step", "history", "tally", "seconds"))
        bar = show_progress(tc.steps, name, "step", initial=step, enabled=progress and comm.rank == 0,
                            per_step=tc.batch_size)
        # a checkpoint taken after an epoch's last batch resumes at that epoch's end: its first iter() is empty
        it, yielded = iter(batches), int(state is not None)
        model.train()
        start = time.perf_counter() - seconds
        while step < tc.steps:
            try:
                batch = next(it)
            except StopIteration:  # next epoch
                if not yielded:
                    raise RuntimeError(f"train: run {name!r} got no batches from its data; check data.root "
                                       "(or data.train)") from None
                it, yielded = iter(batches), 0
                continue
            yielded += 1
            optimizer.zero_grad(set_to_none=True)
            loss = forward(batch)
            loss.backward()
            for group in optimizer.param_groups:  # from the step count alone, so a resumed run follows the same lr
                group["lr"] = tc.lr * lr_factor(step, tc.steps, tc.warmup, tc.schedule)
            optimizer.step()
            step += 1
            _count(tally, batch)
            bar.update(1)
            if step % tc.eval_every == 0 or step == tc.steps:
                record = _record(name, step, loss.item(), tally, batches, task, model, test, cfg, device, comm, start)
                record = comm.broadcast_object(record)  # every rank keeps rank 0's history
                history.append(record)
                tally = _new_tally()
                bar.set_postfix(acc=f"{record['accuracy']:.3f}")
                # every rank's state, to resume each
                states = comm.gather_object(batches.state_dict()) if checkpoint else None
                if comm.rank == 0:
                    if checkpoint:
                        _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "pipeline": states[0], "pipelines": states, "world_size": comm.world_size,
                                      "step": step, "history": history, "tally": tally,
                                      "seconds": record["seconds"], "recipe": recipe.model_dump(mode="json")},
                                     checkpoint_path)
                    _write_jsonl(out / "metrics.jsonl", history)
        bar.close()
        return history
    finally:
        batches.close()


# Recipe keys a run may resume under changed, because they leave the trajectory up to and after the checkpoint
# as it was: the run's length (a longer run continues the same one, unless a cosine schedule decays over it), where
# outputs go, what `prepare` makes when
# missing, the other runs of the recipe (each run checks its own checkpoint), how long collectives wait, and
# S3 credentials / endpoints / timeouts. Every other key (data, model, selection, seed, lr, eval_every, ...)
# changes what the resumed run computes or records.
RESUMABLE_CHANGES = ("train.steps", "train.out", "prepare", "compare", "distributed.timeout_s",
                     "data.storage_options")


def recipe_changes(saved: dict, recipe: Recipe) -> list[str]:
    """'key: old → new' for each dotted recipe key that differs from the checkpoint's (RESUMABLE_CHANGES aside).

    A key added to the recipe since the checkpoint was written counts at its default, which is what curate did
    before the key existed (a new knob's default keeps the old behaviour)."""
    old, new = _flatten(_with_defaults(saved)), _flatten(recipe.model_dump(mode="json"))
    free = [k for k in RESUMABLE_CHANGES if not (k == "train.steps" and new.get("train.schedule") == "cosine")]
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>")
                  and not any(k == f or k.startswith(f"{f}.") for f in free))
    return [f"{k}: {_shown(old, k)} → {_shown(new, k)}" for k in keys]


def _with_defaults(saved: dict) -> dict:
    """The saved recipe with the keys it lacks at their defaults; as saved if it no longer validates (a key since
    removed or a value no longer allowed), so every difference is still shown."""
    try:
        return Recipe.model_validate(saved).model_dump(mode="json")
    except ValueError:  # pydantic's ValidationError
        return saved


def _shown(flat: dict, key: str) -> str:
    return json.dumps(flat[key]) if key in flat else "(unset)"


def _check_recipe(state: dict, recipe: Recipe, path: Path, anyway: bool) -> None:
    """Refuse (or, asked to, warn about) resuming a checkpoint under a recipe that changes its result."""
    saved = state.get("recipe")
    changes = ["the checkpoint holds no recipe (written by an older curate)"] if saved is None else \
        recipe_changes(saved, recipe)
    if not changes:
        return
    listed = "; ".join(changes[:10]) + (f"; and {len(changes) - 10} more" if len(changes) > 10 else "")
    if anyway:
        logging.getLogger("curate.run").warning(
            "warning: --resume-anyway: resuming %s under a changed recipe (%s); the result matches neither recipe's "
            "uninterrupted run", path, listed)
        return
    raise ValueError(f"--resume: {path} was written under another recipe ({listed}); resume with the recipe it was "
                     "written with, or pass --resume-anyway to continue under this one")


def load_checkpoint(path: Path) -> dict:
    """A run's checkpoint, read as data only: `weights_only=True` refuses anything but tensors and plain
    containers, so a planted or damaged file cannot run code when a job resumes from it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for a foreign object; RuntimeError / EOFError for a damaged file
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"--resume: {path} is not a checkpoint curate can load safely ({type(error).__name__}: "
                         f"{reason}); delete it to start this run over, or run without --resume") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "step"} <= state.keys():
        raise ValueError(f"--resume: {path} is not a curate run checkpoint (no model, optimizer and step); delete it "
                         "to start this run over, or run without --resume")
    return state


def _new_tally() -> dict:
    """What the trained batches of one evaluation interval held: samples, the count of each boolean
    `is_*` diagnostic the data carries (`is_noisy`, and the web world's `is_duplicate`, `is_tail`), and the summed
    share of distinct labels per batch (concept coverage). Plain types: it is saved in the checkpoint."""
    return {"seen": 0, "flags": {}, "coverage": 0.0, "labelled": 0}


def _count(tally: dict, batch: dict) -> None:
    n = batch_size_of(batch)
    tally["seen"] += n
    for key, value in batch.items():
        if key.startswith("is_") and isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            tally["flags"][key] = tally["flags"].get(key, 0) + int(value.sum())
    label = batch.get("label")
    if isinstance(label, torch.Tensor) and label.dim() == 1 and not label.is_floating_point():
        tally["coverage"] += len(torch.unique(label)) / n
        tally["labelled"] += 1


def _shares(parts: list[dict]) -> dict:
    """The intervals' diagnostics over the ranks: `noisy_kept` (None when the data carries no is_noisy, e.g. your
    own data), `X_kept` for every other `is_X` flag, and `label_coverage` (distinct labels / batch size)."""
    seen = sum(p["seen"] for p in parts)
    flags = {key for p in parts for key in p["flags"]}
    out: dict = {"noisy_kept": None}
    for key in sorted(flags):
        out[f"{key[3:]}_kept"] = sum(p["flags"].get(key, 0) for p in parts) / seen if seen else None
    labelled = sum(p["labelled"] for p in parts)
    if labelled:
        out["label_coverage"] = sum(p["coverage"] for p in parts) / labelled
    return out


def _record(name: str, step: int, loss: float, tally: dict, batches, task: tasks.Task, model, test, cfg,
            device, comm: Comm, start: float) -> dict | None:
    """One evaluation's metrics (rank 0; None elsewhere): train loss averaged and the diagnostics counted over the
    ranks, the pipeline's stats totalled over them (a collective: every rank calls this)."""
    parts = comm.gather_object((loss, tally))
    stats = batches.global_stats() if comm.world_size > 1 else batches.stats()
    if comm.rank != 0:
        return None
    return {"run": name, "step": step, "train_loss": sum(p[0] for p in parts) / len(parts),
            **task.evaluate(model, test, cfg, device), **_shares([p[1] for p in parts]),
            "seconds": time.perf_counter() - start, "pipeline": stats}


def run(recipe: Recipe, *, resume: bool = False, progress: bool | None = None, log=print,
        prepare: Callable[[Recipe], None] | None = None, resume_anyway: bool = False) -> dict:
    """All runs of a recipe (the selection and its `compare` baselines), then the summary and the plot.

    `prepare(recipe)` (e.g. `pipelines.cli.prepare`) runs first, on rank 0 only while the others wait, so that
    ranks do not make the same data or reference at once. Under torchrun only rank 0 logs and writes.
    `resume_anyway`: resume even where the recipe changed since the checkpoint (see `run_one`).
    """
    with distributed_session(recipe) as comm:
        if prepare is not None:
            _on_rank0(comm, lambda: prepare(recipe))
        if comm.rank != 0:
            progress, log = False, lambda *args, **kwargs: None
        progress = True if progress is None else progress
        tasks.check_data(recipe)  # fail early, before any training, if the data is missing
        runs = plan_runs(recipe)
        for options in runs.values():  # every rank fails here, before training, on sizes the ranks cannot split
            _sizes(recipe, options, comm.world_size)
        test = tasks.in_memory_batches(tasks.load_split(recipe, "test")) if comm.rank == 0 else None
        histories = {}
        for name, options in runs.items():
            histories[name] = run_one(recipe, name, options, resume=resume or resume_anyway, progress=progress,
                                      test=test, comm=comm, resume_anyway=resume_anyway)
            last = histories[name][-1]
            log(f"{name}: step {last['step']} accuracy {last['accuracy']:.3f} "
                f"({last['seconds']:.1f}s, {last['step'] / last['seconds']:.1f} steps/s)")
        summary = summarise(histories)
        if comm.rank == 0:
            _remove_stale_temps(recipe.out, ("metrics.jsonl", "summary.json", "learning_curve.png"))
            _write_jsonl(recipe.out / "metrics.jsonl", [r for h in histories.values() for r in h])
            write_json(recipe.out / "summary.json", summary)
            plot(histories, recipe.out / "learning_curve.png", title=recipe.name)
        log(format_summary(summary))
        log(f"wrote {recipe.out / 'metrics.jsonl'}, {recipe.out / 'summary.json'}, {recipe.out / 'learning_curve.png'}")
        return summary


def _remove_stale_temps(directory: Path, names: tuple[str, ...]) -> None:
    # a run killed mid-write (SIGKILL: no clean-up ran) leaves the temporary its atomic_write was filling; a run
    # directory belongs to one run at a time, so whatever temporaries of its files are there now are dead
    for name in names:
        for temp in stale_temps(directory / name):
            os.remove(temp)


def _on_rank0(comm: Comm, fn: Callable[[], None]) -> None:
    """`fn()` on rank 0 while the others wait; its failure fails every rank (rather than leaving them waiting)."""
    error = None
    if comm.rank == 0:
        try:
            fn()
        except Exception as exc:
            error = exc
    message = comm.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed to prepare the recipe: {message}")


def summarise(histories: dict[str, list[dict]]) -> dict:
    """Per run: final and best accuracy, and steps to reach uniform's best (when uniform ran)."""
    target = max(r["accuracy"] for r in histories["uniform"]) if "uniform" in histories else None
    summary = {}
    for name, history in histories.items():
        best = max(history, key=lambda r: r["accuracy"])
        reached = next((r["step"] for r in history if target is not None and r["accuracy"] >= target), None)
        summary[name] = {"final_accuracy": history[-1]["accuracy"], "best_accuracy": best["accuracy"],
                         "best_step": best["step"], "steps_to_uniform_best": reached,
                         **{key: _mean([r.get(key) for r in history]) for key in history[-1]
                            if key.endswith("_kept") or key == "label_coverage"},  # noisy_kept, duplicate_kept, ...
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


def _mean(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


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
    with needs_extra("the learning-curve plot"):
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
    with atomic_write(path) as stream:
        fig.savefig(stream, format="png", dpi=110)
    plt.close(fig)


def _save_atomic(state: dict, path: Path) -> None:
    # serialised in memory first: torch's zip writer turns a short write (a file size limit, EFBIG) into
    # "unexpected pos" and loses the OSError, which atomic_write names (DiskFullError) and cleans up after
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_write(path) as stream:
        stream.write(buffer.getbuffer())


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_write(path, "w") as stream:
        stream.write("".join(json.dumps(r) + "\n" for r in records))
