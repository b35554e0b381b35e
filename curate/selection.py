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
B×c blocks of the chunk just added (c = b / n_chunks), so memory is O(B·c) per chunk. On CPU the blocks are
computed in row tiles of at most `_TILE` floats, so the elementwise work after each product runs in cache.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .rules import Rule

__all__ = ["DenseGain", "Gain", "SigmoidGain", "SoftmaxGain", "chunk_sizes", "joint", "sample", "sampling_entropy",
           "topk"]


def topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, highest first."""
    _check_k(k, scores.shape[0])
    return torch.topk(scores.float(), k, sorted=True).indices


def sample(
    scores: Tensor, k: int, *, temperature: float = 1.0, generator: torch.Generator | None = None,
    entropies: list[Tensor] | None = None,
) -> Tensor:
    """k indices without replacement, P ∝ softmax(scores / temperature) (Gumbel-top-k).

    `temperature=0` is greedy top-k. Noise comes from `generator` (CPU) so draws are device-independent.
    `entropies`, if given, gets the draw's `sampling_entropy` appended (a diagnostic; the draw is the same).
    """
    _check_k(k, scores.shape[0])
    _check_temperature(temperature)
    if entropies is not None:
        entropies.append(sampling_entropy(scores.float(), temperature))
    noise = _gumbel((scores.shape[0],), generator, scores.device) if temperature else None
    return _gumbel_topk(scores.float(), k, temperature, noise)


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
    entropies: list[Tensor] | None = None,
    given: Tensor | None = None,
) -> Tensor:
    """JEST joint example selection: k indices drawn chunk by chunk from conditional gains.

    Each chunk is a Gumbel-top-k draw from softmax(gain / temperature) over the candidates not yet
    selected. With `n_chunks=1` this is `sample(gain.first(), k)` with the same noise. `entropies`, if
    given, gets each chunk's `sampling_entropy` appended, in chunk order (a diagnostic; the draw is the same).
    `given`: indices already in the batch (`JointSelect`'s uniform share); the k are drawn conditioned on them,
    as a chunk drawn before the first, and never repeat them. The k new indices are returned.
    """
    logits = gain.first()
    n = logits.shape[0]
    taken = torch.zeros(n, dtype=torch.bool, device=logits.device)
    _check_k(k + (0 if given is None else given.numel()), n)
    _check_temperature(temperature)
    sizes = chunk_sizes(k, n_chunks)
    if given is not None and given.numel():
        given = given.to(logits.device)
        taken[given] = True
        for part in given.split(sizes[0]):  # in pieces of a chunk's size: a gain's memory grows with the piece
            logits = gain.add(part)
    # every chunk's noise in one draw and one transfer; row i is what a draw for chunk i alone would give
    noise = _gumbel((len(sizes), n), generator, logits.device) if temperature else None
    chunks: list[Tensor] = []
    for i, size in enumerate(sizes):
        masked = logits.float().masked_fill(taken, float("-inf"))
        if entropies is not None:
            entropies.append(sampling_entropy(masked, temperature))
        chunk = _gumbel_topk(masked, size, temperature, None if noise is None else noise[i])
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
    every candidate is updated from the B×c blocks A[:, chunk] and A[chunk, :]. Each model's block is one
    `addmm` (t·(rows @ colsᵀ) + b) and a softplus in place, as if every pair were a negative, ℓ_ij =
    softplus(x_ij); the chunk's own positives, softplus(−x_kk) = softplus(x_kk) − x_kk, are corrected for
    afterwards from the (B,) diagonal. The rule combines the models' blocks elementwise before the row sums,
    so learnability's cancellation between two close models happens per pair, as in the dense matrix.
    """

    def __init__(self, learner: _Embeddings | None, reference: _Embeddings | None, rule: Rule):
        assert learner is not None or reference is not None, \
            "SigmoidGain: the rule reads the learner's or the reference's embeddings"
        self.models = [None if m is None else _Model(m) for m in (learner, reference)]
        self.rule = rule
        self.gain = self._rule(None if m is None else F.softplus(-m.positive) for m in self.models)

    def _rule(self, losses: Iterable[Tensor | None]) -> Tensor:
        return self.rule(*losses).float()

    def first(self) -> Tensor:
        return self.gain.clone()

    def add(self, chunk: Tensor) -> Tensor:
        device = next(m for m in self.models if m is not None).image.device
        chunk = chunk.to(device)
        n, c = self.gain.shape[0], chunk.shape[0]
        cpu = device.type == "cpu"
        rows = min(n, max(1, _TILE // c)) if cpu else n
        blocks = [None if m is None else torch.empty(rows, c, device=device) for m in self.models]
        scratch = [torch.empty(rows, c, device=device) for _ in range(2 if cpu else 0)]
        # A[:, chunk] reads image × text[chunk]; A[chunk, :], as its transpose, text × image[chunk]
        pairs = [[None if m is None else (m.image, m.text[chunk]) for m in self.models],
                 [None if m is None else (m.text, m.image[chunk]) for m in self.models]]
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            for direction in pairs:
                losses: list[Tensor | None] = []
                for m, pair, block in zip(self.models, direction, blocks, strict=True):
                    if m is None or pair is None or block is None:  # None together
                        losses.append(None)
                        continue
                    x, y = pair
                    tile = torch.addmm(m.bias, x[start:stop], y.T, alpha=m.scale, out=block[: stop - start])
                    losses.append(_softplus_(tile, [t[: stop - start] for t in scratch]))
                self.gain[start:stop] += self._rule(losses).sum(1)
        # each chunk member k met itself as a negative in both blocks; it is its positive pair
        positive = [None if m is None else m.positive[chunk] for m in self.models]
        correction = (self._rule(None if x is None else F.softplus(-x) for x in positive)
                      - self._rule(None if x is None else F.softplus(x) for x in positive))
        self.gain.index_add_(0, chunk, 2 * correction)
        return self.gain.clone()


class _Model:
    """One model's embeddings as float32 and its sigmoid logit parameters, read once per selection."""

    def __init__(self, model: _Embeddings):
        self.image, self.text = model.image_emb.float(), model.text_emb.float()
        self.scale = float(model.scale)
        self.bias = torch.tensor(float(model.bias), device=self.image.device)  # addmm's input, broadcast
        self.positive = self.scale * (self.image * self.text).sum(1) + self.bias  # x_kk, the matching pairs


def _softplus_(x: Tensor, scratch: list[Tensor]) -> Tensor:
    """softplus(x), in place on CPU, overwriting the two `scratch` tensors (the shape of x; none on CUDA).

    On CPU torch's softplus and log1p are not vectorised (~10 ns an element here, more than the GEMM that
    made the block) while exp and log are (~1-2 ns), so softplus(x) = max(x, 0) + log1p(u), u = e^{−|x|}, with
    log1p(u) = log(w) + (u − (w − 1)) / w, w = fl(1 + u): the second term is w's rounding error (exact, as
    w − 1 is), to first order, which keeps the result within a few ulps where log(w) alone loses small u.
    On CUDA one softplus kernel reads the block once, fewer passes than these.
    """
    if x.is_cuda:
        return F.softplus(x)
    relu = torch.clamp(x, min=0, out=scratch[0])
    u = x.sub_(relu, alpha=2).exp_()  # x − 2·max(x, 0) = −|x|, exactly
    w = torch.add(u, 1, out=scratch[1])
    error = u.sub_(w.sub_(1)).div_(w.add_(1))  # (u − (w − 1)) / w; w − 1 is exact, so is w again
    return error.add_(w.log_()).add_(relu)


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
            row_lse = torch.logaddexp(row_lse, _logsumexp_rows(image, model.scale * text[chunk]))
            col_lse = torch.logaddexp(col_lse, _logsumexp_rows(text, model.scale * image[chunk]))
            state[1], state[2] = row_lse, col_lse
            losses.append((row_lse + col_lse) / 2 - positive)
        return self.rule(*losses).float()


def _logsumexp_rows(x: Tensor, y: Tensor) -> Tensor:
    """logsumexp_j (x @ yᵀ)_ij per row, in row tiles on CPU (one product into a reused buffer, then in place)."""
    n, c = x.shape[0], y.shape[0]
    rows = min(n, max(1, _TILE // c)) if x.device.type == "cpu" else n
    block = torch.empty(rows, c, device=x.device)
    out = torch.empty(n, device=x.device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        tile = torch.mm(x[start:stop], y.T, out=block[: stop - start])
        top = tile.amax(1)
        out[start:stop] = tile.sub_(top[:, None]).exp_().sum(1).log_().add_(top)
    return out


_TILE = 1 << 19  # floats per CPU row tile (2 MiB): the 4 tiles a SigmoidGain update uses stay in cache


def sampling_entropy(logits: Tensor, temperature: float) -> Tensor:
    """Entropy of softmax(logits / temperature) over the finite logits, divided by its maximum, log(n): 1 is a
    uniform draw over the n candidates, 0 a deterministic one (temperature 0, or one candidate). A 0-dim tensor
    on the logits' device, so that recording it does not synchronise a GPU."""
    finite = torch.isfinite(logits)
    n = finite.sum()
    if temperature == 0:
        return torch.zeros((), device=logits.device)
    log_p = torch.log_softmax(logits / temperature, 0)
    entropy = -(log_p.exp() * log_p).where(finite, 0.0).sum()
    return torch.where(n > 1, entropy / n.clamp_min(2).log(), 0.0)


def _check_k(k: int, n: int) -> None:
    if not 0 < k <= n:
        raise ValueError(f"selection: cannot keep {k} of {n} candidates; need 0 < k <= {n}")


def _check_temperature(temperature: float) -> None:
    if temperature < 0:
        raise ValueError(f"selection: temperature must be >= 0, got {temperature=}")


def _gumbel(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise drawn on the CPU (so a seed gives the same draws on every device), then moved."""
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
    return (-torch.log(-torch.log(uniform.clamp_min(1e-300)))).to(device, torch.float32)


def _gumbel_topk(logits: Tensor, k: int, temperature: float, noise: Tensor | None) -> Tensor:
    """The k largest logits / temperature + noise; `noise` is None exactly when temperature is 0 (greedy)."""
    keys = logits if noise is None else logits / temperature + noise
    return torch.topk(keys, k, sorted=True).indices
