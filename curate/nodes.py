"""Data-movement stages: Source, KeepKeys, Shuffle, Superbatch, Unbatch, Batch.

Each is a `curate.stage.Stage`: `source` (the upstream node) comes first, `get_state()` captures everything
needed to resume the exact stream, and `reset(state)` restores it. Random stages keep an epoch counter so
every epoch draws fresh, seeded randomness (`curate.seeding`).
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

import torch
from torch.utils.data import DataLoader, RandomSampler, default_collate
from torchdata.nodes import BaseNode

from .batch import BatchDict, Sample, split_batch
from .seeding import make_generator
from .stage import Counter, Stage

__all__ = ["Batch", "KeepKeys", "Shuffle", "Source", "Superbatch", "Unbatch", "as_node"]


class _Stateful(Protocol):
    """An iterable with its own resumable state (torchdata's StatefulDataLoader); `Source._stateful` checks for it."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state_dict: dict) -> None: ...


class Source(Stage[Sample]):
    """Any iterable as a checkpointable node of samples (dicts).

    Accepts a torch DataLoader (yielding samples or collated batches), a webdataset pipeline, a list,
    or any re-iterable. Collated batches are split into samples.

    Args:
        iterable: re-iterable source; `iter()` is called once per epoch.
        batched: whether items are collated batches. None: a DataLoader with a batch size yields batches;
            otherwise an item is a batch when its `__key__` is a list.

    Resume fast-forwards a fresh iterator (re-reading what was consumed) unless the iterable has its
    own `state_dict()` (e.g. torchdata's StatefulDataLoader). A shuffling DataLoader resumes exactly
    only with a seeded `generator=`; its generator state is saved at every epoch start.
    """

    _pending: deque[Sample]

    def __init__(self, iterable: Iterable, *, batched: bool | None = None):
        super().__init__(None)
        if not hasattr(iterable, "__iter__"):
            raise TypeError(f"Source: expected an iterable of samples, got {type(iterable).__name__}")
        self.iterable = iterable
        self.batched = batched
        if batched is None and isinstance(iterable, DataLoader):
            self.batched = iterable.batch_size is not None or iterable.batch_sampler is not None
        self._stateful = hasattr(iterable, "state_dict") and hasattr(iterable, "load_state_dict")
        self._generator = _loader_generator(iterable)
        self._epoch = -1

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self._items, self._offset, self._pending = 0, 0, deque()
        if initial_state is None:
            self._epoch += 1
            self._rng_state = None if self._generator is None else self._generator.get_state()
            self._it = iter(self.iterable)
            return
        self._epoch, self._rng_state = initial_state["epoch"], initial_state["rng"]
        if self._generator is not None:
            self._generator.set_state(self._rng_state)
        if self._stateful:
            cast(_Stateful, self.iterable).load_state_dict(initial_state["iterable"])
            self._it = iter(self.iterable)
            self._items, self._offset = initial_state["items"], initial_state["offset"]
            self._pending = deque(initial_state["pending"])
            return
        self._it = iter(self.iterable)
        item = None
        for _ in range(initial_state["items"]):  # fast-forward: the iterable has no state of its own
            try:
                item = next(self._it)
            except StopIteration:
                raise ValueError(
                    f"Source: cannot resume: the iterable ended after {self._items} items but the state "
                    f"says {initial_state['items']} were consumed; is it the same data?"
                ) from None
            self._items += 1
        if item is not None and self._is_batch(item):
            self._offset = initial_state["offset"]
            self._pending = deque(split_batch(item)[self._offset :])

    def _is_batch(self, item) -> bool:
        if self.batched is not None:
            return self.batched
        return isinstance(item, dict) and isinstance(item.get("__key__"), list | tuple)

    def next(self) -> Sample:
        while not self._pending:
            item = next(self._it)
            self._items += 1
            self._offset = 0
            if not self._is_batch(item):
                return item
            self._pending = deque(split_batch(item))
        self._offset += 1
        return self._pending.popleft()

    def get_state(self) -> dict:
        state: dict[str, Any] = {"epoch": self._epoch, "items": self._items, "offset": self._offset,
                                 "rng": self._rng_state}
        if self._stateful:
            state["iterable"] = cast(_Stateful, self.iterable).state_dict()
            state["pending"] = list(self._pending)
        return state


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


def as_node(source: Iterable | BaseNode) -> BaseNode:
    """A BaseNode as is; anything else iterable wrapped in `Source`."""
    return source if isinstance(source, BaseNode) else Source(source)


class KeepKeys(Stage[Sample]):
    """Passes only samples whose `__key__` is in `keys` (e.g. a curated key list from `curate.curation`).

    Args:
        source: upstream node of samples.
        keys: the keys to keep (any iterable of str).

    What it drops is counted (`dropped_by_keep_keys`), never silently lost; a sample without `__key__` is an
    error, since it cannot be matched.
    """

    counters = {"dropped_by_keep_keys": Counter()}

    def __init__(self, source: BaseNode, keys: Iterable[str]):
        super().__init__(source)
        self.keys = frozenset(keys)

    def next(self) -> Sample:
        while True:
            sample = next(self.source)
            if "__key__" not in sample:
                raise ValueError(f"KeepKeys: a sample has no '__key__' (fields {sorted(sample)}); key lists "
                                 "match samples by __key__, so give every sample one")
            if sample["__key__"] in self.keys:
                return sample
            self.counts["dropped_by_keep_keys"] += 1


class Shuffle(Stage[Sample]):
    """Seeded buffer shuffle: keeps `buffer_size` samples and emits a random one as each new one arrives.

    Args:
        source: upstream node of samples.
        buffer_size: samples held; 0 or 1 passes samples through in order.
        seed: the shuffle of epoch e is seeded by (seed, "shuffle", e).

    The state holds the buffered samples themselves (about `buffer_size` samples), so a checkpoint
    resumes exactly without re-reading the source.
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
            self._buffer: list[Sample] = []
            return
        self._epoch = initial_state["epoch"]
        self._generator = torch.Generator()
        self._generator.set_state(initial_state["rng"])
        self._buffer = list(initial_state["buffer"])

    def next(self) -> Sample:
        if self.buffer_size <= 1:
            return next(self.source)
        while len(self._buffer) < self.buffer_size:
            try:
                self._buffer.append(next(self.source))
            except StopIteration:
                break
        if not self._buffer:
            raise StopIteration
        j = int(torch.randint(len(self._buffer), (1,), generator=self._generator))
        self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
        return self._buffer.pop()

    def get_state(self) -> dict:
        return {**super().get_state(), "epoch": self._epoch, "rng": self._generator.get_state(),
                "buffer": list(self._buffer)}


def _collect(source: BaseNode, n: int) -> list[Any]:
    """Up to `n` items of `source` (fewer at the end of an epoch)."""
    items = []
    for _ in range(n):
        try:
            items.append(next(source))
        except StopIteration:
            break
    return items


class Superbatch(Stage[BatchDict]):
    """Collects `size` samples into one collated superbatch (dict of tensors, `__key__` a list).

    Args:
        source: upstream node of samples.
        size: samples per superbatch (B).
        collate: list of samples → batch; default `torch.utils.data.default_collate`.
        drop_last: a short final superbatch (fewer than `size` samples at the end of an epoch) is
            yielded by default (selection then keeps the same fraction of it); True drops it, counted
            in `dropped_tail`.
    """

    counters = {"dropped_tail": Counter()}

    def __init__(self, source: BaseNode, size: int, collate: Callable | None = None, drop_last: bool = False):
        super().__init__(source)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"Superbatch: size must be a positive int, got {size=}")
        self.size, self.drop_last = size, drop_last
        self.collate = collate or default_collate

    def next(self) -> BatchDict:
        samples = _collect(self.source, self.size)
        if not samples:
            raise StopIteration
        if len(samples) < self.size and self.drop_last:
            self.counts["dropped_tail"] += len(samples)
            raise StopIteration
        return self.collate(samples)


class Unbatch(Stage[Sample]):
    """Collated batches in, their samples out, one at a time."""

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        self._pending = deque() if initial_state is None else deque(initial_state["pending"])

    def next(self) -> Sample:
        while not self._pending:
            self._pending = deque(split_batch(next(self.source)))
        return self._pending.popleft()

    def get_state(self) -> dict:
        return {**super().get_state(), "pending": list(self._pending)}


class Batch(Stage[BatchDict]):
    """Samples in, collated batches of `batch_size` out.

    Args:
        source: upstream node of samples.
        batch_size: samples per batch.
        collate: list of samples → batch; default `torch.utils.data.default_collate`.
        drop_last: drop a short final batch instead of yielding it.
    """

    def __init__(self, source: BaseNode, batch_size: int, collate: Callable | None = None, drop_last: bool = False):
        super().__init__(source)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Batch: batch_size must be a positive int, got {batch_size=}")
        self.batch_size, self.drop_last = batch_size, drop_last
        self.collate = collate or default_collate

    def next(self) -> BatchDict:
        samples = _collect(self.source, self.batch_size)
        if not samples or (self.drop_last and len(samples) < self.batch_size):
            raise StopIteration
        return self.collate(samples)
