"""The JointSelect stage: keeps `batch_size` of every scored superbatch, over this rank's candidates or all ranks'.

Where the candidates come from is the stage's `scope`: `LocalScope` (this process's superbatch) or
`curate.distributed.GlobalScope` (every rank's, gathered; the same seeded decision on every rank, each training
on its share). The selection itself is the same code either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch
from torch import Tensor
from torchdata.nodes import BaseNode

from .batch import BatchDict, take
from .score import ScoredSuperbatch
from .seeding import make_generator
from .selection import Gain, SigmoidGain, SoftmaxGain, joint, sample, topk
from .stage import LAST, Counter, Stage

if TYPE_CHECKING:
    from .selection import _Embeddings

__all__ = ["JointSelect", "LocalScope", "METHODS", "Scope", "Share"]

METHODS = ("topk", "sample", "joint")
_QUANTILES = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class Share:
    """This rank's part of a selection.

    Args:
        batch: the rows this rank trains on.
        own: the scores of this rank's candidates.
        kept: the scores of the rows in `batch`.
    """

    batch: BatchDict
    own: Tensor
    kept: Tensor


class Scope(Protocol):
    """Which candidates one selection is over, and which of the selected rows this process trains on."""

    world_size: int

    def gather(self, scored: ScoredSuperbatch) -> ScoredSuperbatch:
        """All candidates of this selection (this rank's superbatch, or every rank's)."""
        ...

    def share(self, scored: ScoredSuperbatch, idx: Tensor, score: Tensor) -> Share:
        """This rank's part of the selection `idx` (indices into `gather(scored)`, whose scores are `score`)."""
        ...


class LocalScope:
    """Each process selects from its own superbatch (the default; one process, or ranks selecting apart)."""

    world_size = 1

    def gather(self, scored: ScoredSuperbatch) -> ScoredSuperbatch:
        return scored

    def share(self, scored: ScoredSuperbatch, idx: Tensor, score: Tensor) -> Share:
        return Share(take(scored.batch, idx), score, score[idx])


