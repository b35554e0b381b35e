"""The JointSelect stage: keeps `batch_size` of every scored superbatch."""

from __future__ import annotations

import torch
from torch import Tensor
from torchdata.nodes import BaseNode

from .batch import take
from .score import Scored
from .seeding import make_generator
from .selection import SigmoidGain, SoftmaxGain, joint, sample, topk

__all__ = ["JointSelect", "METHODS"]

METHODS = ("topk", "sample", "joint")
_QUANTILES = (0.1, 0.5, 0.9)


class JointSelect(BaseNode):
    """Keeps `batch_size` samples of each scored superbatch and yields them as a collated batch.

    Args:
        source: node of `Scored` superbatches (`Score`).
        batch_size: samples kept per superbatch (b).
        method: "topk" (RHO-LOSS: the b best scores), "sample" (b draws without replacement,
            P ∝ exp(score / temperature)), or "joint" (JEST: chunked sampling from the conditional
            learnability of contrastive pairs; for per-example losses it is the same as "sample").
        n_chunks: JEST chunks per batch, capped at the number kept; chunk sizes differ by at most one
            when b is not divisible by n_chunks.
        temperature: softmax temperature for "sample" and "joint"; 0 is greedy.
        seed: selection in epoch e, superbatch s is seeded by (seed, "select", e, s).
        superbatch_size: the full superbatch size B. A short final superbatch of n samples keeps
            round(n·b/B) (at least 1). Default: the size of the first superbatch seen.
    """

    def __init__(self, source: BaseNode, batch_size: int, method: str = "joint", n_chunks: int = 16,
                 temperature: float = 1.0, seed: int = 0, superbatch_size: int | None = None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"JointSelect: unknown method {method!r}; valid methods are {list(METHODS)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"JointSelect: batch_size must be a positive int, got {batch_size=}")
        if not isinstance(n_chunks, int) or n_chunks < 1:
            raise ValueError(f"JointSelect: n_chunks must be a positive int, got {n_chunks=}")
        if temperature < 0:
            raise ValueError(f"JointSelect: temperature must be >= 0, got {temperature=}")
        if superbatch_size is not None and superbatch_size < batch_size:
            raise ValueError(f"JointSelect: batch_size must be smaller than the superbatch, got {batch_size=} "
                             f"{superbatch_size=}")
        self.source, self.batch_size, self.method = source, batch_size, method
        self.n_chunks, self.temperature, self.seed = n_chunks, temperature, seed
        self.superbatch_size = superbatch_size
        self._epoch = -1
        self.counts = _empty_counts()

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        if initial_state is None:
            self.source.reset(None)
            self._epoch += 1
            self._step = 0
            return
        self.source.reset(initial_state["source"])
        self._epoch, self._step = initial_state["epoch"], initial_state["step"]
        self.counts = dict(initial_state["counts"])

    def _keep(self, n: int) -> int:
        full = self.superbatch_size or self.counts.get("full_size") or n
        self.counts["full_size"] = full
        if n == full and n < self.batch_size:
            raise ValueError(f"JointSelect: batch_size must be smaller than the superbatch, got "
                             f"batch_size={self.batch_size} superbatch size={n}")
        return max(1, round(n * self.batch_size / full))

    def select(self, scored: Scored, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Indices to keep and the per-example logits used (for stats)."""
        k = self._keep(scored.size)
        contrastive = any(s is not None and s.contrastive for s in (scored.learner, scored.reference))
        if self.method == "joint" and contrastive:
            kind = (scored.learner or scored.reference).kind
            if kind == "sigmoid":
                gain = SigmoidGain(scored.learner, scored.reference, scored.rule)
            else:
                gain = SoftmaxGain(scored.learner, scored.reference, scored.rule, *_losses(scored))
            first = gain.first()
            idx = joint(gain, k, n_chunks=min(self.n_chunks, k), temperature=self.temperature, generator=generator)
            return idx, first
        score = scored.score
        if self.method == "topk":
            if scored.learner is None and scored.reference is None:
                raise ValueError("JointSelect: method='topk' with rule='uniform' would keep the first samples; "
                                 "use method='sample' for uniform selection")
            return topk(score, k), score
        return sample(score, k, temperature=self.temperature, generator=generator), score

    def next(self) -> dict:
        scored = next(self.source)
        generator = make_generator(self.seed, "select", self._epoch, self._step)
        self._step += 1
        idx, score = self.select(scored, generator)
        self._record(score.detach().float().cpu(), idx.cpu())
        return take(scored.batch, idx)

    def _record(self, score: Tensor, idx: Tensor) -> None:
        c = self.counts
        c["superbatches"] += 1
        c["seen"] += score.numel()
        c["kept"] += idx.numel()
        c["score_sum"] += float(score.sum())
        c["kept_score_sum"] += float(score[idx].sum())
        c["last_quantiles"] = torch.quantile(score, torch.tensor(_QUANTILES)).tolist()

    def get_state(self) -> dict:
        return {"source": self.source.state_dict(), "epoch": self._epoch, "step": self._step,
                "counts": dict(self.counts)}

    def stats(self) -> dict:
        c = self.counts
        out = {"superbatches": c["superbatches"], "seen": c["seen"], "kept": c["kept"],
               "kept_fraction": c["kept"] / c["seen"] if c["seen"] else 0.0}
        if c["seen"]:
            out["score_mean"] = c["score_sum"] / c["seen"]
            out["kept_score_mean"] = c["kept_score_sum"] / c["kept"]
            out["score_quantiles"] = dict(zip((f"q{int(q * 100)}" for q in _QUANTILES), c["last_quantiles"],
                                              strict=True))
        return out


def _empty_counts() -> dict:
    return {"superbatches": 0, "seen": 0, "kept": 0, "score_sum": 0.0, "kept_score_sum": 0.0, "last_quantiles": []}


def _losses(scored: Scored) -> tuple[Tensor | None, Tensor | None]:
    return (None if scored.learner is None else scored.learner.loss,
            None if scored.reference is None else scored.reference.loss)
