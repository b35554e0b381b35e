"""`curate.pipeline`: wrap any dataloader in shuffle → superbatch → score → select (→ train actor) (→ prefetch).

Under torch DDP (world size > 1) the chain also splits the data by rank, keeps ranks in step and can select
over the global superbatch; see `curate.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from os import PathLike

from torch import nn
from torchdata.nodes import BaseNode, Loader

from .actor import Actor, TrainActor
from .distributed import (
    SCOPES,
    Comm,
    GlobalSelect,
    Lockstep,
    RankSplit,
    already_split,
    merge_stats,
    resolve_world,
    shards_of,
)
from .flops import TrainingFlops, ledger_stats
from .nodes import KeepKeys, Shuffle, Superbatch, as_node
from .rules import Rule
from .score import Score
from .select import METHODS, JointSelect
from .sync import WeightSync

__all__ = ["pipeline", "Pipeline", "Prefetch", "superbatch_size_for"]


def superbatch_size_for(batch_size: int, filter_ratio: float) -> int:
    """B such that keeping `batch_size` of B filters out `filter_ratio` of the data: round(b / (1 − f))."""
    if not 0 <= filter_ratio < 1:
        raise ValueError(f"pipeline: filter_ratio must be in [0, 1), got {filter_ratio=}; "
                         "0.8 keeps 1 sample in 5")
    return round(batch_size / (1 - filter_ratio))


class Prefetch(BaseNode):
    """Produces the next item in a background thread while the training loop uses the current one.

    Item n+1 (a superbatch loaded, scored and selected) is started when item n is handed out, so its
    scores come from the weights before training step n: one step earlier than live scoring. The
    scoring weights must not change while item n+1 is scored, so the upstream scores from a
    `WeightSync` snapshot:

    * `push_sync=True` (the pipeline's own sync): the snapshot is pushed from the learner at every
      hand-out, in the training thread, before item n+1 starts, while nothing reads it.
    * `push_sync=False` (a user's sync, pushed by its optimizer hook): the sync's lock is taken at
      hand-out and released when item n+1 is ready, so a push during step n waits for that scoring.

    Args:
        source: upstream node (everything up to selection).
        sync: the `WeightSync` the upstream scores from, or None when it scores no changing model.
        push_sync: push `sync` at every hand-out (True) or hold its lock while scoring (False).

    `get_state()` is the upstream's state right after the item last handed out (captured in the
    thread), so a resumed pipeline replays the prefetched item instead of skipping it. (torchdata's
    `Prefetcher` snapshots state the same way but starts item n+1 inside its own `next()`, before the
    weights can be pinned, hence this node.)
    """

    def __init__(self, source: BaseNode, sync: WeightSync | None = None, push_sync: bool = False):
        super().__init__()
        self.source, self.sync, self.push_sync = source, sync, push_sync
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="curate-prefetch")
        self._future = None

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self._drain()
        self.source.reset(None if initial_state is None else initial_state["source"])
        self._state = self.source.state_dict()
        self._done = False

    def _drain(self) -> None:
        if self._future is not None:
            self._future.exception()  # wait for it; what it produced or raised belongs to the old epoch
            self._future = None

    def _job(self, hold: bool):
        try:
            try:
                item = next(self.source)
            except StopIteration:
                item = StopIteration
            return item, self.source.state_dict()
        finally:
            if hold:
                self.sync.lock.release()

    def _submit(self) -> None:
        hold = self.sync is not None and not self.push_sync
        if self.sync is not None and self.push_sync:
            self.sync.push()  # the thread is idle: nothing reads the snapshot now
        elif hold:
            self.sync.lock.acquire()  # released by the job: pushes wait until this item is scored
        self._future = self._pool.submit(self._job, hold)

    def next(self):
        if self._done:
            raise StopIteration
        if self._future is None:
            self._submit()
        item, state = self._future.result()
        self._future = None
        if item is StopIteration:
            self._done = True
            raise StopIteration
        self._state = state
        self._submit()
        return item

    def get_state(self) -> dict:
        return {"source": self._state}

    def wait(self) -> None:
        """Block until the item being prepared in the background is ready (it is kept for the next `next()`)."""
        if self._future is not None:
            self._future.exception()

    def __del__(self):
        self._pool.shutdown(wait=False)


class Pipeline(Loader):
    """The iterable `curate.pipeline` returns: training batches, with `state_dict()`, `load_state_dict()`
    (resume mid-epoch to exactly the same stream) and `stats()`. Each `iter()` is one epoch."""

    def __init__(self, root: BaseNode, stages: dict[str, BaseNode], sync: WeightSync | None = None,
                 prefetch: int = 0, learner=None, comm: Comm | None = None):
        super().__init__(root)
        self.stages, self.sync, self.prefetch = stages, sync, prefetch
        self.learner = learner  # a WeightSync holds its learner weakly; the pipeline was given it, so keeps it
        self.comm = comm or Comm(0, 1)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def global_stats(self) -> dict:
        """`stats()` totalled over all ranks (`curate.distributed.merge_stats`): counts and FLOPs summed, so rank 0
        can report the job's FLOP ledger. A collective: every rank must call it at the same point. With one
        process (or ranks not kept in step) it is `stats()`."""
        if self.comm.group is None:
            return self.stats()
        if "prefetch" in self.stages:  # its thread may be in a collective on the same group: let it finish
            self.stages["prefetch"].wait()
        return merge_stats(self.comm.gather_object(self.stats()))

    def stats(self) -> dict:
        """Counts so far: seen / kept samples, score means and the last superbatch's score quantiles,
        seconds spent scoring, and samples dropped as a short last superbatch (drop_last=True).

        Learner side: `prefetch`; `score_lag_steps`, the optimizer steps between the weights that scored
        the batches now being selected and the weights they train (prefetch + the WeightSync's staleness);
        `sync` (the WeightSync's counters); `actor_*` (ACL actor updates and training loss).

        FLOP ledger (`curate.flops`): `flops_per_sample` (forward FLOPs per sample of each model, measured
        on its first batch), `scoring_flops`, `actor_training_flops`, `training_flops` (3 × forward of the
        trained model per kept sample; None when no trained model is known), `flops_overhead`
        ((scoring + actor training) / training) and `break_even_step_saving` (1 + overhead: selection
        saves compute only if it needs fewer steps than uniform training by more than this factor).

        With prefetch, counts include the superbatch being prepared in the background.

        Under DDP these are this rank's (`global_stats()` totals them), plus `rank`, `world_size` and
        `dropped_unequal` (samples dropped because another rank ran out first).
        """
        out = dict(self.stages["select"].stats())
        score = self.stages["score"]
        out["score_seconds"] = score.stats()["score_seconds"]
        out["dropped_tail"] = self.stages["superbatch"].stats()["dropped_tail"]
        if "keep_keys" in self.stages:
            out["dropped_by_keep_keys"] = self.stages["keep_keys"].stats()["dropped"]
        out["prefetch"] = self.prefetch
        if "lockstep" in self.stages:
            out["dropped_unequal"] = self.stages["lockstep"].stats()["dropped_unequal"]
        if self.comm.world_size > 1:
            out["rank"], out["world_size"] = self.comm.rank, self.comm.world_size
        if isinstance(score.learner, Actor):
            out["score_lag_steps"] = 0  # trained and scored in order, in one thread
        elif score.learner is not None:  # (a sync made here is pushed at every batch: staleness 0)
            out["score_lag_steps"] = self.prefetch + (self.sync.staleness if self.sync is not None else 0)
        if self.sync is not None:
            out["sync"] = self.sync.stats()
        if "actor" in self.stages:
            out.update(self.stages["actor"].actor.stats())
        if score.count_flops:
            actor, training = self.stages.get("actor"), self.stages.get("training_flops")
            if training is not None:
                train_forward = training.ledger.per_sample.get("train")
            else:  # the learner's scoring forward is its training forward
                learner = isinstance(score.learner, nn.Module | WeightSync)
                train_forward = score.ledger.per_sample.get("learner") if learner else None
            out.update(ledger_stats(score.ledger, actor and actor.ledger, train_forward, out["kept"]))
            if actor is not None and "learner" in out["flops_per_sample"]:
                out["flops_per_sample"]["actor"] = out["flops_per_sample"].pop("learner")
        return out


def pipeline(
    source: Iterable | BaseNode,
    *,
    batch_size: int,
    learner=None,
    reference=None,
    scorer=None,
    rule: str | Rule = "learnability",
    method: str = "joint",
    filter_ratio: float = 0.8,
    superbatch_size: int | None = None,
    n_chunks: int = 16,
    temperature: float = 1.0,
    shuffle_buffer: int = 1024,
    collate: Callable | None = None,
    micro_batch_size: int = 1024,
    drop_last: bool = False,
    seed: int = 0,
    prefetch: int = 0,
    score_transform: Callable[[dict], dict] | None = None,
    train_model: nn.Module | None = None,
    count_flops: bool = True,
    keep_keys: Iterable[str] | str | PathLike | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    selection_scope: str = "local",
    rank_split: str = "auto",
) -> Pipeline:
    """Curated training batches from any iterable of samples.

    Args:
        source: a torch DataLoader (of samples or batches), a webdataset pipeline, any iterable of
            sample dicts, or a torchdata node.
        batch_size: training batch size b: samples kept per superbatch.
        learner: the model being trained, scored live (no grad, eval mode); a `curate.WeightSync` of it
            (scores from a snapshot pushed after optimizer steps); a `curate.Actor` (ACL: a small proxy
            trained here on every selected batch, after selection, and scoring instead of the learner);
            or any `ScoreProvider`.
        reference, scorer, rule: see `curate.Score`.
        method: "joint" (JEST), "sample" or "topk" (RHO-LOSS); see `curate.JointSelect`.
        filter_ratio: fraction of the data filtered out; the superbatch is B = round(b / (1 − f)).
            0 keeps everything (a pass-through, e.g. for a uniform baseline).
        superbatch_size: set B directly instead of through filter_ratio (must exceed batch_size).
        n_chunks, temperature: JEST sampler knobs; see `curate.JointSelect`.
        shuffle_buffer: samples in the seeded shuffle buffer before superbatching; 0 disables it (when
            the source is already shuffled).
        collate: list of samples → batch, for superbatches; default torch's default_collate.
        micro_batch_size: samples per scoring forward pass.
        drop_last: drop a short final superbatch instead of selecting the same fraction of it.
        seed: seeds the shuffle and the selection (per epoch and per superbatch).
        keep_keys: train only on samples with these keys: an iterable of keys or the path of a Parquet key
            list (`curate.curation.write_keys`, `curate curate-set`); what it drops is in `stats()`.
        prefetch: 1 prepares superbatch n+1 (load, score, select, train the actor) in a background thread
            while the loop trains on batch n; 0 does it all in the loop's thread. The live learner cannot
            be read while the optimizer rewrites it, so with prefetch=1 the learner is scored from a
            `WeightSync` snapshot: the one passed as learner= (its pushes wait for the scoring in flight),
            or one made here from an nn.Module learner (a copy of the model, pushed at every batch).
            Either way superbatch n+1 is scored with the weights before step n, one step staler than
            live scoring (`stats()["score_lag_steps"]`). An Actor is trained and scored in the thread in
            order, so it is exactly as fresh as without prefetch.
        score_transform: applied to superbatches before scoring only, e.g. downsampled images for
            cheaper scoring (Flexi-JEST); see `curate.Score`. Its saving shows in the FLOP ledger.
        train_model: the model trained on the batches, for the FLOP ledger's training FLOPs. Default: the
            learner (a WeightSync's copy); needed with an Actor or a ScoreProvider learner.
        count_flops: keep the FLOP ledger (one measured forward per model; see `Pipeline.stats`).
        rank, world_size: this process's place in a multi-process job; default from torch.distributed if it
            is initialised, else the RANK / WORLD_SIZE environment (torchrun), else 0 of 1. With more than one
            rank: the data is split by rank (see `rank_split`), ranks are kept in step (every rank yields the
            same number of batches per epoch; only full superbatches are used, the rest is counted in
            `stats()["dropped_unequal"]`), and `batch_size` / `superbatch_size` are per rank. A learner wrapped
            in DistributedDataParallel is scored through its `.module`.
        selection_scope: "local": each rank selects b of its own superbatch of B. "global": every rank selects
            the same world·b of the world·B samples of all ranks' superbatches (the decision a single process
            makes over the concatenated superbatch) and trains on its own b of them (JEST at scale). Needs an
            initialised torch.distributed.
        rank_split: "auto": a `curate.distributed.Shards` source (or a DataLoader over one) splits by shard, a
            DataLoader with a DistributedSampler is taken as split, anything else is split by sample index
            (every world_size-th sample). "none": the source already yields only this rank's data.
    """
    if method not in METHODS:
        raise ValueError(f"pipeline: unknown method {method!r}; valid methods are {list(METHODS)}")
    if superbatch_size is None:
        superbatch_size = superbatch_size_for(batch_size, filter_ratio)
    elif not isinstance(superbatch_size, int) or superbatch_size <= batch_size:
        raise ValueError(f"pipeline: superbatch_size must be an int larger than batch_size, got "
                         f"{superbatch_size=} {batch_size=}; use filter_ratio=0 to keep everything")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"pipeline: batch_size must be a positive int, got {batch_size=}")
    if prefetch not in (0, 1):
        raise ValueError(f"pipeline: prefetch must be 0 or 1, got {prefetch=}; each further superbatch "
                         "prepared ahead would be scored with weights one more step stale")
    if rule == "uniform" and method == "topk":
        raise ValueError("pipeline: rule='uniform' with method='topk' would keep the first samples of every "
                         "superbatch; use method='sample'")

    rank, world_size = resolve_world(rank, world_size)
    if selection_scope not in SCOPES:
        raise ValueError(f"pipeline: selection_scope must be one of {list(SCOPES)}, got {selection_scope=}")
    if rank_split not in ("auto", "none"):
        raise ValueError(f"pipeline: rank_split must be 'auto' or 'none', got {rank_split=}")
    shards = shards_of(source)
    if shards is not None and (shards.rank, shards.world_size) != (rank, world_size):
        raise ValueError(f"pipeline: the source {shards!r} is split for rank {shards.rank} of {shards.world_size} but "
                         f"the pipeline runs as rank {rank} of {world_size}; give both the same rank= and world_size=")
    learner, train_model = _unwrap_ddp(learner), _unwrap_ddp(train_model)
    comm = Comm.create(rank, world_size, need_group=selection_scope == "global")
    rule_name = rule if isinstance(rule, str) else getattr(rule, "__name__", type(rule).__name__)
    comm.check_same("pipeline configuration", {  # a rank with other options would silently train differently
        "batch_size": batch_size, "superbatch_size": superbatch_size, "method": method, "n_chunks": n_chunks,
        "temperature": temperature, "seed": seed, "rule": rule_name, "selection_scope": selection_scope,
        "shuffle_buffer": shuffle_buffer, "prefetch": prefetch, "drop_last": drop_last})

    node = as_node(source)
    stages: dict[str, BaseNode] = {"source": node}
    if world_size > 1 and rank_split == "auto" and not already_split(source):
        node = stages["rank_split"] = RankSplit(node, rank, world_size)
    if keep_keys is not None:
        if isinstance(keep_keys, str | PathLike):
            from .curation import read_keys

            keep_keys = read_keys(keep_keys)
        node = stages["keep_keys"] = KeepKeys(node, keep_keys)
    if shuffle_buffer > 1:
        node = stages["shuffle"] = Shuffle(node, shuffle_buffer, seed=seed)
    node = stages["superbatch"] = Superbatch(node, superbatch_size, collate=collate, drop_last=drop_last)
    if comm.group is not None:
        node = stages["lockstep"] = Lockstep(node, superbatch_size, comm)
    node = stages["score"] = Score(node, learner, reference, scorer, rule, micro_batch_size=micro_batch_size,
                                   score_transform=score_transform, count_flops=count_flops)
    sync = stages["score"].learner if isinstance(stages["score"].learner, WeightSync) else None
    if prefetch and isinstance(stages["score"].learner, nn.Module):
        sync = stages["score"].learner = WeightSync(learner)  # pushed by Prefetch at every hand-out
    if selection_scope == "global" and world_size > 1:
        node = stages["select"] = GlobalSelect(node, batch_size, method, superbatch_size=superbatch_size, comm=comm,
                                               n_chunks=n_chunks, temperature=temperature, seed=seed)
    else:
        node = stages["select"] = JointSelect(node, batch_size, method, n_chunks=min(n_chunks, batch_size),
                                              temperature=temperature, seed=seed, superbatch_size=superbatch_size)
    if isinstance(stages["score"].learner, Actor):
        node = stages["actor"] = TrainActor(node, learner, scorer, count_flops=count_flops)
    if prefetch:
        node = stages["prefetch"] = Prefetch(node, sync, push_sync=sync is not None and sync is not learner)
    trained = train_model  # measured apart only when its forward is not the learner's scoring forward
    if trained is None and score_transform is not None and isinstance(learner, nn.Module | WeightSync):
        trained = learner.module if isinstance(learner, WeightSync) else learner
    if count_flops and trained is not None and scorer is not None:
        # a cheaper scoring pass (e.g. patch dropout) exposes the full forward as `scorer.full`
        full = getattr(scorer, "full", scorer)
        node = stages["training_flops"] = TrainingFlops(node, trained, full, micro_batch_size)
    return Pipeline(node, stages, sync=sync, prefetch=prefetch, learner=learner, comm=comm)


def _unwrap_ddp(model):
    """Score (and measure) the module inside DistributedDataParallel: its forward would synchronise buffers
    across ranks, a collective the pipeline (maybe in a prefetch thread) must not start."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model

