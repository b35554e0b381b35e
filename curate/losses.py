"""Per-example and per-pair losses, as pure functions of logits or embeddings.

These are the quantities the score rules combine. Their reductions equal the library losses they
come from (tests check against `open_clip.loss.ClipLoss` / `SigLipLoss`):

* `sigmoid_pair_losses(...).sum() / B` is SigLIP's loss; `sigmoid_example_losses(...).mean()` too.
* `softmax_example_losses(...).mean()` is CLIP's loss (image→text and text→image, averaged).

Pairwise work is done in row blocks so memory stays O(block · B), never a dense B×B at large B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy_losses", "sigmoid_example_losses", "sigmoid_pair_losses", "softmax_example_losses"]

_BLOCK = 4096  # rows per block for O(B²) reductions: 4096 × 64k floats = 1 GiB at most


def cross_entropy_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example cross-entropy, shape (B,)."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def sigmoid_pair_losses(
    image_emb: Tensor,
    text_emb: Tensor,
    scale: float | Tensor,
    bias: float | Tensor,
    rows: Tensor | None = None,
    cols: Tensor | None = None,
) -> Tensor:
    """SigLIP per-pair losses ℓ_ij = softplus(−y_ij (t·u_i·v_j + b)) for i in `rows`, j in `cols`.

    y_ij = +1 for a matching pair (same superbatch index), −1 otherwise. `scale` is t = exp(logit_scale),
    as open_clip models return it. `rows` / `cols` are index tensors into the superbatch (default: all).
    """
    n = image_emb.shape[0]
    device = image_emb.device
    rows = torch.arange(n, device=device) if rows is None else rows.to(device)
    cols = torch.arange(n, device=device) if cols is None else cols.to(device)
    logits = scale * (image_emb[rows].float() @ text_emb[cols].float().T) + bias
    labels = (rows[:, None] == cols[None, :]).float() * 2 - 1
    return F.softplus(-labels * logits)


def sigmoid_example_losses(
    image_emb: Tensor, text_emb: Tensor, scale: float | Tensor, bias: float | Tensor
) -> Tensor:
    """Per-example SigLIP loss: ½(Σ_j ℓ_ij + Σ_j ℓ_ji), so its mean is SigLIP's batch loss."""
    n = image_emb.shape[0]
    device = image_emb.device
    row_sums = torch.empty(n, device=device)
    col_sums = torch.zeros(n, device=device)
    for start in range(0, n, _BLOCK):
        rows = torch.arange(start, min(start + _BLOCK, n), device=device)
        block = sigmoid_pair_losses(image_emb, text_emb, scale, bias, rows=rows)
        row_sums[rows] = block.sum(1)
        col_sums += block.sum(0)
    return (row_sums + col_sums) / 2


def softmax_example_losses(image_emb: Tensor, text_emb: Tensor, scale: float | Tensor) -> Tensor:
    """Per-example CLIP loss: ½(CE image→text + CE text→image); its mean is CLIP's batch loss."""
    n = image_emb.shape[0]
    image_emb, text_emb = image_emb.float(), text_emb.float()
    positive = scale * (image_emb * text_emb).sum(1)
    image_lse = torch.empty(n, device=image_emb.device)
    text_lse = torch.empty(n, device=image_emb.device)
    for start in range(0, n, _BLOCK):
        stop = min(start + _BLOCK, n)
        image_lse[start:stop] = torch.logsumexp(scale * image_emb[start:stop] @ text_emb.T, dim=1)
        text_lse[start:stop] = torch.logsumexp(scale * text_emb[start:stop] @ image_emb.T, dim=1)
    return (image_lse + text_lse) / 2 - positive
