"""Curated pipelines under torch DDP: rank-aware sources, ranks kept in step, selection over the global superbatch.

* **Splitting.** `Shards` gives rank r of W the shards i with i % W == r, split again by DataLoader worker:
  each rank reads only its own data. Any other iterable is split by sample index (`RankSplit`: every W-th
  sample), which is correct for any stream but makes every rank read all of it.
* **Lockstep.** Ranks must run the same number of steps or DDP hangs. Counts are rarely known up front
  (streams, key lists, unequal shards), so every superbatch the ranks all-gather a (have a full superbatch,
  step) pair and stop together as soon as any rank runs out; what the others hold then is dropped and
  counted (`stats()["dropped_unequal"]`). One call per rank per step can never hang, and a rank that
  has no data at all fails every rank at the first step, naming it.
* **Global selection** (`selection_scope="global"`). Each rank scores its own superbatch (B samples); the
  scores are all-gathered (per-example losses, or the embeddings of both models for contrastive losses:
  O(W·B·d) once per step, small next to the joint sampler's O(W·B·b) pair work, and exact: contrastive
  per-example losses and the softmax sampler need the global negatives). Every rank then runs the same
  seeded selection of W·b of the W·B candidates, so every rank makes the same decision, identical to a
  single process selecting over the concatenated superbatch. Rank r trains on positions [r·b, (r+1)·b)
  of the selected list; the rows it needs are fetched from the ranks holding them with one all_to_all.
* The pipeline's collectives run on a process group of its own (gloo, CPU tensors), so a prefetch thread
  never interleaves with DDP's gradient all-reduces on the default group.
* Learner side: the pipeline scores a DDP model's `.module` (DDP's forward would broadcast buffers, a
  collective); a `WeightSync` must wrap the module too. DDP keeps the ranks' weights equal, so all score
  alike; an ACL `Actor` is trained per rank on that rank's batches and is not synchronised.
"""

from __future__ import annotations

import os
import pickle
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data.distributed import DistributedSampler
from torchdata.nodes import BaseNode

from .batch import batch_size_of, take
from .joint_select import Share
from .score import ScoredSuperbatch
from .scorers import ModelScores
from .stage import Counter, Stage

__all__ = ["Comm", "GlobalScope", "Lockstep", "RankSplit", "RankStalledError", "SCOPES", "Shards", "already_split",
           "default_timeout", "local_sizes", "peer_failure", "resolve_world", "shards_of", "stalled_error",
           "stalled_ranks"]

SCOPES = ("local", "global")


def resolve_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): as given, else from torch.distributed if initialised, else RANK / WORLD_SIZE, else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"distributed: give both rank= and world_size=, or neither, got {rank=} {world_size=}")
    if rank is None:
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            try:
                rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            except ValueError:
                raise ValueError(f"distributed: RANK={os.environ.get('RANK')!r} WORLD_SIZE="
                                 f"{os.environ.get('WORLD_SIZE')!r} are not integers; launch with torchrun") from None
    if not (isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < world_size):
        raise ValueError(f"distributed: need integers 0 <= rank < world_size, got {rank=} {world_size=}")
    return rank, world_size


class RankStalledError(RuntimeError):
    """A collective of the pipeline timed out or lost a peer: a rank stalled, stopped or died."""


def default_timeout() -> float | None:
    """Seconds the default process group's collectives wait (init_process_group's timeout), if torch tells."""
    try:
        group = dist.distributed_c10d._get_default_group()
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
        return group._get_backend(device).options._timeout.total_seconds()
    except Exception:  # private API: without it the pipeline's group gets torch's default
        return None


