"""Data-movement stages: Source, KeepKeys, Shuffle, Superbatch, Unbatch, Batch.

Between stages the data flows as collated batches (dicts of per-sample tensors or lists, `__key__` a list), never
sample by sample: a loader's batches go through as they are, stages work on whole batches with tensor ops (a
shuffle is one permutation per block), and only `Unbatch` yields single samples. Each is a `curate.stage.Stage`:
`source` (the upstream node) comes first, `get_state()` captures everything needed to resume the exact stream, and
`reset(state)` restores it. States hold positions and RNG states, never samples, so a checkpoint stays small
whatever the sample size. Random stages keep an epoch counter so every epoch draws fresh, seeded randomness
(`curate.seeding`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, cast

import torch
from torch.utils.data import DataLoader, RandomSampler, default_collate
from torchdata.nodes import BaseNode

from .batch import BatchDict, Sample, batch_size_of, concat_batches, is_batch, slice_batch, take
from .seeding import derive_seed, make_generator
from .stage import Counter, Stage

__all__ = ["Batch", "KeepKeys", "Shuffle", "Source", "Superbatch", "ToDevice", "Unbatch", "as_node"]

T = TypeVar("T")


class _Stateful(Protocol):
    """An iterable with its own resumable state (torchdata's StatefulDataLoader); `Source._stateful` checks for it."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


class Source(Stage[BatchDict]):
    """Any iterable as a checkpointable node of collated batches (dicts of tensors/lists, `__key__` a list).

    Accepts a torch DataLoader (yielding collated batches or samples), a webdataset pipeline, a list, or any
    re-iterable. Batches pass through as they come, never split (a DataLoader with `batch_size` collates in its
    workers); samples are collated `group_size` at a time with `collate`.

    Args:
        iterable: re-iterable source; `iter()` is called once per epoch.
        batched: whether items are collated batches. None: a DataLoader with a batch size yields batches;
            otherwise an item is a batch when its `__key__` is a list.
        collate: list of samples → batch, for a source of samples; default `torch.utils.data.default_collate`.
        group_size: samples collated per batch, for a source of samples.

    State: the epoch, how many items were consumed and the DataLoader generator's state at the epoch start; no
    samples. Resume fast-forwards a fresh iterator (re-reading what was consumed) unless the iterable has its
    own `state_dict()` (torchdata's StatefulDataLoader, HF datasets' IterableDataset, `curate.Shards`), which then
    resumes in O(1). A shuffling DataLoader resumes exactly only with a seeded `generator=`; its generator state is
    saved at every epoch start.

    Epochs: at the start of epoch e, `set_epoch(e)` is called on the iterable when it has one (HF IterableDataset,
    webdataset's shard samplers) and, for a DataLoader, on its dataset and samplers that have one (a
    DistributedSampler); a DataLoader's generator draws epoch 0 as given and epoch e > 0 from a seed derived from
    its seed and e, so any epoch can be started directly (`Pipeline.set_epoch`, open_clip's resume).
    """

    def __init__(self, iterable: Iterable, *, batched: bool | None = None, collate: Callable | None = None,
                 group_size: int = 256):
        super().__init__(None)
        if not hasattr(iterable, "__iter__"):
            raise TypeError(f"Source: expected an iterable of samples or batches, got {type(iterable).__name__}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"Source: group_size must be a positive int, got {group_size=}")
        self.iterable = iterable
        self.batched = batched
        if batched is None and isinstance(iterable, DataLoader):
            self.batched = iterable.batch_size is not None or iterable.batch_sampler is not None
        self.collate, self.group_size = collate or default_collate, group_size
        self._stateful = hasattr(iterable, "state_dict") and hasattr(iterable, "load_state_dict")
        self._generator = _loader_generator(iterable)
        # epoch 0 draws from the generator as it is now; epoch e > 0 from a seed derived from (its seed, e): a
        # generator left to advance holds epoch e's order only after e passes, so set_epoch(e) could not start it
        self._generator_start = None if self._generator is None else (
            self._generator.get_state(), self._generator.initial_seed())
        self._passes = 0  # iter() calls on the iterable: a one-shot iterator is empty from the second on
        self._epoch = -1

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self._items, self._ended, self._one_shot = 0, False, False
        if initial_state is None:
            self._epoch += 1
            self._seed_generator()
            self._set_iterable_epoch()
            self._rng_state = None if self._generator is None else self._generator.get_state()
            self._it = self._iter()
            return
        self._epoch, self._rng_state = initial_state["epoch"], initial_state["rng"]
        if self._generator is not None:
            self._generator.set_state(self._rng_state)
        self._set_iterable_epoch()  # before its own state is loaded: HF's applies to the epoch it was saved in only
        if initial_state["ended"]:  # the epoch's iterator ran out: nothing is left of it, and the next reset starts a
            # fresh one, as it would have without the checkpoint (the generator is where that epoch left it)
            self._items, self._ended, self._it = initial_state["items"], True, iter(())
            return
        if self._stateful:
            cast(_Stateful, self.iterable).load_state_dict(initial_state["iterable"])
            self._it = self._iter()
            self._items = initial_state["items"]
            return
        self._it = self._iter()
        for _ in range(initial_state["items"]):  # fast-forward: the iterable has no state of its own
            try:
                next(self._it)
            except StopIteration:
                raise ValueError(
                    f"Source: cannot resume: the iterable ended after {self._items} items but the state "
                    f"says {initial_state['items']} were consumed; is it the same data?"
                ) from None
            self._items += 1

    def _seed_generator(self) -> None:
        if self._generator is None or self._generator_start is None:
            return
        state, seed = self._generator_start
        if self._epoch == 0:
            self._generator.set_state(state)
        else:
            self._generator.manual_seed(derive_seed(seed, "source", self._epoch))

    def _set_iterable_epoch(self) -> None:
        for target in _epoch_targets(self.iterable):
            target.set_epoch(self._epoch)

    def _iter(self):
        self._passes += 1
        it = iter(self.iterable)
        self._one_shot = it is self.iterable and self._passes > 1  # iter(x) is x: what it had is spent
        return it

    def _is_batch(self, item) -> bool:
        return self.batched if self.batched is not None else is_batch(item)

    def next(self) -> BatchDict:
        samples: list[Sample] = []
        while len(samples) < self.group_size:
            try:
                item = next(self._it)
            except StopIteration:
                self._ended = True
                if samples:
                    break
                if self._one_shot and self._items == 0:
                    raise TypeError(
                        f"Source: the {type(self.iterable).__name__} source is a one-shot iterator (iter() of it is "
                        "itself), spent by the first epoch, so this epoch would be empty; pass a re-iterable: a "
                        "list, a Dataset / DataLoader, or an object whose __iter__ makes a new generator each time"
                    ) from None
                raise
            self._items += 1
            if not self._is_batch(item):
                samples.append(item)
                continue
            if samples:
                raise ValueError("Source: the iterable yields both samples and collated batches; yield one kind")
            if not isinstance(item, dict):
                raise TypeError(f"Source: a batch must be a dict of per-sample fields, got {type(item).__name__}. "
                                f"{_SHAPE}")
            if "__key__" in item:
                _check_keys(item["__key__"])
            if batch_size_of(item):
                return item
        bad = next((s for s in samples if not isinstance(s, dict)), None)
        if bad is not None:
            raise TypeError(f"Source: samples must be dicts of fields, got {type(bad).__name__}. {_SHAPE}")
        if "__key__" in samples[0]:
            _check_keys([s.get("__key__") for s in samples])
        return self.collate(samples)

    def close(self) -> None:
        """Shut down the iterator's DataLoader workers now (the garbage collector may take seconds to get to them)."""
        shutdown = getattr(getattr(self, "_it", None), "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if isinstance(self.iterable, DataLoader) and self.iterable.persistent_workers:
            self.iterable._iterator = None  # its workers are gone: the next epoch starts new ones
        self._it = iter(())

    def get_state(self) -> dict:
        if self._ended:  # resuming creates no iterator for this epoch, so it needs the generator as it is now
            rng = None if self._generator is None else self._generator.get_state()
            return {"epoch": self._epoch, "items": self._items, "rng": rng, "ended": True}
        state: dict[str, Any] = {"epoch": self._epoch, "items": self._items, "rng": self._rng_state, "ended": False}
        if self._stateful:
            state["iterable"] = cast(_Stateful, self.iterable).state_dict()
        return state


_SHAPE = ("curate reads samples as dicts of fields with a string '__key__' (webdataset's shape), e.g. "
          "{'__key__': '000042', 'image': tensor, 'label': 3}, or collated batches of them; for a dataset of "
          "(input, target) tuples, return {'__key__': str(index), 'image': input, 'label': target} from its "
          "__getitem__ (or map the tuples to such dicts)")


def _check_keys(keys) -> None:
    """Keys are strings: they name samples in caches and key lists, and collation keeps a list of str a list (an int
    key would come out as a tensor, and a DataLoader's collated int keys already are one)."""
    if isinstance(keys, list | tuple):
        bad = next((k for k in keys if not isinstance(k, str)), None)
        if bad is None:
            return
        got = f"{type(bad).__name__} {bad!r}"
    else:
        got = f"{type(keys).__name__} (a DataLoader's collated non-str keys)"
    raise TypeError(f"Source: __key__ must be a str for every sample, got {got:.80}; make keys strings in the dataset, "
                    "e.g. {'__key__': f'{i:08d}', ...}")


def _epoch_targets(iterable) -> list:
    """What has a `set_epoch` to call at an epoch start: the iterable, or a DataLoader's dataset and samplers."""
    candidates = [iterable]
    if isinstance(iterable, DataLoader):
        batch_sampler = iterable.batch_sampler
        candidates += [iterable.dataset, iterable.sampler, batch_sampler, getattr(batch_sampler, "sampler", None)]
    targets: list = []
    for candidate in candidates:
        if callable(getattr(candidate, "set_epoch", None)) and all(candidate is not t for t in targets):
            targets.append(candidate)
    return targets


def _loader_generator(iterable) -> torch.Generator | None:
    if not isinstance(iterable, DataLoader):
        return None
    if iterable.generator is None and isinstance(iterable.sampler, RandomSampler):
        warnings.warn(
            "Source: this DataLoader shuffles with the global RNG, so a resumed pipeline will not replay "
            "the same order; pass generator=torch.Generator().manual_seed(...) to the DataLoader",
            stacklevel=3,
        )
    return iterable.generator


def as_node(source: Iterable | BaseNode, **source_options) -> BaseNode:
    """A BaseNode as is; anything else iterable wrapped in `Source(source, **source_options)`."""
    return source if isinstance(source, BaseNode) else Source(source, **source_options)


class KeepKeys(Stage[BatchDict]):
    """Passes only the rows of each batch whose `__key__` is in `keys` (e.g. a curated key list from
    `curate.curation`).

    Args:
        source: upstream node of batches.
        keys: the keys to keep (any iterable of str).

    What it drops is counted (`dropped_by_keep_keys`), never silently lost; a batch without `__key__` is an
    error, since it cannot be matched.
    """

    counters = {"dropped_by_keep_keys": Counter()}

    def __init__(self, source: BaseNode, keys: Iterable[str]):
        super().__init__(source)
        self.keys = frozenset(keys)

    def next(self) -> BatchDict:
        while True:
            batch = next(self.source)
            if "__key__" not in batch:
                raise ValueError(f"KeepKeys: a batch has no '__key__' (fields {sorted(batch)}); key lists "
                                 "match samples by __key__, so give every sample one")
            keep = [i for i, key in enumerate(batch["__key__"]) if key in self.keys]
            self.counts["dropped_by_keep_keys"] += len(batch["__key__"]) - len(keep)
            if len(keep) == len(batch["__key__"]):
                return batch
            if keep:
                return take(batch, torch.tensor(keep))


class _Rows(Stage[T]):
    """Base of the stages that read rows from an upstream of batches in amounts of their own choosing.

    The state never holds rows: it is the upstream's state from before the batch this stage is part-way
    through (saved under `SOURCE_KEY`) and how many of its rows are used; resuming re-reads that one batch.
    """

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self._batch: BatchDict | None = None  # the upstream batch being used, from row `_used` of `_size`
        self._used = self._size = 0
        self._before: dict = {}  # the upstream's state before `_batch`
        if initial_state is not None and initial_state["used"]:
            self._before = initial_state[self.SOURCE_KEY]
            self._batch, self._used = next(self.source), initial_state["used"]
            self._size = batch_size_of(self._batch)

    def _read(self, n: int) -> BatchDict | None:
        """The next `n` rows (fewer only at the end of the epoch; None when there are none); a whole upstream batch
        of exactly `n` rows comes back as it is, without a copy."""
        parts = []
        while n:
            if self._batch is None:
                self._before = self.source.state_dict()
                try:
                    self._batch = next(self.source)
                except StopIteration:
                    break
                self._used, self._size = 0, batch_size_of(self._batch)
                if not self._size:
                    self._batch = None
                    continue
            rows = min(n, self._size - self._used)
            whole = rows == self._size
            parts.append(self._batch if whole else slice_batch(self._batch, self._used, self._used + rows))
            self._used, n = self._used + rows, n - rows
            if self._used == self._size:
                self._batch = None
        return concat_batches(parts) if parts else None

    def _source_state(self) -> dict:
        return super()._source_state() if self._batch is None else self._before

    def get_state(self) -> dict:
        return {**super().get_state(), "used": 0 if self._batch is None else self._used}


class Shuffle(_Rows[BatchDict]):
    """Seeded block shuffle: reads `buffer_size` samples at a time and yields them as one batch in a random order.

    Args:
        source: upstream node of batches.
        buffer_size: samples per shuffled block; 0 or 1 passes batches through in order.
        seed: the shuffle of epoch e is seeded by (seed, "shuffle", e).

    One `randperm` per block. The state holds no samples (the upstream's position, the RNG state), so a
    checkpoint is small whatever the sample size and resuming re-reads at most one upstream batch.
    """

    def __init__(self, source: BaseNode, buffer_size: int = 1024, seed: int = 0):
        super().__init__(source)
        if not isinstance(buffer_size, int) or buffer_size < 0:
            raise ValueError(f"Shuffle: buffer_size must be an int >= 0, got {buffer_size=}")
        self.buffer_size, self.seed = buffer_size, seed
        self._epoch = -1

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        if initial_state is None:
            self._epoch += 1
            self._generator = make_generator(self.seed, "shuffle", self._epoch)
            return
        self._epoch = initial_state["epoch"]
        self._generator = torch.Generator()
        self._generator.set_state(initial_state["rng"])

    def next(self) -> BatchDict:
        if self.buffer_size <= 1:
            return next(self.source)
        block = self._read(self.buffer_size)
        if block is None:
            raise StopIteration
        return take(block, torch.randperm(batch_size_of(block), generator=self._generator))

    def get_state(self) -> dict:
        return {**super().get_state(), "epoch": self._epoch, "rng": self._generator.get_state()}


class Superbatch(_Rows[BatchDict]):
    """Cuts the stream of batches into superbatches of `size` samples (a batch of exactly `size` passes through,
    not copied; smaller ones are joined, larger ones sliced).

    Args:
        source: upstream node of batches (a `Source`, `Shuffle`, ...).
        size: samples per superbatch (B).
        drop_last: a short final superbatch (fewer than `size` samples at the end of an epoch) is
            yielded by default (selection then keeps the same fraction of it); True drops it, counted
            in `dropped_tail`.
    """

    counters = {"dropped_tail": Counter()}

    def __init__(self, source: BaseNode, size: int, drop_last: bool = False):
        super().__init__(source)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"Superbatch: size must be a positive int, got {size=}")
        self.size, self.drop_last = size, drop_last

    def next(self) -> BatchDict:
        batch = self._read(self.size)
        if batch is None:
            raise StopIteration
        n = batch_size_of(batch)
        if n < self.size and self.drop_last:
            self.counts["dropped_tail"] += n
            raise StopIteration
        return batch


class Unbatch(_Rows[Sample]):
    """Collated batches in, their samples out, one at a time."""

    def next(self) -> Sample:
        row = self._read(1)
        if row is None:
            raise StopIteration
        return {name: value[0] for name, value in row.items()}


class Batch(_Rows[BatchDict]):
    """Re-batches a stream of batches to `batch_size` samples per batch.

    Args:
        source: upstream node of batches.
        batch_size: samples per batch.
        drop_last: drop a short final batch instead of yielding it.
    """

    def __init__(self, source: BaseNode, batch_size: int, drop_last: bool = False):
        super().__init__(source)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Batch: batch_size must be a positive int, got {batch_size=}")
        self.batch_size, self.drop_last = batch_size, drop_last

    def next(self) -> BatchDict:
        batch = self._read(self.batch_size)
        if batch is None or (self.drop_last and batch_size_of(batch) < self.batch_size):
            raise StopIteration
        return batch


class ToDevice(Stage[BatchDict]):
    """Moves each batch's tensors to `device` once, so both models score it there, selection runs there and the
    kept batch is handed out there (no per-model copies).

    Args:
        source: upstream node of batches (superbatches, in a pipeline).
        device: where the batches go, e.g. "cuda" or torch.device("cuda", local_rank).
        pin_memory: copy CPU tensors into pinned memory first so the copy to a CUDA device is asynchronous
            (non_blocking) and fast; default: when `device` is CUDA. A DataLoader with pin_memory=True pins in
            its own thread; tensors already pinned are not copied again.
    """

    def __init__(self, source: BaseNode, device: torch.device | str, pin_memory: bool | None = None):
        super().__init__(source)
        self.device = torch.device(device)
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory

    def next(self) -> BatchDict:
        batch = next(self.source)
        return {name: self._move(value) if isinstance(value, torch.Tensor) else value for name, value in batch.items()}

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.pin_memory and tensor.device.type == "cpu" and not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=self.pin_memory)
