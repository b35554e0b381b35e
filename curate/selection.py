"""Selection: which b of a superbatch of B to keep. Pure functions over tensors.

* `topk(scores, b)`: the b highest scores (RHO-LOSS).
* `sample(scores, b, temperature, generator)`: b draws without replacement, P ∝ exp(score / T),
  via Gumbel-top-k (one noise draw per candidate, so it is exact and O(B)).
* `joint(gain, b, n_chunks, ...)`: JEST's chunked joint sampler. Chunk 1 is sampled from the
  per-example (diagonal) learnability; every next chunk from the *conditional* learnability of each
  candidate given the set S already selected, masked against repeats.

The conditional learnability comes from a gain object (`DenseGain` for tests, `SigmoidGain` and
`SoftmaxGain` for real contrastive superbatches). A gain object answers two calls: `first()` gives
the logits for chunk 1 and `add(chunk)` adds a chunk to S and returns the logits for the next one.
`SigmoidGain` never builds the B×B matrix: it keeps a running (B,) gain and updates it from the
B×c blocks of the chunk just added (c = b / n_chunks), so memory is O(B·c) per chunk.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .losses import sigmoid_pair_losses
from .rules import Rule

__all__ = ["DenseGain", "Gain", "SigmoidGain", "SoftmaxGain", "chunk_sizes", "joint", "sample", "topk"]


def topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, highest first."""
    _check_k(k, scores.shape[0])
    return torch.topk(scores.float(), k, sorted=True).indices


