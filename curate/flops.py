"""The FLOP ledger: does selection pay for itself?

Selection spends forward passes scoring B candidates to train on b of them. The ledger measures each
model's forward FLOPs once, with `torch.utils.flop_counter.FlopCounterMode` on the first call (a
superbatch), scales them per sample, and multiplies by the samples processed since:

* scoring FLOPs: learner (or actor) and reference forwards over every superbatch;
* actor training FLOPs: the ACL actor's forward + backward on every selected batch (measured as run);
* training FLOPs: 3 × the trained model's forward on every kept sample (forward + backward ≈ 3 forwards).

Selection breaks even on compute when it reaches a target in fewer steps than uniform training by a
factor of (training + scoring + actor training) / training (`break_even_step_saving`).

FlopCounterMode counts the ops it has formulas for (matmuls, convolutions, attention; we add the fused
attention ops it lacks), so element-wise work and lookups (a `ScoreCache` reference) count as zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from torchdata.nodes import BaseNode

from .batch import batch_size_of
from .scorers import Scorer, score_model
from .stage import LAST, Stage

__all__ = ["FlopLedger", "TrainingFlops", "count_flops", "forward_flops"]


def _native_mha_flop(query, key, value, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's fused inference op: q, k, v projections, QKᵀ, AV and the output projection."""
    batch, q_len, dim = query
    k_len = key[1]
    return 2 * batch * dim * (dim * (q_len + 2 * k_len) + 2 * q_len * k_len + q_len * dim)


def _sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _formulas() -> dict:
    # Ops torch's counter has no formula for, which would count as zero: nn.MultiheadAttention's fused
    # path (taken in eval mode without grad, i.e. when scoring) and the CPU flash-attention kernel.
    aten = torch.ops.aten
    return {aten._native_multi_head_attention: _native_mha_flop,
            aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flop}


class _TotalOnly:
    """Stands in for FlopCounterMode's module tracker: its per-module breakdown installs *global* module
    hooks, which would also fire in the training thread's forward while a prefetch thread measures."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """`fn()` and the FLOPs torch's FlopCounterMode counted while it ran (this thread only).

    torch's formulas, plus formulas for fused attention ops it lacks (so a ViT scored in eval mode counts
    its attention blocks).
    """
    counter = FlopCounterMode(display=False, custom_mapping=_formulas())
    counter.mod_tracker = _TotalOnly()  # type: ignore[assignment]  # a stand-in for the parts the counter uses
    with counter:
        out = fn()
    return out, counter.get_total_flops()


def forward_flops(model: nn.Module, batch: dict, scorer, micro_batch_size: int = 1024) -> int:
    """FLOPs of one scoring forward of `model` over `batch` (what the ledger measures)."""
    return count_flops(lambda: score_model(model, batch, scorer, micro_batch_size))[1]


class FlopLedger:
    """Per-sample FLOPs of each role (measured on its first call) and the samples each role processed."""

    def __init__(self):
        self.per_sample: dict[str, float] = {}
        self.samples: dict[str, int] = {}

    def measure(self, role: str, n: int, fn: Callable[[], Any]) -> Any:
        """`fn()` over `n` samples, measured: sets the role's per-sample FLOPs (counts no samples)."""
        out, flops = count_flops(fn)
        self.per_sample[role] = flops / n
        self.samples.setdefault(role, 0)
        return out

    def run(self, role: str, n: int, fn: Callable[[], Any]) -> Any:
        """`fn()` over `n` samples, counted for `role`; measured if it is the role's first call."""
        out = fn() if role in self.per_sample else self.measure(role, n, fn)
        self.samples[role] += n
        return out

    def total(self, role: str) -> float:
        return self.per_sample.get(role, 0.0) * self.samples.get(role, 0)

    def state(self) -> dict:
        return {"per_sample": dict(self.per_sample), "samples": dict(self.samples)}

    def load(self, state: dict | None) -> None:
        state = state or {"per_sample": {}, "samples": {}}
        self.per_sample, self.samples = dict(state["per_sample"]), dict(state["samples"])


class TrainingFlops(Stage[dict]):
    """Passes training batches through; on the first one, measures the trained model's forward FLOPs, the
    ledger's "train" entry (training costs 3 × it per sample kept: `Score.derive`).

    Only needed when the learner's scoring forward is not the training forward (an `Actor` or a provider
    scores in the trained model's place, a `score_transform`, a cheaper scoring pass): otherwise `Score`
    reports its measurement. It runs where the training loop runs (last, after any prefetch thread) because it
    forwards the live model (no grad, eval mode, once).

    Args:
        source: node of selected training batches.
        model: the model trained on the batches.
        scorer: runs the training forward (`scorer(model, batch)`): the full forward, not a cheaper scoring one.
        micro_batch_size: samples per measuring forward.
    """

    gauges = {"flops_per_sample": LAST}

    def __init__(self, source: BaseNode, model: nn.Module, scorer: Scorer, micro_batch_size: int = 1024):
        super().__init__(source)
        self.model, self.scorer, self.micro_batch_size = model, scorer, micro_batch_size
        self.ledger = FlopLedger()

    def reset(self, initial_state: dict | None = None):
        super().reset(initial_state)
        if initial_state is not None:
            self.ledger.load(initial_state["ledger"])

    def next(self) -> dict:
        batch = next(self.source)
        if "train" not in self.ledger.per_sample:
            self.ledger.measure("train", batch_size_of(batch),
                                lambda: score_model(self.model, batch, self.scorer, self.micro_batch_size))
        return batch

    def get_state(self) -> dict:
        return {**super().get_state(), "ledger": self.ledger.state()}

    def stats(self) -> dict:
        return {"flops_per_sample": dict(self.ledger.per_sample)}
