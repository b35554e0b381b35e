"""The "pairs" task: image-text pairs and a tiny CLIP/SigLIP (the JEST family).

Scored by curate's contrastive scorer (embeddings; pairwise losses from them), trained on open_clip's own
SigLIP / CLIP losses, evaluated by zero-shot accuracy and image→text R@1 on the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

import curate

from . import data, models
from .extras import needs_extra
from .recipe import FlexiConfig, ModelConfig

__all__ = ["PairsTask", "nearest"]


def nearest(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The index of each query's most similar key (dot product), `chunk` queries at a time (bounded memory)."""
    return torch.cat([(queries[i:i + chunk] @ keys.T).argmax(1) for i in range(0, len(queries), chunk)])


class PairsTask:
    """Image-text pairs: `load_pairs` shards, `tiny_clip` models, contrastive scoring and losses."""

    name = "pairs"

    def __init__(self):
        self.models: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
            "tiny_clip": lambda cfg, image_size: models.tiny_clip(cfg.loss, image_size=image_size, **cfg.options)}

    def load(self, urls: str | Sequence[str], *, storage_options: dict | None = None) -> Iterable[dict]:
        return data.load_pairs(urls, storage_options=storage_options)

    def scorer(self, cfg: ModelConfig, *, flexi: FlexiConfig | None = None):
        if flexi is not None:
            from .flexi import MixedResolutionScorer

            return MixedResolutionScorer(flexi.downsample, flexi.train_share, loss=cfg.loss)
        return curate.ContrastiveScorer(image_key="image", text_key="text", loss=cfg.loss)

    def train_loss(self, model: nn.Module, batch: dict, cfg: ModelConfig, device: torch.device, *,
                   flexi: FlexiConfig | None = None) -> torch.Tensor:
        """SigLIP or CLIP, as open_clip computes them; with `flexi`, over image embeddings of which
        `flexi.train_share` are encoded at 1/`flexi.downsample` resolution (`pipelines.flexi.encode_mixed`)."""
        with needs_extra("the pairs task's training loss"):
            from open_clip.loss import ClipLoss, SigLipLoss

        images = batch["image"].to(device)
        if flexi is None:
            image = model.encode_image(images, normalize=True)
        else:
            from .flexi import encode_mixed

            image = encode_mixed(model, images, flexi.downsample, flexi.train_share)
        text = model.encode_text(batch["text"].to(device), normalize=True)
        if cfg.loss == "sigmoid":
            return SigLipLoss()(image, text, model.logit_scale.exp(), model.logit_bias)
        return ClipLoss()(image, text, model.logit_scale.exp())

    def actor_loss(self, cfg: ModelConfig) -> Callable[[nn.Module, dict], torch.Tensor]:
        """Per-example losses with grad for an ACL actor (logit scale and bias trained too)."""
        from curate.losses import sigmoid_example_losses, softmax_example_losses

        def loss(model: nn.Module, batch: dict) -> torch.Tensor:
            device = next(model.parameters()).device
            image = model.encode_image(batch["image"].to(device), normalize=True)
            text = model.encode_text(batch["text"].to(device), normalize=True)
            if cfg.loss == "sigmoid":
                return sigmoid_example_losses(image, text, model.logit_scale.exp(), model.logit_bias)
            return softmax_example_losses(image, text, model.logit_scale.exp())
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict], cfg: ModelConfig, device: torch.device) -> dict:
        """Zero-shot accuracy (10 class prompts) and image→text R@1 (the top caption is of the same digit;
        captions repeat across images, so the exact caption is not asked for)."""
        with models.eval_mode(model):
            images = torch.cat([model.encode_image(b["image"].to(device), normalize=True) for b in batches])
            texts = torch.cat([model.encode_text(b["text"].to(device), normalize=True) for b in batches])
            labels = torch.cat([b["label"] for b in batches]).to(device)
            r1 = labels[nearest(images, texts)]
            return {"accuracy": models.zero_shot_accuracy(model, batches), "r1": float((r1 == labels).float().mean())}
