"""The "web" task: the web world's long-tailed compositional pairs (`pipelines.web`) and a tiny CLIP/SigLIP.

Trained, scored and actor-trained as the pairs task is (open_clip's losses, curate's contrastive scorer); what
differs is the data and the evaluation: zero-shot over all 600 concept prompts on the balanced test split
(`accuracy`), how often the predicted concept's number is right whatever its colour (`number_accuracy`), and
each attribute of it (`tens_accuracy`, `units_accuracy`, `colour_accuracy`: which one a run has not learnt yet), over
the tail concepts (`tail_accuracy`: the rarer half of the train stream's concepts) and image→text R@1 (`r1`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from . import models, web
from .recipe import ModelConfig
from .task_pairs import PairsTask, nearest

__all__ = ["WebTask"]


class WebTask(PairsTask):
    """Web-world pairs: `load_web` shards, `tiny_clip` models at the world's context length."""

    name = "web"

    def __init__(self):
        super().__init__()
        self.models: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
            "tiny_clip": lambda cfg, image_size: models.tiny_clip(
                cfg.loss, image_size=image_size, **{"context_length": web.CONTEXT_LENGTH, **cfg.options})}

    def load(self, urls: str | Sequence[str], *, storage_options: dict | None = None) -> Iterable[dict]:
        return web.load_web(urls, storage_options=storage_options)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict], cfg: ModelConfig, device: torch.device) -> dict:
        with models.eval_mode(model):
            prompts = model.encode_text(web.concept_prompts(model.context_length).to(device), normalize=True)
            images = torch.cat([model.encode_image(b["image"].to(device), normalize=True) for b in batches])
            texts = torch.cat([model.encode_text(b["text"].to(device), normalize=True) for b in batches])
            labels = torch.cat([b["label"] for b in batches]).to(device)
            tail = torch.cat([b["is_tail"] for b in batches]).to(device)  # as the world's seed ranks the concepts
            predicted, r1 = nearest(images, prompts), labels[nearest(images, texts)]
            said, truth = web.concept_attributes(predicted), web.concept_attributes(labels)
            correct = (predicted == labels).float()
            return {"accuracy": float(correct.mean()),
                    **{f"{k}_accuracy": float((said[k] == truth[k]).float().mean())
                       for k in ("number", "tens", "units", "colour")},
                    "tail_accuracy": float(correct[tail].mean()), "r1": float((r1 == labels).float().mean())}