def sample(
    scores: Tensor, k: int, *, temperature: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """k indices without replacement, P ∝ softmax(scores / temperature) (Gumbel-top-k).

    `temperature=0` is greedy top-k. Noise comes from `generator` (CPU) so draws are device-independent.
    """
    _check_k(k, scores.shape[0])
    return _gumbel_topk(scores.float(), k, temperature, generator)


def chunk_sizes(k: int, n_chunks: int) -> list[int]:
    """Split k into n_chunks sizes that differ by at most one (larger chunks first)."""
    if not 1 <= n_chunks <= k:
        raise ValueError(f"joint: n_chunks must be in [1, batch size], got {n_chunks=} for {k=}")
    base, extra = divmod(k, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


class Gain(Protocol):
    """Conditional learnability of each candidate given the selected set S."""

    def first(self) -> Tensor:
        """Logits (B,) for the first chunk, S = ∅."""
        ...

    def add(self, chunk: Tensor) -> Tensor:
        """Add `chunk` (indices) to S; return logits (B,) for the next chunk."""
        ...


def joint(
    gain: Gain,
    k: int,
    *,
    n_chunks: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """JEST joint example selection: k indices drawn chunk by chunk from conditional gains.

    Each chunk is a Gumbel-top-k draw from softmax(gain / temperature) over the candidates not yet
    selected. With `n_chunks=1` this is `sample(gain.first(), k)` with the same noise.
    """
    logits = gain.first()
    n = logits.shape[0]
    _check_k(k, n)
    taken = torch.zeros(n, dtype=torch.bool, device=logits.device)
    chunks: list[Tensor] = []
    sizes = chunk_sizes(k, n_chunks)
    for i, size in enumerate(sizes):
        masked = logits.float().masked_fill(taken, float("-inf"))
        chunk = _gumbel_topk(masked, size, temperature, generator)
        taken[chunk] = True
        chunks.append(chunk)
        if i + 1 < len(sizes):
            logits = gain.add(chunk)
    return torch.cat(chunks)


class DenseGain:
    """Conditional gain from an explicit B×B score matrix A (the test reference; O(B²) memory).

    The score of a set is s(S) = Σ_{i,j∈S} A_ij, so adding k gains A_kk + Σ_{j∈S}(A_kj + A_jk).
    """

    def __init__(self, scores: Tensor):
        self.scores = scores.float()
        self.gain = torch.diagonal(self.scores).clone()

    def first(self) -> Tensor:
        return self.gain.clone()

    def add(self, chunk: Tensor) -> Tensor:
        self.gain += self.scores[:, chunk].sum(1) + self.scores[chunk, :].sum(0)
        return self.gain.clone()


class _Embeddings(Protocol):
    image_emb: Tensor
    text_emb: Tensor
    scale: float
    bias: float


class SigmoidGain:
    """Exact conditional gain for the sigmoid (SigLIP) loss, from embeddings, O(B·c) memory.

    A = rule(ℓ^learner, ℓ^reference) elementwise over per-pair sigmoid losses; the running gain of
    every candidate is updated from the B×c blocks A[:, chunk] and A[chunk, :].
    """

    def __init__(self, learner: _Embeddings | None, reference: _Embeddings | None, rule: Rule):
        self.models = (learner, reference)
        self.rule = rule
        some = learner if learner is not None else reference
        assert some is not None, "SigmoidGain: the rule reads the learner's or the reference's embeddings"
        n = some.image_emb.shape[0]
        self.all = torch.arange(n, device=some.image_emb.device)
        self.gain = self._block(self.all, None, diagonal=True)

    def _pair_losses(self, model: _Embeddings | None, rows: Tensor, cols: Tensor | None, diagonal: bool):
        if model is None:
            return None
        if diagonal:  # ℓ_kk only: a row-wise dot product, not a B×B block
            logits = model.scale * (model.image_emb.float() * model.text_emb.float()).sum(1) + model.bias
            return torch.nn.functional.softplus(-logits)
        return sigmoid_pair_losses(model.image_emb, model.text_emb, model.scale, model.bias, rows, cols)

    def _block(self, rows: Tensor, cols: Tensor | None, diagonal: bool = False) -> Tensor:
        learner, reference = (self._pair_losses(m, rows, cols, diagonal) for m in self.models)
        return self.rule(learner, reference)

    def first(self) -> Tensor:
        return self.gain.clone()

    def add(self, chunk: Tensor) -> Tensor:
        chunk = chunk.to(self.all.device)
        self.gain += self._block(self.all, chunk).sum(1) + self._block(chunk, self.all).sum(0)
        return self.gain.clone()


class SoftmaxGain:
    """Approximate conditional gain for the softmax (CLIP) loss, O(B·c) memory.

    The softmax loss of a set does not split into pairs, so the gain of candidate k is approximated
    by the loss k itself would have in the batch S ∪ {k} (negatives restricted to S), under each
    model, combined by the rule. The change k causes to the losses of S's members, as their extra
    negative, is ignored. Chunk 1 (S = ∅) uses the per-example losses against the whole superbatch.
    Running log-sum-exps per candidate make each update O(B·c).
    """

    def __init__(self, learner: _Embeddings | None, reference: _Embeddings | None, rule: Rule,
                 first_learner: Tensor | None, first_reference: Tensor | None):
        self.models = (learner, reference)
        self.rule = rule
        self._first = rule(first_learner, first_reference)
        self.state: list[list[Tensor] | None] = []  # per model; None where the model is None
        for model in self.models:
            if model is None:
                self.state.append(None)
                continue
            positive = model.scale * (model.image_emb.float() * model.text_emb.float()).sum(1)
            self.state.append([positive, positive.clone(), positive.clone()])  # pos, row lse, col lse

    def first(self) -> Tensor:
        return self._first.float().clone()

    def add(self, chunk: Tensor) -> Tensor:
        losses: list[Tensor | None] = []
        for model, state in zip(self.models, self.state, strict=True):
            if model is None or state is None:  # None together (see __init__)
                losses.append(None)
                continue
            chunk = chunk.to(model.image_emb.device)
            image, text = model.image_emb.float(), model.text_emb.float()
            positive, row_lse, col_lse = state
            row_lse = torch.logaddexp(row_lse, torch.logsumexp(model.scale * image @ text[chunk].T, dim=1))
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(model.scale * text @ image[chunk].T, dim=1))
            state[1], state[2] = row_lse, col_lse
            losses.append((row_lse + col_lse) / 2 - positive)
        return self.rule(*losses).float()


def _check_k(k: int, n: int) -> None:
    if not 0 < k <= n:
        raise ValueError(f"selection: cannot keep {k} of {n} candidates; need 0 < k <= {n}")


def _gumbel_topk(logits: Tensor, k: int, temperature: float, generator: torch.Generator | None) -> Tensor:
    if temperature < 0:
        raise ValueError(f"selection: temperature must be >= 0, got {temperature=}")
    uniform = torch.rand(logits.shape[0], generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300))).to(logits.device, torch.float32)
    if temperature == 0:
        keys = logits
    else:
        keys = logits / temperature + gumbel
    return torch.topk(keys, k, sorted=True).indices
