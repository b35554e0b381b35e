"""`curate.pipeline`: wrap any dataloader in shuffle → superbatch → score → select."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from torchdata.nodes import BaseNode, Loader

from .nodes import Shuffle, Superbatch, as_node
from .rules import Rule
from .score import Score
from .select import METHODS, JointSelect

__all__ = ["pipeline", "Pipeline", "superbatch_size_for"]


def superbatch_size_for(batch_size: int, filter_ratio: float) -> int:
    """B such that keeping `batch_size` of B filters out `filter_ratio` of the data: round(b / (1 − f))."""
    if not 0 <= filter_ratio < 1:
        raise ValueError(f"pipeline: filter_ratio must be in [0, 1), got {filter_ratio=}; "
                         "0.8 keeps 1 sample in 5")
    return round(batch_size / (1 - filter_ratio))


class Pipeline(Loader):
    """The iterable `curate.pipeline` returns: training batches, with `state_dict()`, `load_state_dict()`
    (resume mid-epoch to exactly the same stream) and `stats()`. Each `iter()` is one epoch."""

    def __init__(self, root: BaseNode, stages: dict[str, BaseNode]):
        super().__init__(root)
        self.stages = stages

    def stats(self) -> dict:
        """Counts so far: seen / kept samples, score means and the last superbatch's score quantiles,
        seconds spent scoring, and samples dropped as a short last superbatch (drop_last=True)."""
        out = dict(self.stages["select"].stats())
        score = self.stages["score"].stats()
        out["score_seconds"] = score["score_seconds"]
        out["dropped_tail"] = self.stages["superbatch"].stats()["dropped_tail"]
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
) -> Pipeline:
    """Curated training batches from any iterable of samples.

    Args:
        source: a torch DataLoader (of samples or batches), a webdataset pipeline, any iterable of
            sample dicts, or a torchdata node.
        batch_size: training batch size b: samples kept per superbatch.
        learner, reference, scorer, rule: see `curate.Score`.
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
    if rule == "uniform" and method == "topk":
        raise ValueError("pipeline: rule='uniform' with method='topk' would keep the first samples of every "
                         "superbatch; use method='sample'")

    node = as_node(source)
    stages: dict[str, BaseNode] = {"source": node}
    if shuffle_buffer > 1:
        node = stages["shuffle"] = Shuffle(node, shuffle_buffer, seed=seed)
    node = stages["superbatch"] = Superbatch(node, superbatch_size, collate=collate, drop_last=drop_last)
    node = stages["score"] = Score(node, learner, reference, scorer, rule, micro_batch_size=micro_batch_size)
    node = stages["select"] = JointSelect(node, batch_size, method, n_chunks=min(n_chunks, batch_size),
                                          temperature=temperature, seed=seed, superbatch_size=superbatch_size)
    return Pipeline(node, stages)

