"""Flexi-JEST (Evans et al., 2024, §3.4): score at low resolution, train at mixed resolution.

Scoring a superbatch costs B/b learner forwards per training step. Flexi-JEST scores it with the images
downsampled (a ViT then sees 1/k² of the patches), and trains the learner on a share of every batch at that
same low resolution, so that the learner stays accurate where it scores. One model serves both resolutions:
`make_flexible` lets an open_clip `VisionTransformer` take images of any size that is a multiple of its patch,
with its learnt positional embeddings resized to the smaller patch grid (bicubic with antialiasing, as FlexiViT
and timm's `resample_abs_pos_embed` do); at the native size it is open_clip's forward unchanged.

* `downsample(batch, k)`: the `score_transform` that scores at 1/k resolution (its cost is in the FLOP ledger).
* `low_res_rows(n, share)`: which rows of a batch of n train at low resolution (spread evenly).
* `encode_mixed(model, images, k, share)`: image embeddings with those rows at 1/k resolution.
* `MixedResolutionScorer`: that forward as a scorer, so the ledger counts training at its own FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import curate

from .extras import needs_extra

with needs_extra("Flexi-JEST (an open_clip ViT)"):
    from open_clip.transformer import VisionTransformer, _expand_token

__all__ = ["FlexibleVisionTransformer", "MixedResolutionScorer", "downsample", "encode_mixed", "low_res_rows",
           "make_flexible", "resize_positions"]


def resize_positions(positions: Tensor, grid: tuple[int, int], to: tuple[int, int]) -> Tensor:
    """A ViT's positional embeddings (class token first, then the grid row-major) for another patch grid."""
    width = positions.shape[1]
    cls, patches = positions[:1], positions[1:].reshape(1, *grid, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=to, mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(-1, width)])


class FlexibleVisionTransformer(VisionTransformer):
    """open_clip's VisionTransformer taking any image size that is a multiple of its patch size."""

    def _embeds(self, x: Tensor) -> Tensor:
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        if grid == tuple(self.grid_size):
            return super()._embeds(x)
        if x.shape[-2] % self.patch_size[0] or x.shape[-1] % self.patch_size[1]:
            raise ValueError(f"Flexi: image size {tuple(x.shape[-2:])} is not a multiple of the patch size "
                             f"{tuple(self.patch_size)}; downsample by a factor that divides the patch grid")
        # open_clip's _embeds (open_clip_torch 3.x) with the positional embeddings resized to this grid
        x = self.conv1(x).flatten(2).permute(0, 2, 1)  # (N, grid², width)
        x = torch.cat([_expand_token(self.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
        x = x + resize_positions(self.positional_embedding, tuple(self.grid_size), grid).to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))


def make_flexible(model: nn.Module) -> nn.Module:
    """Let `model.visual` (an open_clip VisionTransformer) take low-resolution images; the same module and
    parameters (state dicts are unchanged), returned for chaining."""
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"selection.flexi needs an open_clip CLIP whose image tower is a VisionTransformer, got "
                        f"{type(visual).__name__ if visual is not None else type(model).__name__}; "
                        "use tiny_clip or an open_clip ViT model, or leave selection.flexi unset")
    if type(visual) is VisionTransformer:  # a subclass of open_clip's might embed otherwise: left as it is
        visual.__class__ = FlexibleVisionTransformer  # overrides one method; attributes and parameters stay
    elif not isinstance(visual, FlexibleVisionTransformer):
        raise TypeError(f"selection.flexi: {type(visual).__name__} is a subclass of open_clip's VisionTransformer "
                        "that Flexi cannot resize; use open_clip's own VisionTransformer")
    return model


def downsample(batch: dict, factor: int, key: str = "image") -> dict:
    """The batch with its images average-pooled by `factor` (the score transform of Flexi-JEST's scoring)."""
    return {**batch, key: F.avg_pool2d(batch[key], factor)}


def low_res_rows(n: int, share: float) -> Tensor:
    """Bool mask (n,): round(n·share) rows spread evenly over the batch (the selection's order is not random:
    JEST's first chunk comes first), the rows Flexi-JEST trains at low resolution."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.floor((i + 1) * share + 1e-9) > torch.floor(i * share + 1e-9)


def encode_mixed(model: nn.Module, images: Tensor, factor: int, share: float, *, normalize: bool = True) -> Tensor:
    """Image embeddings with the `low_res_rows` encoded at 1/factor resolution, the rest at full."""
    low = low_res_rows(images.shape[0], share).to(images.device)
    if not low.any():
        return model.encode_image(images, normalize=normalize)
    parts = [model.encode_image(F.avg_pool2d(images[low], factor), normalize=normalize)]
    if not low.all():
        parts.append(model.encode_image(images[~low], normalize=normalize))
    order = torch.cat([low.nonzero()[:, 0], (~low).nonzero()[:, 0]])
    return torch.cat(parts)[torch.argsort(order)]  # back in the batch's order


class MixedResolutionScorer(curate.ContrastiveScorer):
    """Scores as Flexi-JEST's learner trains: the `low_res_rows` of each batch at 1/factor resolution. It is the
    training forward the FLOP ledger measures (`curate.pipeline(train_scorer=...)`)."""

    def __init__(self, factor: int, share: float, **kwargs):
        super().__init__(image_key="image", text_key="text", **kwargs)
        self.factor, self.share = factor, share

    def encode_images(self, model: nn.Module, images: Tensor) -> Tensor:
        return encode_mixed(model, images, self.factor, self.share, normalize=False)

    def __repr__(self) -> str:
        return f"MixedResolutionScorer(factor={self.factor}, share={self.share}, loss={self.loss!r})"
