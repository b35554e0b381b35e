"""The "digits" task: noisy-label classification with a small CNN or MLP (the RHO-LOSS family).

Scored by per-example cross-entropy against the (possibly flipped) training label `target`, trained on the
same loss, evaluated by accuracy against the true `label` of the clean test split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import curate

from . import data, models
from .recipe import FlexiConfig, ModelConfig

__all__ = ["DigitsTask"]

NUM_CLASSES = 10


def _no_flexi(flexi: FlexiConfig | None) -> None:
    if flexi is not None:
        raise ValueError("selection.flexi: a classification task (digits, or your own labelled images) trains a "
                         "classifier at one image size; Flexi-JEST needs an image-text task with an open_clip ViT "
                         "(pairs, web, or your own pairs); unset selection.flexi")


class DigitsTask:
    """Noisy digits: `load_digits` shards, `small_cnn` / `mlp` classifiers, cross-entropy scoring and loss."""

    name = "digits"

    def __init__(self):
        self.models: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
            "small_cnn": lambda cfg, image_size: models.small_cnn(NUM_CLASSES, image_size=image_size, **cfg.options),
            "mlp": lambda cfg, image_size: models.mlp(NUM_CLASSES, image_size=image_size, **cfg.options)}

    def load(self, urls: str | Sequence[str], *, storage_options: dict | None = None) -> Iterable[dict]:
        return data.load_digits(urls, storage_options=storage_options)

    def scorer(self, cfg: ModelConfig, *, flexi: FlexiConfig | None = None):
        _no_flexi(flexi)
        return curate.ClassificationScorer(input_key="image", target_key="target")

    def train_loss(self, model: nn.Module, batch: dict, cfg: ModelConfig, device: torch.device, *,
                   flexi: FlexiConfig | None = None) -> torch.Tensor:
        _no_flexi(flexi)
        return F.cross_entropy(model(batch["image"].to(device)), batch["target"].to(device))

    def actor_loss(self, cfg: ModelConfig) -> Callable[[nn.Module, dict], torch.Tensor]:
        """Per-example losses with grad for an ACL actor."""
        def loss(model: nn.Module, batch: dict) -> torch.Tensor:
            return F.cross_entropy(model(batch["image"]), batch["target"], reduction="none")
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict], cfg: ModelConfig, device: torch.device) -> dict:
        """Accuracy against the true labels."""
        with models.eval_mode(model):
            correct = sum(int((model(b["image"].to(device)).argmax(1).cpu() == b["label"]).sum()) for b in batches)
            return {"accuracy": correct / sum(len(b["label"]) for b in batches)}
