"""`curate.pipeline`: wrap any dataloader in shuffle → superbatch → score → select (→ train actor) (→ prefetch).

`pipeline()` only chooses and connects stages; everything it returns can be built by hand from the public
stages and wrapped in `Pipeline`, with the same batches, state and stats. Under torch DDP (world size > 1) the
chain also splits the data by rank, keeps ranks in step and can select over the global superbatch; see
`curate.distributed`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from os import PathLike

import torch
from torch import nn
from torchdata.nodes import BaseNode, Loader
from torchdata.nodes.loader import LoaderIterator

from . import lengths
from .actor import TrainActor
from .distributed import SCOPES, Comm, GlobalScope, Lockstep, RankSplit, already_split, resolve_world, shards_of
from .flops import TrainingFlops
from .joint_select import METHODS, JointSelect
from .learner import LearnerSide, resolve_learner, unwrap_ddp
from .nodes import KeepKeys, Shuffle, Superbatch, ToDevice, as_node
from .prefetch import Prefetch
from .rules import Rule, RuleFn, as_rule
from .score import Score
from .scorers import Scorer
from .stage import Stage, chain, chain_stats, local_stats, stage_name

__all__ = ["Pipeline", "pipeline", "superbatch_size_for"]

log = logging.getLogger("curate.pipeline")


def superbatch_size_for(batch_size: int, filter_ratio: float) -> int:
    """B such that keeping `batch_size` of B filters out `filter_ratio` of the data: round(b / (1 − f))."""
    if not 0 <= filter_ratio < 1:
        raise ValueError(f"pipeline: filter_ratio must be in [0, 1), got {filter_ratio=}; "
                         "0.8 keeps 1 sample in 5")
    return round(batch_size / (1 - filter_ratio))


class Pipeline(Loader):
    """An iterable of training batches over a chain of stages (what `curate.pipeline` returns), with
    `state_dict()` / `load_state_dict()` (resume mid-epoch to exactly the same stream) and `stats()`.
    Each `iter()` is one epoch.

    Args:
        root: the last node of the chain (its batches are what the pipeline yields).
        comm: this rank's place in a DDP job, for `global_stats()` and the `rank` / `world_size` stats.
        output: batch → what the loop receives (e.g. a tuple of fields); applied after the chain, so state and
            resume are the chain's.
        config: the options the chain was built with; its hash goes into the state, and a state saved under
            other options is refused. Default: the chain's stage types.
        batches_per_epoch: batches per epoch on this rank, when known (`len()`); see `curate.lengths`.

    A state knows where it came from: `state_dict()["curate"]` holds the rank, the world size and the
    configuration hash, and `load_state_dict` refuses a state of another rank, world size or configuration,
    naming both (after a DDP resume a rank would otherwise train on another rank's stream: duplicate data).
    """

    STATE_KEY = "curate"
    read_ahead = 0  # batches the consuming loop fetches before it trains the last one (Lightning's, unsized: 1)
    _it: _EpochIterator | None  # torchdata's Loader's (untyped: torchdata ships no type information)
    _next_iter_state_dict: dict | None
    _iter_for_state_dict: bool

    def __init__(self, root: BaseNode, comm: Comm | None = None, *, output: Callable | None = None,
                 config: dict | None = None, batches_per_epoch: int | None = None):
        super().__init__(root)
        self.comm = comm or Comm(0, 1)
        self.chain = chain(root)
        self.output = output
        given = config if config is not None else {"stages": [stage_name(node) for node in self.chain]}
        self.config = json.loads(json.dumps(given, sort_keys=True, default=str))  # plain values, as a state holds
        self.batches_per_epoch = batches_per_epoch
        self._closed = False
        for node in self.chain:
            if isinstance(node, Score):  # one superbatch per batch: a warmup counts the epochs set_epoch skips
                node.superbatches_per_epoch = batches_per_epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank (what frameworks size progress bars and schedules by); a TypeError when
        the source does not know its length (`batches_per_epoch` is then None)."""
        if self.batches_per_epoch is None:
            raise TypeError("Pipeline: the number of batches per epoch is not known: the source has no len() (an "
                            "iterable dataset, a generator) or keep_keys drops an unknown number; give a source with "
                            "a length, or pass batches_per_epoch= to curate.pipeline")
        return self.batches_per_epoch

    def state_dict(self) -> dict:
        """The chain's state (positions, RNG states; no samples) and where it came from (rank, world size, config)."""
        identity = {"rank": self.comm.rank, "world_size": self.comm.world_size, "config": self.config}
        return {**super().state_dict(), self.STATE_KEY: identity}

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from `state_dict`: the next `iter()` continues its epoch exactly. Refuses a state of another
        rank, world size or configuration (see the class doc)."""
        state = dict(state_dict)
        identity = state.pop(self.STATE_KEY, None)  # None: saved before states knew their rank
        if identity is not None:
            if (identity["rank"], identity["world_size"]) != (self.comm.rank, self.comm.world_size):
                raise ValueError(
                    f"Pipeline.load_state_dict: the state is rank {identity['rank']} of {identity['world_size']}'s, "
                    f"this pipeline is rank {self.comm.rank} of {self.comm.world_size}; load each rank's own state "
                    "(curate.save_state / curate.load_state keep one file per rank)")
            saved = identity["config"]
            differ = [f"{key}: saved {saved.get(key)!r}, here {self.config.get(key)!r}"
                      for key in sorted(set(saved) | set(self.config)) if saved.get(key) != self.config.get(key)]
            if differ:
                raise ValueError(f"Pipeline.load_state_dict: the state was saved by a pipeline with other options "
                                 f"({'; '.join(differ)}); build the pipeline with the options it was saved with")
        super().load_state_dict(state)

    def __iter__(self):
        """One epoch. After `load_state_dict`, the rest of the checkpoint's epoch: nothing when it was taken after
        the epoch's last batch (the loop's `for` then ends that epoch, as it would have), the next epoch when it was
        taken after the epoch's StopIteration. (torchdata's Loader goes on into the next epoch in both cases, which
        shifts the loop's epoch count by one.)"""
        if self._closed:
            raise RuntimeError("Pipeline: iterated after close() (or after its `with` block): its background thread, "
                               "DataLoader workers and process group are stopped; build a new pipeline to go on")
        it = self._epoch()
        return it if self.output is None else _Output(it, self.output)

    def _epoch(self) -> _EpochIterator:
        if self._it is None:
            self._it = _EpochIterator(self)
        elif self._iter_for_state_dict:  # made by state_dict() before any iter(): this is that epoch
            self._iter_for_state_dict = False
            return self._it
        state, self._next_iter_state_dict = self._next_iter_state_dict, None
        if state is None:
            self._it.reset(None)
            return self._it
        self._it.reset(state)
        if _EpochIterator.STOPPED_KEY in state:
            if state[_EpochIterator.STOPPED_KEY]:
                self._it.reset(None)
        elif not self._it.has_next():  # a state saved before curate kept the flag: torchdata's behaviour
            self._it.reset(None)
        return self._it

    def set_epoch(self, epoch: int) -> None:
        """The next `iter()` is epoch `epoch`: the source (and its `set_epoch`, when it has one) and every random stage
        draw epoch `epoch`'s randomness, as an uninterrupted run would (open_clip calls this before each epoch,
        also when it resumes). After `load_state_dict`, `epoch` must be the loaded state's (the rest of it is
        iterated) or the one after it, when nothing of that is left; anything else is an error."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Pipeline.set_epoch: epoch must be an int >= 0, got {epoch!r}")
        state = self._next_iter_state_dict
        if state is not None and _EpochIterator.EPOCH_KEY in state:
            at, stopped = state[_EpochIterator.EPOCH_KEY], state[_EpochIterator.STOPPED_KEY]
            if epoch == at + stopped:
                return  # the loaded state continues into exactly that epoch
            if epoch == at + 1 and self._loaded_epoch_is_over():
                self._next_iter_state_dict = None  # the loaded state is at its epoch's end: start the next afresh
            else:
                raise ValueError(
                    f"Pipeline.set_epoch({epoch}): the loaded state is {'after the end of' if stopped else 'in'} "
                    f"epoch {at}, so the next epoch it can give is {at + stopped}; pass the epoch of the "
                    "checkpoint (or load the checkpoint of the epoch you resume)")
        self.wait_background()  # its thread may be in the middle of an upstream next(): let it finish
        for node in self.chain:
            if isinstance(node, Stage):
                node.set_epoch(epoch)
        self._iter_for_state_dict = False  # an iterator made for state_dict() started the old epoch: restart it
        if self._it is None:
            self._it = _EpochIterator(self)
        self._it.epoch = epoch - 1  # the next reset(None) advances it to `epoch`

    def _loaded_epoch_is_over(self) -> bool:
        """Whether the loaded state has no item left in its epoch (it restores the chain there to look: it stays
        restored, as the next iter() would restore it, and the epoch after it is then a fresh reset)."""
        state = self._next_iter_state_dict
        if self._it is None:
            self._it = _EpochIterator(self)
        self._it.reset(state)
        if self._it.has_next():
            self._next_iter_state_dict = state  # restored again at iter(): the item looked at is not lost
            return False
        return True

    @property
    def stages(self) -> dict[str, BaseNode]:
        """The chain's nodes by type name ("source", "shuffle", "score", "joint_select", "prefetch", ...)."""
        return {stage_name(node): node for node in self.chain}

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    def stats(self) -> dict:
        """What the stages counted so far, merged over the chain (`curate.stage.chain_stats`).

        Selection: `superbatches`, `seen` / `kept` samples, `kept_fraction`, `score_mean`, `kept_score_mean`,
        the last superbatch's `score_quantiles`; `score_seconds` spent scoring; `dropped_tail` (a short last
        superbatch with drop_last=True), `dropped_by_keep_keys`, `dropped_unequal` (DDP: another rank ran out).

        Learner side: `prefetch`; `score_lag_steps`, the optimizer steps between the weights that scored
        the batches now being selected and the weights they train (prefetch + the WeightSync's staleness + the
        loop's own `read_ahead`: 1 under Lightning with an unsized pipeline, set by
        `curate.integrations.lightning`);
        `sync` (the WeightSync's counters); `actor_*` (ACL actor updates and training loss).

        FLOP ledger (`curate.flops`): `flops_per_sample` (forward FLOPs per sample of each model, measured
        on its first batch), `scoring_flops`, `actor_training_flops`, `training_flops` (3 × forward of the
        trained model per sample trained on; None when no trained model is known), `flops_overhead`
        ((scoring + actor training) / training) and `break_even_step_saving` (1 + overhead: selection
        saves compute only if it needs fewer steps than uniform training by more than this factor).

        With prefetch, selection counts include the superbatch being prepared in the background.
        Under DDP these are this rank's (`global_stats()` totals them), plus `rank`, `world_size` and
        `rank_split` (who splits the data by rank: "source", or the pipeline's every-W-th-sample split).
        """
        out = self._with_read_ahead(chain_stats(self.chain))
        if self.comm.world_size > 1:
            out["rank"], out["world_size"] = self.comm.rank, self.comm.world_size
            out["rank_split"] = _rank_split(self.chain)
        return out

    def close(self) -> None:
        """Stop what the chain runs in the background (a prefetch thread, then DataLoader workers) now and, in a
        job of several ranks, release the process group the pipeline made; the pipeline cannot be iterated
        afterwards (`stats()` still reads its counts; `global_stats()` needs the group: call it before). Also on
        leaving `with curate.pipeline(...) as batches:`. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        for node in reversed(self.chain):
            close = getattr(node, "close", None)
            if callable(close):
                close()
        self._it = None  # torchdata's Loader and its iterator refer to each other: a cycle only the GC would free
        # last, once the prefetch thread's collective in flight has finished (above); destroying is local to
        # this rank, no collective
        self.comm.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_background(self) -> None:
        """Block until the superbatch being prepared in the background (`prefetch`) is ready; it is kept for the next
        batch. Under DDP its thread may be in a collective on the pipeline's group, so every collective made on
        that group from the loop's thread (`global_stats()`, a framework gathering the ranks' states) waits for it
        first: two collectives in flight on one group would pair up wrongly across ranks."""
        for node in self.chain:
            if isinstance(node, Prefetch):
                node.wait()

    def global_stats(self) -> dict:
        """`stats()` totalled over all ranks, each figure merged as its stage declares (counts and FLOPs summed,
        seconds the slowest rank's, snapshots rank 0's), so rank 0 can report the job's FLOP ledger. A
        collective: every rank must call it at the same point. With one process (or ranks not kept in step)
        it is `stats()`."""
        if self._closed:
            raise RuntimeError("Pipeline.global_stats: the pipeline was closed (close(), or the end of its `with` "
                               "block), which released its process group; call global_stats() before closing")
        if self.comm.group is None:
            return self.stats()
        self.wait_background()
        out = self._with_read_ahead(chain_stats(self.chain, self.comm.gather_object(local_stats(self.chain))))
        out["world_size"] = self.comm.world_size
        return out

    def _with_read_ahead(self, out: dict) -> dict:
        """A batch the loop fetched ahead was selected one more optimizer step before it trains."""
        if "score_lag_steps" in out:
            out["score_lag_steps"] += self.read_ahead
        return out


def _rank_split(nodes) -> str:
    """Who splits the data by rank: this pipeline (RankSplit: every W-th sample) or the source itself."""
    return "pipeline: every world_size-th sample" if any(isinstance(n, RankSplit) for n in nodes) else "source"


class _Output:
    """An epoch's iterator with `output` applied to each batch on the way out (outside the chain: the iterator's
    look-ahead and state see the batches as the chain made them)."""

    def __init__(self, it: _EpochIterator, output: Callable):
        self.it, self.output = it, output

    def __iter__(self) -> _Output:
        return self

    def __next__(self):
        return self.output(next(self.it))


def output_of(fields: Sequence[str] | None, output: Sequence[str] | Callable | None) -> Callable | None:
    """`pipeline`'s `fields=` (keep these fields of each batch) and `output=` (a tuple of fields, or a function of
    the batch) as one function of the batch, or None when the batch goes out as it is."""
    for name, value in (("fields", fields), ("output", output)):
        if isinstance(value, str):
            raise TypeError(f"pipeline: {name}= takes a sequence of field names, got the string {value!r}; "
                            f"write {name}=({value!r},)")
    keep = tuple(fields) if fields is not None else None
    if output is not None and not callable(output):
        names = tuple(output)
        if not names:
            raise ValueError("pipeline: output= names no field; give e.g. output=('image', 'text')")
    else:
        names = None

    def out(batch: dict):
        if keep is not None:
            batch = {name: _field(batch, name, "fields") for name in keep}
        if names is not None:
            return tuple(_field(batch, name, "output") for name in names)
        return batch if output is None else output(batch)  # type: ignore[operator]

    return None if keep is None and output is None else out


def _field(batch: dict, name: str, option: str):
    try:
        return batch[name]
    except KeyError:
        raise KeyError(f"pipeline: {option}= names {name!r}, which the batches do not have; their fields are "
                       f"{sorted(batch)}") from None


class _EpochIterator(LoaderIterator):
    """torchdata's LoaderIterator that also keeps, in its state, the epoch it is in and whether that epoch ended (its
    StopIteration was raised), so a checkpoint after the last batch and one after the StopIteration resume apart."""

    EPOCH_KEY = "epoch"
    STOPPED_KEY = "stopped"

    def __init__(self, loader: Loader):
        super().__init__(loader)
        self.epoch, self.stopped = -1, False

    def reset(self, initial_state: dict | None = None):
        try:
            super().reset(initial_state)
        except KeyError as error:  # a stage's state lacks what the stage saves: another chain saved it
            raise ValueError(
                f"Pipeline.load_state_dict: the state does not fit this pipeline (a stage's state has no {error}): "
                "it was saved by a pipeline with other options or stages (shuffle_buffer, prefetch, method...); "
                "build the pipeline with the options it was saved with"
            ) from error
        if initial_state is None:
            self.epoch, self.stopped = self.epoch + 1, False
        else:  # a state saved before these keys: epoch unknown (-1: no set_epoch check), not stopped
            self.epoch = initial_state.get(self.EPOCH_KEY, -1)
            self.stopped = initial_state.get(self.STOPPED_KEY, False)

    def next(self):
        try:
            return super().next()
        except StopIteration:
            self.stopped = True
            raise

    def get_state(self) -> dict:
        return {**super().get_state(), self.EPOCH_KEY: self.epoch, self.STOPPED_KEY: self.stopped}


def pipeline(
    source: Iterable | BaseNode,
    *,
    batch_size: int,
    learner=None,
    reference=None,
    scorer: Scorer | None = None,
    rule: str | Rule | RuleFn = "learnability",
    method: str = "joint",
    filter_ratio: float = 0.8,
    superbatch_size: int | None = None,
    n_chunks: int = 16,
    temperature: float = 1.0,
    uniform_share: float = 0.0,
    selection_warmup: int = 0,
    shuffle_buffer: int = 1024,
    collate: Callable | None = None,
    micro_batch_size: int = 1024,
    drop_last: bool = False,
    seed: int = 0,
    prefetch: int = 0,
    score_transform: Callable[[dict], dict] | None = None,
    train_model: nn.Module | None = None,
    train_scorer: Scorer | None = None,
    count_flops: bool = True,
    keep_keys: Iterable[str] | str | PathLike | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    selection_scope: str = "local",
    rank_split: str = "auto",
    device: torch.device | str | None = None,
    timeout: float | None = None,
    fields: Sequence[str] | None = None,
    output: Sequence[str] | Callable | None = None,
    batches_per_epoch: int | None = None,
) -> Pipeline:
    """Curated training batches from any iterable of samples.

    Args:
        source: a torch DataLoader (of samples or batches), a webdataset pipeline, any iterable of
            sample dicts, or a torchdata node.
        batch_size: training batch size b: samples kept per superbatch.
        learner: the model being trained, scored live (no grad, eval mode); a `curate.WeightSync` of it
            (scores from a snapshot pushed after optimizer steps); a `curate.Actor` (ACL: a small proxy
            trained here on every selected batch, after selection, and scoring instead of the learner);
            any `ScoreProvider`; or a `curate.resolve_learner(...)` result. A learner wrapped in
            DistributedDataParallel is scored through its `.module`.
        reference, scorer, rule: see `curate.Score`.
        method: "joint" (JEST), "sample" or "topk" (RHO-LOSS); see `curate.JointSelect`.
        filter_ratio: fraction of the data filtered out; the superbatch is B = round(b / (1 − f)).
            0 keeps everything (a pass-through, e.g. for a uniform baseline).
        superbatch_size: set B directly instead of through filter_ratio (must exceed batch_size).
        n_chunks, temperature: JEST sampler knobs; see `curate.JointSelect`.
        uniform_share: this share of each batch drawn uniformly from the superbatch, the rest selected
            (conditioned on them); 0, the default, is the published methods. See `curate.JointSelect`.
        selection_warmup: the first N batches of the run (per rank, counted over epochs and resumes) are drawn
            uniformly from their superbatches, with nothing scored (no scoring FLOPs); selection starts at batch N.
            A fresh pipeline given `set_epoch(e)` (open_clip's resume) counts e epochs of `len()` batches as done.
            0, the default, is the published methods, which select from the first step. What a small learner
            learns first decides whether selection stalls it on a feature uniform learns; a warmup changes that in
            either direction (benchmarks/README.md, section 1e: a third of the budget freed most stalled runs on
            one world and halved selection's gain on another). Try it where curated runs stall and uniform does not.
        shuffle_buffer: samples per seeded shuffle block (`curate.Shuffle`), rounded up to whole superbatches. A
            block mixes samples across the superbatches it spans, so a buffer of at most one superbatch does
            nothing (selection is over the superbatch's set; its order never matters) and no shuffle runs. 0
            disables it: when the source is already shuffled, e.g. a DataLoader with shuffle=True, the fast way.
        collate: list of samples → batch, for a source that yields samples; default torch's default_collate. A
            source that yields batches (a DataLoader with a batch size: collation in its workers, the fast way)
            is never split into samples.
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
            learner (a WeightSync's learner); needed with an Actor or a ScoreProvider learner.
        train_scorer: runs the training forward the ledger measures, when it is not `scorer`'s (e.g. a scorer
            that drops image patches to score cheaply: Flexi-JEST). Default: `scorer`.
        count_flops: keep the FLOP ledger (one measured forward per model; see `Pipeline.stats`).
        rank, world_size: this process's place in a multi-process job; default from torch.distributed if it
            is initialised, else the RANK / WORLD_SIZE environment (torchrun), else 0 of 1. With more than one
            rank: the data is split by rank (see `rank_split`), ranks are kept in step (every rank yields the
            same number of batches per epoch; only full superbatches are used, the rest is counted in
            `stats()["dropped_unequal"]`), and `batch_size` / `superbatch_size` are per rank.
        selection_scope: "local": each rank selects b of its own superbatch of B. "global": every rank selects
            the same world·b of the world·B samples of all ranks' superbatches (the decision a single process
            makes over the concatenated superbatch) and trains on its own b of them (JEST at scale). Needs an
            initialised torch.distributed.
        device: where superbatches are scored and selected and the kept batches handed out: each superbatch is
            moved there once (pinned, non_blocking; `curate.ToDevice`), and with prefetch=1 on CUDA the background
            work runs on its own stream. Default: the learner's device (its scoring copy's); "cpu" (or a learner
            on the CPU, or none) keeps batches where the source made them.
        rank_split: "auto": a `curate.distributed.Shards` source (or a DataLoader over one) splits by shard; a
            DataLoader with a DistributedSampler, a webdataset pipeline with `split_by_node` and an HF
            IterableDataset from `split_dataset_by_node` are taken as split; anything else is split by sample
            index (every world_size-th sample; logged, and `stats()["rank_split"]` says which). "none": the
            source already yields only this rank's data.
        timeout: seconds the pipeline's collectives wait for the other ranks before every rank fails with
            `curate.distributed.RankStalledError` (default: the default process group's timeout).
        fields: keep only these fields of each batch (e.g. what `model(**batch)` takes); `__key__` too only if
            listed. Applied as batches leave the pipeline, so state, resume and stats are unchanged.
        output: what the loop receives: a tuple of fields (`("image", "text")` gives `(images, texts)`, as
            open_clip's training loop unpacks) or a function of the batch.
        batches_per_epoch: this rank's batches per epoch (`len(pipeline)`), for a source that cannot say.
            Default: counted from the source's length when it has one (`curate.lengths`), else unknown.
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
    if not isinstance(selection_warmup, int) or selection_warmup < 0:
        raise ValueError(f"pipeline: selection_warmup must be a non-negative int (batches drawn uniformly before "
                         f"selection starts), got {selection_warmup=}")
    if prefetch not in (0, 1):
        raise ValueError(f"pipeline: prefetch must be 0 or 1, got {prefetch=}; each further superbatch "
                         "prepared ahead would be scored with weights one more step stale")
    rule = as_rule(rule, learner=learner is not None, reference=reference is not None)
    if method == "topk" and not rule.uses_models:
        raise ValueError(f"pipeline: rule={rule.name!r} reads no model, so method='topk' would keep the first "
                         "samples of every superbatch; use method='sample'")

    rank, world_size = resolve_world(rank, world_size)
    if selection_scope not in SCOPES:
        raise ValueError(f"pipeline: selection_scope must be one of {list(SCOPES)}, got {selection_scope=}")
    if rank_split not in ("auto", "none"):
        raise ValueError(f"pipeline: rank_split must be 'auto' or 'none', got {rank_split=}")
    shards = shards_of(source)
    if shards is not None and (shards.rank, shards.world_size) != (rank, world_size):
        raise ValueError(f"pipeline: the source {shards!r} is split for rank {shards.rank} of {shards.world_size} but "
                         f"the pipeline runs as rank {rank} of {world_size}; give both the same rank= and world_size=")
    comm = Comm.create(rank, world_size, need_group=selection_scope == "global", timeout=timeout)
    options = {"batch_size": batch_size, "superbatch_size": superbatch_size, "method": method, "n_chunks": n_chunks,
               "temperature": temperature, "seed": seed, "rule": rule.name, "selection_scope": selection_scope,
               "shuffle_buffer": shuffle_buffer, "prefetch": prefetch, "drop_last": drop_last}
    if uniform_share:  # only when set: states saved before the knob existed carry no such key, and still load
        options["uniform_share"] = uniform_share
    if selection_warmup:
        options["selection_warmup"] = selection_warmup
    comm.check_same("pipeline configuration", options)  # a rank with other options would silently train differently
    output_of(fields, output)  # bad fields= / output= fail here, before any work
    side = (resolve_learner(learner, prefetch=prefetch, train_model=train_model, train_scorer=train_scorer)
            if rule.uses_learner and learner is not None else None)  # (Score names a missing learner)

    device = _resolve_device(device, side)
    node = as_node(source, collate=collate)
    split_here = world_size > 1 and rank_split == "auto" and not already_split(source)
    if split_here:
        node = RankSplit(node, rank, world_size)
        if comm.group is not None:  # a source split in a way curate does not recognise would now be split twice
            log.info("pipeline: rank %d of %d reads every %d-th sample of the source (RankSplit); if the source "
                     "already yields only this rank's data, pass rank_split='none'", rank, world_size, world_size)
    if keep_keys is not None:
        if isinstance(keep_keys, str | PathLike):
            from .curation import read_keys

            keep_keys = read_keys(keep_keys)
        node = KeepKeys(node, keep_keys)
    block = -(-shuffle_buffer // superbatch_size) * superbatch_size  # whole superbatches: each is a view of a block
    if shuffle_buffer > 1 and block > superbatch_size:  # a block of one superbatch would only reorder its samples,
        node = Shuffle(node, block, seed=seed)  # which changes nothing: selection is over the set (and a full copy)
    node = Superbatch(node, superbatch_size, drop_last=drop_last)
    if comm.group is not None:
        node = Lockstep(node, superbatch_size, comm)
    if device.type != "cpu":
        node = ToDevice(node, device)
    node = score = Score(node, side, reference, scorer, rule, micro_batch_size=micro_batch_size,
                         score_transform=score_transform, count_flops=count_flops, warmup=selection_warmup)
    scope = GlobalScope(comm) if selection_scope == "global" and world_size > 1 else None
    node = JointSelect(node, batch_size, method, n_chunks=n_chunks, temperature=temperature, seed=seed,
                       superbatch_size=superbatch_size, scope=scope, uniform_share=uniform_share)
    if side is not None and side.actor is not None:
        assert scorer is not None, "Score requires a scorer when the rule reads the learner"
        node = TrainActor(node, side.actor, scorer, count_flops=count_flops)
    if prefetch:
        sync = None if side is None else side.sync
        node = Prefetch(node, sync, push_sync=side is not None and side.owns_sync, device=device)
    trained = side.trained if side is not None else unwrap_ddp(train_model)
    if count_flops and not score.measures_training_forward and trained is not None and scorer is not None:
        node = TrainingFlops(node, trained, train_scorer or scorer, micro_batch_size)
    if batches_per_epoch is None and keep_keys is None:  # a key filter drops a number known only by reading
        batches_per_epoch = lengths.batches_per_epoch(
            lengths.source_samples(source), superbatch_size, rank=rank, world_size=world_size,
            split_here=split_here, lockstep=comm.group is not None, drop_last=drop_last)
    if comm.group is not None:  # in step, every rank yields the fewest rank's full superbatches; a
        # source split unevenly before curate gives each rank its own count here (and a warmup counted from it
        # would mark a superbatch unscored on one rank and scored on another)
        counts = comm.gather_object(batches_per_epoch)
        batches_per_epoch = None if None in counts else min(counts)
    config = {**options, "stages": [stage_name(n) for n in chain(node)]}
    return Pipeline(node, comm, output=output_of(fields, output), config=config, batches_per_epoch=batches_per_epoch)


def _resolve_device(device: torch.device | str | None, side: LearnerSide | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return (side.device if side is not None else None) or torch.device("cpu")