def stalled_ranks(rank: int, world_size: int, *, wait: float = 3.0) -> list[int] | None:
    """After a collective failed: the ranks that did not report themselves alive within `wait` seconds.

    gloo's timeout names no peer, so every rank whose collective failed marks itself alive in the job's store
    (torchrun's agent serves it, so a stopped rank cannot block it) and looks for the others' marks; the ranks
    without one are the ones still stuck. None when the store cannot be reached.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        # short: the job is failing anyway, and a store that rank 0 hosts (no torchrun) may be the stalled one
        store.set_timeout(timedelta(seconds=wait))
        prefix = f"curate/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store.set(f"{prefix}{rank}", "1")
        deadline = time.monotonic() + wait
        while True:
            missing = [r for r in range(world_size) if not store.check([f"{prefix}{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)
    except Exception:  # private API, or the store went with the failure: the rank stays unnamed
        return None


def peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that timed out or lost its peer (rather than a bug in what was sent)."""
    if isinstance(error, RankStalledError):
        return False
    if isinstance(error, getattr(dist, "DistBackendError", ())):
        return True
    return isinstance(error, RuntimeError | OSError) and bool(_PEER_FAILURE.search(str(error)))


# what gloo / NCCL say when a peer stalls or dies (not "timeout" alone: curate's S3 errors mention timeouts)
_PEER_FAILURE = re.compile(r"timed out waiting|connection (closed|reset) by peer|broken pipe|gloo|nccl|watchdog",
                           re.IGNORECASE)


def stalled_error(error: BaseException, what: str, rank: int, world_size: int,
                  timeout: float | None) -> RankStalledError:
    """The error a rank raises when `what` (a collective) failed on a peer: which rank stalled and what to do."""
    message = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    missing = stalled_ranks(rank, world_size)
    who = (f"rank(s) {missing}" if missing else "another rank") if missing is not None else "another rank"
    waited = f"within {timeout:g} s" if timeout is not None else "within the process group's timeout"
    return RankStalledError(
        f"distributed: rank {rank} of {world_size}: {who} did not answer the {what} {waited} (stalled, stopped or "
        f"dead: see its log); every rank stops rather than wait. If ranks legitimately take longer between steps, "
        f"raise the timeout: curate.pipeline(timeout=...) or the recipe's distributed.timeout_s "
        f"({type(error).__name__}: {message})")


def local_sizes(batch_size: int, superbatch_size: int, world_size: int) -> tuple[int, int]:
    """Per-rank (b, B) of a global batch and superbatch split evenly over `world_size` ranks."""
    for name, n in (("batch_size", batch_size), ("superbatch_size", superbatch_size)):
        if n % world_size:
            raise ValueError(f"distributed: {name}={n} does not divide by world_size={world_size}; every rank takes "
                             f"{name} / world_size samples, so choose sizes that are multiples of {world_size}")
    return batch_size // world_size, superbatch_size // world_size


