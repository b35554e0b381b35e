"""How long an epoch is, when the source says: the samples a rank reads and the batches a pipeline yields.

Frameworks ask a loader for its length before iterating it (open_clip's `num_batches`, Lightning's progress and
schedulers, Hugging Face Trainer's max_steps). A pipeline yields one batch per superbatch, so its length follows
from the samples its rank reads; this module counts them without reading any data, and says None when the
source does not know (an iterable without `len`, a key filter that drops an unknown number).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import BatchSampler, DataLoader, IterableDataset

from .batch import batch_size_of, is_batch

__all__ = ["batches_per_epoch", "source_samples"]


def source_samples(source) -> int | None:
    """Samples one epoch of `source` yields (per rank, for a source split already), or None if it cannot say.

    A DataLoader: its sampler's length (a DistributedSampler's is this rank's), less the last partial batch when
    it drops it; an IterableDataset's own `len` if it has one. A list or other sequence: its length, or the sum of
    its batches' sizes when its items are collated batches. Anything else with `len`: that length.
    """
    if isinstance(source, DataLoader):
        if isinstance(source.dataset, IterableDataset):
            return _length(source.dataset)
        if source.batch_sampler is None:
            return _length(source.sampler)
        if not isinstance(source.batch_sampler, BatchSampler):  # a custom batch sampler: batch sizes unknown
            return None
        n, size = _length(source.batch_sampler.sampler), source.batch_sampler.batch_size
        if n is None:
            return None
        return n - n % size if source.batch_sampler.drop_last else n
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        if len(source) and is_batch(source[0]):
            return sum(batch_size_of(batch) for batch in source)
        return len(source)
    return _length(source)


def batches_per_epoch(samples: int | None, superbatch_size: int, *, rank: int = 0, world_size: int = 1,
                      split_here: bool = False, lockstep: bool = False, drop_last: bool = False) -> int | None:
    """Batches a pipeline yields per epoch on this rank, from the source's `samples`.

    Args:
        split_here: the pipeline splits the stream by sample index (`RankSplit`): rank r reads samples r, r + W, ...
        lockstep: ranks are kept in step (`Lockstep`): every rank stops when one runs out of full superbatches.
        drop_last: a short last superbatch is dropped.
    """
    if samples is None:
        return None
    mine = len(range(rank, samples, world_size)) if split_here else samples
    if lockstep:
        fewest = len(range(world_size - 1, samples, world_size)) if split_here else mine  # the last rank's share
        return fewest // superbatch_size
    return mine // superbatch_size if drop_last else -(-mine // superbatch_size)


def _length(obj) -> int | None:
    try:
        return len(obj)
    except TypeError:  # no __len__, or one that says it has none (an IterableDataset's default)
        return None