class JointSelect(Stage[BatchDict]):
    """Keeps `batch_size` samples of each scored superbatch and yields them as a collated batch.

    Args:
        source: node of `ScoredSuperbatch`es (`Score`).
        batch_size: samples kept per superbatch (b), per rank.
        method: "topk" (RHO-LOSS: the b best scores), "sample" (b draws without replacement,
            P ∝ exp(score / temperature)), or "joint" (JEST: chunked sampling from the conditional
            learnability of contrastive pairs; for per-example losses it is the same as "sample").
        n_chunks: JEST chunks per batch, capped at the number kept; chunk sizes differ by at most one
            when b is not divisible by n_chunks.
        temperature: softmax temperature for "sample" and "joint"; 0 is greedy.
        seed: selection in epoch e, superbatch s is seeded by (seed, "select", e, s).
        superbatch_size: the full superbatch size B, per rank. A short final superbatch of n samples keeps
            round(n·b/B) (at least 1). Default: the size of the first superbatch seen.
        scope: `LocalScope()` (default) or `curate.distributed.GlobalScope(comm)`: select world·b of the
            world·B candidates of all ranks, each rank training on its b.
        uniform_share: round(share·b) of each batch are drawn uniformly from the superbatch and the rest by the
            method, conditioned on them (the joint method's gains count them as an earlier chunk). 0 (default)
            is the published methods. A share keeps every sample's chance of a place above share·b/B and some
            of the stream's own mix (its frequent concepts, its noise) in every batch; on the benchmark's web
            world with a distinct tail a quarter changed no method's mean beyond the seeds' spread
            (benchmarks/README.md, section 1c).

    Counts are this rank's (its B candidates, its b kept), so summing them over ranks gives the job's totals.
    """

    counters = {"superbatches": Counter(), "seen": Counter(), "kept": Counter(), "warmup_batches": Counter(),
                "_warmup_seen": Counter(), "_warmup_kept": Counter(), "_score_sum": Counter(initial=0.0),
                "_kept_score_sum": Counter(initial=0.0), "_last_quantiles": Counter(LAST, []),
                # the sampling distributions' normalised entropy (`sampling_entropy`): the first chunk's and the
                # later chunks' summed over superbatches, and the last superbatch's chunk by chunk
                "_first_entropy_sum": Counter(initial=0.0), "_later_entropy_sum": Counter(initial=0.0),
                "_later_chunks": Counter(), "_last_chunk_entropy": Counter(LAST, [])}

    def __init__(self, source: BaseNode, batch_size: int, method: str = "joint", n_chunks: int = 16,
                 temperature: float = 1.0, seed: int = 0, superbatch_size: int | None = None,
                 scope: Scope | None = None, uniform_share: float = 0.0):
        super().__init__(source)
        if method not in METHODS:
            raise ValueError(f"JointSelect: unknown method {method!r}; valid methods are {list(METHODS)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"JointSelect: batch_size must be a positive int, got {batch_size=}")
        if not isinstance(n_chunks, int) or n_chunks < 1:
            raise ValueError(f"JointSelect: n_chunks must be a positive int, got {n_chunks=}")
        if temperature < 0:
            raise ValueError(f"JointSelect: temperature must be >= 0, got {temperature=}")
        if not 0 <= uniform_share <= 1:
            raise ValueError(f"JointSelect: uniform_share must be in [0, 1], got {uniform_share=}")
        if superbatch_size is not None and superbatch_size < batch_size:
            raise ValueError(f"JointSelect: batch_size must be smaller than the superbatch, got {batch_size=} "
                             f"{superbatch_size=}")
        self.batch_size, self.method = batch_size, method
        self.n_chunks, self.temperature, self.seed = n_chunks, temperature, seed
        self.uniform_share = uniform_share
        self.scope: Scope = scope or LocalScope()
        self._full = superbatch_size
        self._epoch = -1

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        if initial_state is None:
            self._epoch += 1
            self._step = 0
            return
        self._epoch, self._step, self._full = initial_state["epoch"], initial_state["step"], initial_state["full"]

    def _keep(self, n: int) -> int:
        """Samples this rank keeps of its `n` candidates."""
        self._full = self._full or n
        if n == self._full and n < self.batch_size:
            raise ValueError(f"JointSelect: batch_size must be smaller than the superbatch, got "
                             f"batch_size={self.batch_size} superbatch size={n}")
        return max(1, round(n * self.batch_size / self._full))

    def select(self, scored: ScoredSuperbatch, k: int, generator: torch.Generator,
               entropies: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """`k` indices into `scored` and the per-example logits used (for stats); each sampling draw's entropy is
        appended to `entropies` (none for top-k). With a uniform share, each rank's b of them (its slice of the
        k = world·b, `Scope.share`) are round(share·b) uniform picks, then the method's."""
        if scored.uniform:  # the selection warmup: nothing was scored
            return torch.randperm(scored.size, generator=generator)[:k], scored.score
        if self.method == "topk" and scored.learner is None and scored.reference is None:
            raise ValueError(f"JointSelect: method='topk' with rule={scored.rule.name!r}, which reads no model, "
                             "would keep the first samples; use method='sample' for uniform selection")
        gain, score = self._gain(scored)
        ranks = self.scope.world_size
        per_rank = round(self.uniform_share * (k // ranks))
        if not per_rank:
            return self._pick(scored, gain, score, k, generator, entropies, None), score
        given = torch.randperm(scored.size, generator=generator)[:per_rank * ranks]
        rest = k - len(given)
        if not rest:
            return given, score
        picked = self._pick(scored, gain, score, rest, generator, entropies, given).to(given.device)
        # rank r trains on positions [r·b, (r+1)·b): each slice gets its uniform picks, then its selected ones
        return torch.cat([given.view(ranks, -1), picked.view(ranks, -1)], dim=1).flatten(), score

    def _gain(self, scored: ScoredSuperbatch) -> tuple[Gain | None, Tensor]:
        """The joint method's conditional gain over a contrastive superbatch (else None), and the per-example
        logits the method selects by: the gain's first chunk's, or the rule's scores."""
        if not (self.method == "joint" and scored.contrastive):
            return None, scored.score
        some = scored.learner or scored.reference
        assert some is not None, "a contrastive superbatch has the learner's or the reference's scores"
        # contrastive ModelScores hold the embeddings the gains read, which their Optional fields cannot say
        learner = cast("_Embeddings | None", scored.learner)
        reference = cast("_Embeddings | None", scored.reference)
        gain: Gain
        if some.kind == "sigmoid":
            gain = SigmoidGain(learner, reference, scored.rule)
        else:
            losses = (None if s is None else s.loss for s in (scored.learner, scored.reference))
            gain = SoftmaxGain(learner, reference, scored.rule, *losses)
        return gain, gain.first()

    def _pick(self, scored: ScoredSuperbatch, gain: Gain | None, score: Tensor, k: int, generator: torch.Generator,
              entropies: list[Tensor] | None, given: Tensor | None) -> Tensor:
        """`k` indices by the method, none of `given`'s (which the joint method's gains are conditioned on)."""
        if gain is not None:
            return joint(gain, k, n_chunks=min(self.n_chunks, k), temperature=self.temperature, generator=generator,
                         entropies=entropies, given=given)
        candidates = score if given is None else score.float().index_fill(0, given.to(score.device), float("-inf"))
        if self.method == "topk":
            return topk(candidates, k)
        return sample(candidates, k, temperature=self.temperature, generator=generator, entropies=entropies)

    def next(self) -> BatchDict:
        scored = next(self.source)
        k = self.scope.world_size * self._keep(scored.size)
        generator = make_generator(self.seed, "select", self._epoch, self._step)
        self._step += 1
        whole = self.scope.gather(scored)
        entropies: list[Tensor] = []
        idx, score = self.select(whole, k, generator, entropies)
        score = score.detach().float().cpu()
        share = self.scope.share(scored, idx.cpu(), score)
        c = self.counts
        c["superbatches"] += 1
        c["seen"] += scored.size
        c["kept"] += len(share.kept)
        if scored.uniform:  # no scores to summarise
            c["warmup_batches"] += 1
            c["_warmup_seen"] += scored.size
            c["_warmup_kept"] += len(share.kept)
            return share.batch
        c["_score_sum"] += float(share.own.sum())
        c["_kept_score_sum"] += float(share.kept.sum())
        c["_last_quantiles"] = np.quantile(score.numpy(), _QUANTILES).tolist()  # torch.quantile: ~10x the overhead
        if entropies:
            per_chunk = torch.stack(entropies).cpu().tolist()  # one transfer
            c["_first_entropy_sum"] += per_chunk[0]
            c["_later_entropy_sum"] += sum(per_chunk[1:])
            c["_later_chunks"] += len(per_chunk) - 1
            c["_last_chunk_entropy"] = per_chunk
        return share.batch

    def get_state(self) -> dict:
        return {**super().get_state(), "epoch": self._epoch, "step": self._step, "full": self._full}

    @staticmethod
    def derive(totals: dict) -> dict:
        seen, kept = totals["seen"], totals["kept"]
        out = {"kept_fraction": kept / seen if seen else 0.0}
        scored, kept_scored = seen - totals["_warmup_seen"], kept - totals["_warmup_kept"]  # the warmup's had none
        if scored:
            out["score_mean"] = totals["_score_sum"] / scored
            out["kept_score_mean"] = totals["_kept_score_sum"] / kept_scored
            out["score_quantiles"] = dict(zip((f"q{int(q * 100)}" for q in _QUANTILES), totals["_last_quantiles"],
                                              strict=True))
        if totals["_last_chunk_entropy"]:  # a sampled selection (not top-k): how peaked its draws are
            later = totals["_later_chunks"]
            sampled = totals["superbatches"] - totals["warmup_batches"]  # the warmup's draws are not the method's
            out["chunk_entropy"] = {"first": totals["_first_entropy_sum"] / sampled,
                                    "later": totals["_later_entropy_sum"] / later if later else None,
                                    "last_superbatch": totals["_last_chunk_entropy"]}
        return out
