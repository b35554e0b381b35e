"""The `Stage` base every curate node is built on, and the stats of a chain of them.

A stage is a `torchdata.nodes.BaseNode` whose upstream is `source` (saved under `SOURCE_KEY`) and whose
counters are declared next to the class, each with how it merges (`Merge`): added (`SUM`), the largest
(`MAX`), or a snapshot (`LAST`). The base resets and saves the upstream and the counters, so most stages
only add their own state. `chain_stats` walks a chain from its last node back to its source, merges what
each stage reports (over the chain and, under DDP, over the ranks) by those declarations, then lets each
stage type derive its ratios from the totals. No aggregator knows a stage by name or holds a key list: a new
stage reports by declaring its counters.
"""

from __future__ import annotations

import copy
import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, cast

from torchdata.nodes import BaseNode

__all__ = ["Counter", "LAST", "MAX", "Merge", "SUM", "Stage", "chain", "chain_stats", "local_stats", "stage_name"]

T = TypeVar("T")


class Merge(enum.Enum):
    """How one figure combines across the stages of a chain and across ranks."""

    SUM = "sum"  # counts, FLOPs: added
    MAX = "max"  # e.g. seconds: the slowest rank's
    LAST = "last"  # a snapshot (the last superbatch's quantiles): a later stage's wins within a chain (dicts are
    # merged key by key), rank 0's across ranks


SUM, MAX, LAST = Merge.SUM, Merge.MAX, Merge.LAST


@dataclass(frozen=True)
class Counter:
    """A counter a stage keeps in its state: its starting value and how it merges."""

    merge: Merge = SUM
    initial: Any = 0


class Stage(BaseNode[T], Generic[T]):
    """Base of curate's stages: owns the upstream (`source`), the declared counters and their state.

    Subclasses declare `counters` (persisted in the state under `COUNTS_KEY`, reset at construction only,
    so they run across epochs) and `gauges` (figures computed when `stats()` is called, e.g. from a FLOP
    ledger), implement `next()`, and extend `reset` / `get_state` with their own state when they have any.
    Names starting with "_" are internal: merged like the others, then left out of the pipeline's stats.
    """

    SOURCE_KEY: ClassVar[str] = "source"
    COUNTS_KEY: ClassVar[str] = "counts"
    counters: ClassVar[Mapping[str, Counter]] = {}
    gauges: ClassVar[Mapping[str, Merge]] = {}

    def __init__(self, source: BaseNode | None):
        super().__init__()
        # typed as always there: only a Source, the start of a chain, has none (and never reads it)
        self.source: BaseNode = cast(BaseNode, source)
        self.counts: dict[str, Any] = self._fresh_counts()

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        if self.source is not None:
            self.source.reset(None if initial_state is None else initial_state[self.SOURCE_KEY])
        if initial_state is not None and self.counters:
            # a counter added since the state was saved starts from its initial value
            self.counts = self._fresh_counts() | copy.deepcopy(initial_state[self.COUNTS_KEY])

    def _fresh_counts(self) -> dict[str, Any]:
        return {name: copy.deepcopy(c.initial) for name, c in self.counters.items()}

    def get_state(self) -> dict:
        state: dict[str, Any] = {}
        if self.source is not None:
            state[self.SOURCE_KEY] = self._source_state()
        if self.counters:
            state[self.COUNTS_KEY] = copy.deepcopy(self.counts)  # a snapshot: counting goes on after it
        return state

    def set_epoch(self, epoch: int) -> None:
        """Make the next fresh epoch (`reset(None)`) epoch `epoch`; `Pipeline.set_epoch` calls it on every stage.

        A stage with per-epoch randomness keeps the epoch in progress in `_epoch` (-1 before the first), which
        `reset(None)` advances by one and a state restores: this sets it to the one before `epoch`. A stage that
        keeps its epoch otherwise overrides this."""
        if hasattr(self, "_epoch"):
            self._epoch = epoch - 1

    def _source_state(self) -> dict:
        """The upstream state that `reset` restores: its state now, unless a stage resumes from an earlier one
        (a stage part-way through an upstream batch re-reads it; a prefetch thread may have read ahead)."""
        return self.source.state_dict()

    def stats(self) -> dict:
        """This stage's figures as merged by `chain_stats`: its counters, plus its gauges."""
        return dict(self.counts)

    @classmethod
    def merges(cls) -> dict[str, Merge]:
        return {**{name: counter.merge for name, counter in cls.counters.items()}, **cls.gauges}

    @staticmethod
    def derive(totals: dict) -> dict:
        """Figures derived from the chain's merged totals (ratios, means); they overwrite the totals' keys."""
        return {}


def chain(node: BaseNode) -> list[BaseNode]:
    """The nodes of a chain from its source to `node`, following each node's `source`."""
    nodes = []
    seen: set[int] = set()
    while isinstance(node, BaseNode) and id(node) not in seen:
        nodes.append(node)
        seen.add(id(node))
        node = getattr(node, "source", None)
    return nodes[::-1]


def stage_name(node: BaseNode) -> str:
    """A node's name from its type: `RankSplit` → "rank_split"."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(node).__name__).lower()


def _merge_ranks(merge: Merge, values: list) -> Any:
    if merge is LAST:
        return values[0]
    if any(v is None for v in values):  # a figure some rank cannot know (e.g. training FLOPs): unknown
        return None
    return sum(values) if merge is SUM else max(values)


def _merge_chain(merge: Merge, old: Any, new: Any) -> Any:
    if merge is LAST:
        return {**old, **new} if isinstance(old, dict) and isinstance(new, dict) else new
    if old is None or new is None:
        return None
    return old + new if merge is SUM else max(old, new)


def local_stats(stages: Sequence[BaseNode]) -> list[dict]:
    """What this process's stages report, in chain order: one rank's part of `chain_stats(per_rank=...)`."""
    return [s.stats() for s in stages if isinstance(s, Stage)]


def chain_stats(stages: Sequence[BaseNode], per_rank: Sequence[Sequence[dict]] | None = None) -> dict:
    """The merged stats of a chain (`chain(root)`): every `Stage`'s `stats()`, combined by its declared merges.

    Args:
        stages: the chain's nodes in order; nodes that are not `Stage`s report nothing.
        per_rank: every rank's `[stage.stats() for stage in stages]`, in rank order, to total a DDP job (each
            rank runs the same chain); default this process's.
    """
    reporting = [s for s in stages if isinstance(s, Stage)]
    per_rank = per_rank or [local_stats(stages)]
    totals: dict[str, Any] = {}
    for i, stage in enumerate(reporting):
        declared = stage.merges()
        for name in per_rank[0][i]:
            if name not in declared:
                raise TypeError(f"{type(stage).__name__} reports {name!r} without declaring how it merges; add it to "
                                f"its counters (Counter(SUM | MAX | LAST)) or gauges")
            value = _merge_ranks(declared[name], [rank[i][name] for rank in per_rank])
            totals[name] = _merge_chain(declared[name], totals[name], value) if name in totals else value
    for kind in dict.fromkeys(type(s) for s in reporting):  # each stage type once, in chain order
        totals.update(kind.derive(totals))
    return {name: value for name, value in totals.items() if not name.startswith("_")}