class Comm:
    """This rank's place in the job and the process group the pipeline talks on (None: ranks not synchronised).

    Build it with `Comm.create`; all collectives are blocking and every rank must make them in the same order.
    """

    def __init__(self, rank: int, world_size: int, group=None, timeout: float | None = None, *,
                 owns_group: bool = False):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.timeout = timeout  # seconds a collective waits for the other ranks (None: the group's, unknown)
        self.owns_group = owns_group  # made by `create`: `close` destroys it; a group passed in is the caller's
        self.closed = False  # its own group destroyed by `close`

    @classmethod
    def create(cls, rank: int, world_size: int, *, need_group: bool = False, timeout: float | None = None) -> Comm:
        """`timeout`: seconds a collective of the pipeline waits for a stalled or dead rank before every rank fails
        (default: the default process group's timeout, as given to init_process_group)."""
        if timeout is not None and not timeout > 0:
            raise ValueError(f"pipeline: timeout must be a positive number of seconds, got {timeout=}")
        if world_size == 1:
            return cls(0, 1)
        if not (dist.is_available() and dist.is_initialized()):
            if need_group:
                raise ValueError("pipeline: selection_scope='global' exchanges scores between ranks; call "
                                 "torch.distributed.init_process_group() before curate.pipeline()")
            warnings.warn(f"pipeline: rank {rank} of {world_size} without an initialised torch.distributed: data is "
                          "split but ranks are not kept in step; call init_process_group() first", stacklevel=3)
            return cls(rank, world_size)
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(f"pipeline: rank={rank} world_size={world_size} but torch.distributed runs this process "
                             f"as rank {dist.get_rank()} of {dist.get_world_size()}; leave them unset to use those")
        seconds = timeout if timeout is not None else default_timeout()
        # new_group would otherwise take torch's 30-minute default, whatever init_process_group was given: a
        # stalled rank then hung the job for half an hour (issue 13)
        group = dist.new_group(backend="gloo", timeout=None if seconds is None else timedelta(seconds=seconds))
        return cls(rank, world_size, group, seconds, owns_group=True)  # collective: every rank builds its pipeline

    def close(self) -> None:
        """Destroy the group `create` made (a local call, no collective): each gloo group holds a socket to every
        other rank, so a job that builds a pipeline per epoch or per run would otherwise run out of file
        descriptors. Call it once nothing is in flight on the group; afterwards this Comm makes no collectives.
        A group passed in is the caller's (it may serve other pipelines, or the job): it stays, and so do its
        collectives."""
        if not self.owns_group or self.closed:
            return
        if dist.is_initialized():
            try:
                dist.destroy_process_group(self.group)
            except ValueError:  # the default group was set up again since: this group went with the old one
                pass
        # gloo frees the group's sockets only with its last reference (its shutdown does nothing), and a closed
        # pipeline may be kept (a list of runs, a framework's loader): drop ours
        self.group = None
        self.closed = True

    def gather_tensor(self, tensor: Tensor) -> Tensor:
        """Every rank's `tensor` (same shape everywhere) concatenated along dim 0 in rank order."""
        local = tensor.detach().contiguous().cpu()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        with self._collective("all_gather"):
            dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts).to(tensor.device)

    def gather_object(self, obj) -> list:
        """Every rank's (picklable) `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        with self._collective("all_gather_object"):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        with self._collective("broadcast"):
            dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def all_to_all(self, objects: list) -> list:
        """objects[q] goes to rank q; returns what each rank sent here (pickled, one all_to_all for all)."""
        payloads = [pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) for obj in objects]
        send_sizes = torch.tensor([len(p) for p in payloads], dtype=torch.int64)
        recv_sizes = torch.empty_like(send_sizes)
        with self._collective("all_to_all"):
            dist.all_to_all_single(recv_sizes, send_sizes, group=self.group)
            send = torch.frombuffer(bytearray(b"".join(payloads)), dtype=torch.uint8)
            recv = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8)
            dist.all_to_all_single(recv, send, recv_sizes.tolist(), send_sizes.tolist(), group=self.group)
        return [pickle.loads(chunk.numpy().tobytes()) for chunk in recv.split(recv_sizes.tolist())]

    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        if self.closed:  # its group is gone; with group=None torch would run the call on the default group
            raise RuntimeError(f"pipeline's {what}: the pipeline was closed (close(), or the end of its `with` "
                               "block), which released its process group; build a new pipeline to go on")
        try:
            yield
        except (RuntimeError, OSError) as error:  # gloo: a RuntimeError on a timeout or a lost peer
            if not peer_failure(error):
                raise
            raise stalled_error(error, f"pipeline's {what}", self.rank, self.world_size, self.timeout) from error

    def check_same(self, what: str, config: dict) -> None:
        """Raise on every rank if `config` (a flat dict) differs across ranks, naming the ranks and the keys."""
        if self.group is None or self.world_size == 1:
            return
        configs = self.gather_object(config)
        differ = [r for r, c in enumerate(configs) if c != configs[0]]
        if differ:
            keys = sorted({k for r in differ for k in configs[0].keys() | configs[r].keys()
                           if configs[r].get(k) != configs[0].get(k)})
            detail = "; ".join(f"{k}: " + ", ".join(f"rank {r}={c.get(k)!r}" for r, c in enumerate(configs))
                               for k in keys[:5])
            raise ValueError(f"distributed: rank(s) {differ} have a different {what} than rank 0 ({detail}); "
                             f"launch every rank with the same {what}")


class Shards(IterableDataset):
    """Shard URLs split across ranks (shard i goes to rank i % world_size) and DataLoader workers, then loaded.

    Pass it to `curate.pipeline` as the source, directly or inside a `DataLoader(shards, batch_size=None,
    num_workers=k)`. Every rank must list the same URLs in the same order.

    Args:
        urls: shard URLs or paths.
        load: list of URLs → iterable of samples, e.g. `functools.partial(pipelines.data.load_pairs,
            storage_options=...)`, or a webdataset pipeline that does not split them again
            (`lambda urls: wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), ...)`).
        rank, world_size: default `resolve_world()`.

    Fewer shards than ranks is an error on every rank at construction: an empty rank would stall the others.

    Resumable in O(1): `state_dict()` is the position of the next sample, (shard, offset) in this process's list,
    so a resumed epoch opens that shard and skips within it only (`curate.Source` saves it; under a torchdata
    `StatefulDataLoader` each worker saves its own). `load` is called once per shard for that reason.
    """

    def __init__(self, urls: Iterable[str], load: Callable[[list[str]], Iterable[dict]], *, rank: int | None = None,
                 world_size: int | None = None):
        urls = [str(u) for u in urls]
        if not callable(load):
            raise TypeError(f"Shards: load must be a function list of URLs -> samples, got {load!r}")
        self.rank, self.world_size = resolve_world(rank, world_size)
        if len(urls) < self.world_size:
            raise ValueError(f"Shards: {len(urls)} shards for {self.world_size} ranks leaves rank(s) "
                             f"{list(range(len(urls), self.world_size))} with no data; run at most {len(urls)} ranks "
                             f"or write the data in at least {self.world_size} shards")
        self.all_urls, self.load = urls, load
        self.urls = urls[self.rank :: self.world_size]
        self._position = (0, 0)  # (shard, offset) of the next sample, in this process's shards
        self._start = (0, 0)  # where the next iter() starts (a loaded state's position, once)

    def _my_urls(self) -> list[str]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:  # each worker reads its own shards of this rank's
            return self.urls[info.id :: info.num_workers]
        return self.urls

    def __iter__(self):
        urls, (shard, offset) = self._my_urls(), self._start
        self._start = (0, 0)
        self._position = (shard, offset)  # now, not when the generator first runs: a state saved before the first
        # sample must point at this epoch's start, not at the end of the last one
        return self._samples(urls, shard, offset)

    def _samples(self, urls: list[str], shard: int, offset: int):
        for i in range(shard, len(urls)):
            samples = iter(self.load([urls[i]]))
            for skipped in range(offset if i == shard else 0):
                if next(samples, None) is None:
                    raise ValueError(f"Shards: cannot resume at sample {offset} of {urls[i]}: it has only {skipped}; "
                                     "did the shard change since the checkpoint?")
            for j, sample in enumerate(samples, start=offset if i == shard else 0):
                self._position = (i, j + 1)
                yield sample
            self._position = (i + 1, 0)

    def state_dict(self) -> dict:
        return {"shard": self._position[0], "offset": self._position[1], "urls": len(self._my_urls())}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict["urls"] != len(self._my_urls()):
            raise ValueError(f"Shards: the state is of a process reading {state_dict['urls']} shards but this one "
                             f"reads {len(self._my_urls())}; resume with the same URLs, ranks and workers")
        self._start = self._position = (state_dict["shard"], state_dict["offset"])

    def __repr__(self) -> str:
        return f"Shards({len(self.urls)} of {len(self.all_urls)} shards, rank {self.rank} of {self.world_size})"


def shards_of(source) -> Shards | None:
    """The `Shards` a source reads (itself, or a DataLoader's dataset), if any."""
    if isinstance(source, Shards):
        return source
    return source.dataset if isinstance(source, DataLoader) and isinstance(source.dataset, Shards) else None


def already_split(source) -> bool:
    """Whether a source is this rank's part already: `Shards`, a DataLoader with a DistributedSampler, a
    webdataset pipeline with `split_by_node` among its stages, or a Hugging Face `IterableDataset` split by
    `datasets.distributed.split_dataset_by_node` (itself, or a DataLoader's dataset). Splitting such a source
    again would leave each rank 1/W of its own part."""
    if shards_of(source) is not None:
        return True
    if isinstance(source, DataLoader):
        samplers = (source.sampler, getattr(source.batch_sampler, "sampler", None))
        if any(isinstance(s, DistributedSampler) for s in samplers):
            return True
        source = source.dataset
    return _webdataset_split(source) or _hf_split(source)


def _webdataset_split(source) -> bool:
    stages = getattr(source, "pipeline", None)  # webdataset's DataPipeline / WebDataset keep their stages here
    return isinstance(stages, list) and any(
        getattr(stage, "__name__", None) == "split_by_node"
        and str(getattr(stage, "__module__", "")).startswith("webdataset") for stage in stages)


def _hf_split(source) -> bool:
    # split_dataset_by_node(IterableDataset) records the node's (rank, world_size) in `_distributed`
    return type(source).__module__.startswith("datasets.") and getattr(source, "_distributed", None) is not None


class RankSplit(Stage[dict]):
    """Rank r of W keeps samples r, r + W, r + 2W, ... of the stream (the fallback for sources without shards).

    Args:
        source: upstream node of batches; every rank must see the same stream.
        rank, world_size: this rank and the number of ranks.
    """

    def __init__(self, source: BaseNode, rank: int, world_size: int):
        super().__init__(source)
        self.rank, self.world_size = rank, world_size

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self._index = 0 if initial_state is None else initial_state["index"]  # rows of the stream seen

    def next(self) -> dict:
        while True:
            batch = next(self.source)
            n, start = batch_size_of(batch), self._index
            self._index += n
            first = (self.rank - start) % self.world_size  # this rank's first row of the batch
            if first < n:
                return take(batch, torch.arange(first, n, self.world_size))

    def get_state(self) -> dict:
        return {**super().get_state(), "index": self._index}


class Lockstep(Stage[dict]):
    """Passes full superbatches while every rank has one; all ranks stop at the same step (see the module doc).

    When the ranks stop, the superbatch each still holds is counted in `stats()["dropped_unequal"]`; the rest
    of a longer rank's epoch is not read (the next epoch starts over).

    Args:
        source: node of collated superbatches.
        size: the full superbatch size; a short last superbatch counts as running out.
        comm: the ranks to keep in step (`Comm` with a group).
    """

    counters = {"dropped_unequal": Counter()}

    def __init__(self, source: BaseNode, size: int, comm: Comm):
        super().__init__(source)
        self.size, self.comm = size, comm
        self._epoch = -1

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        if initial_state is None:
            self._epoch, self._step, self._done = self._epoch + 1, 0, False
        else:
            self._epoch, self._step, self._done = (initial_state[k] for k in ("epoch", "step", "done"))

    def next(self) -> dict:
        if self._done:  # no further collective: the other ranks have stopped too
            raise StopIteration
        try:
            batch = next(self.source)
            n = batch_size_of(batch)
        except StopIteration:
            batch, n = None, 0
        state = self.comm.gather_tensor(torch.tensor([[int(n == self.size), self._epoch, self._step]]))
        if (state[:, 1:] != state[0, 1:]).any():
            raise RuntimeError(f"Lockstep: ranks are at different (epoch, step): {state[:, 1:].tolist()}; resume every "
                               "rank from the pipeline states of the same checkpoint")
        if bool(state[:, 0].all()):
            self._step += 1
            return batch
        self._done = True
        self.counts["dropped_unequal"] += n
        if self._step == 0:
            empty = state[:, 0].logical_not().nonzero().flatten().tolist()
            raise ValueError(f"Lockstep: rank(s) {empty} have fewer than {self.size} samples (one full superbatch) in "
                             f"epoch {self._epoch}, so no rank can train; give every rank more data (more shards than "
                             "ranks) or use a smaller superbatch")
        raise StopIteration

    def get_state(self) -> dict:
        return {**super().get_state(), "epoch": self._epoch, "step": self._step, "done": self._done}


class GlobalScope:
    """`JointSelect(..., scope=GlobalScope(comm))`: one selection over all ranks' superbatches (see the module doc).

    Every rank gathers both models' scores of the global superbatch (rank order), runs the same seeded selection
    of world·b of the world·B candidates, and trains on positions [rank·b, (rank+1)·b) of the selected list, its
    rows fetched from the ranks that hold them. Needs full superbatches on every rank (`Lockstep`).

    Args:
        comm: the ranks (`Comm` with a group).
    """

    def __init__(self, comm: Comm):
        if comm.group is None:
            raise ValueError("GlobalScope: needs a Comm with a process group (Comm.create(..., need_group=True))")
        self.comm = comm
        self.world_size = comm.world_size

    def gather(self, scored: ScoredSuperbatch) -> ScoredSuperbatch:
        return ScoredSuperbatch({}, _gather(scored.learner, self.comm), _gather(scored.reference, self.comm),
                                scored.rule, scored.size * self.world_size, uniform=scored.uniform)

    def share(self, scored: ScoredSuperbatch, idx: Tensor, score: Tensor) -> Share:
        rank, n = self.comm.rank, scored.size
        parts = idx.view(self.world_size, -1)
        batch = _exchange(scored.batch, parts, n, self.comm)
        return Share(batch, score[rank * n : (rank + 1) * n], score[parts[rank]])


def _gather(scores: ModelScores | None, comm: Comm) -> ModelScores | None:
    """One model's scores of the global superbatch (rank order); scale and bias are rank 0's."""
    if scores is None:
        return None
    if not scores.contrastive:
        return ModelScores.of_losses(comm.gather_tensor(scores.loss))
    image, text = scores.image_emb, scores.text_emb
    assert image is not None and text is not None, "contrastive scores are built with image and text embeddings"
    d = image.shape[1]
    both = comm.gather_tensor(torch.cat([image, text], 1))
    scale, bias = comm.gather_tensor(torch.tensor([[scores.scale, scores.bias]], dtype=torch.float64))[0].tolist()
    return ModelScores(scores.kind, both[:, :d], both[:, d:], scale, bias)


def _exchange(batch: dict, parts: Tensor, local_size: int, comm: Comm) -> dict:
    """Rank r's part (parts[r], global indices) of the selection, its rows fetched from the ranks that hold them."""
    owner = parts // local_size
    sends = [take(batch, parts[q][owner[q] == comm.rank] - comm.rank * local_size) for q in range(comm.world_size)]
    sends = [{k: v.cpu() if isinstance(v, Tensor) else v for k, v in send.items()} for send in sends]  # pickled: a
    # CUDA tensor would be unpickled onto the sender's device index
    received = comm.all_to_all(sends)  # from rank o: my rows that o holds, in my part's order
    rows = {name: torch.cat([r[name] for r in received]).to(value.device) if isinstance(value, Tensor)
            else [x for r in received for x in r[name]] for name, value in batch.items()}
    order = torch.argsort(owner[comm.rank], stable=True)  # received rows are grouped by owner
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    return take(rows, position)
