"""The tasks of your own shards (`data.format: webdataset | parquet`): "contrastive" (image + text, the JEST
family) and "classification" (image + label, the RHO-LOSS family).

They score, train and evaluate as the embedded tasks do (`PairsTask`, `DigitsTask`: the same scorers and
losses), and differ in what they read: `pipelines.shards` decodes the recipe's field map with the learner's
own preprocessing and tokenizer (one preprocessing for every model of a recipe, since all of them score the
same superbatch), and evaluation uses the recipe's `eval` section rather than the digits' class names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from . import models, shards
from .recipe import DataConfig, EvalConfig, ModelConfig
from .task_digits import DigitsTask
from .task_pairs import PairsTask

__all__ = ["ShardsClassification", "ShardsContrastive", "shards_task"]


class _Reading:
    """What both tasks share: how a shard's samples are read (format, field map, preprocessing, tokenizer)."""

    def __init__(self, data: DataConfig, evaluation: EvalConfig, transform: Callable, tokenizer: Callable | None):
        self.data, self.evaluation, self.tokenizer = data, evaluation, tokenizer
        self.reader = shards.SampleReader(self.name, data.fields.image, data.fields.text, data.fields.label,
                                          transform, tokenizer, data.on_corrupt)

    name: str

    def load(self, urls: str | Sequence[str], *, storage_options: dict | None = None) -> Iterable[dict]:
        listed = [urls] if isinstance(urls, str) else list(urls)
        return shards.load(listed, self.reader, format=self.data.format, key=self.data.fields.key,
                           storage_options=self.data.storage_options if storage_options is None else storage_options)


class ShardsContrastive(_Reading, PairsTask):
    """Image-text pairs of your own: scored and trained as the pairs task; evaluated by zero-shot accuracy over
    `eval.classnames` (when given; the eval data's label member is the class index) and image→text R@1."""

    name = "contrastive"

    def __init__(self, data: DataConfig, evaluation: EvalConfig, transform: Callable, tokenizer: Callable | None):
        PairsTask.__init__(self)
        _Reading.__init__(self, data, evaluation, transform, tokenizer)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict], cfg: ModelConfig, device: torch.device) -> dict:
        """R@1: the share of eval images whose nearest caption (cosine) is their own. accuracy: zero-shot over
        eval.classnames when they are given, else R@1."""
        with models.eval_mode(model):
            images = torch.cat([model.encode_image(b["image"].to(device), normalize=True) for b in batches])
            texts = torch.cat([model.encode_text(b["text"].to(device), normalize=True) for b in batches])
            nearest = torch.cat([(images[i:i + 1024] @ texts.T).argmax(1) for i in range(0, len(images), 1024)])
            r1 = float((nearest == torch.arange(len(images), device=device)).float().mean())
            metrics = {"r1": r1, "accuracy": r1}
            names = self.evaluation.classnames
            if names:
                if any("label" not in b for b in batches):
                    raise ValueError(f"eval.classnames: zero-shot needs each eval sample's class; data.fields.label "
                                     f"({self.data.fields.label!r}) is missing from the eval data")
                classes = self._class_embeddings(model, names, device)
                labels = torch.cat([b["label"] for b in batches]).to(device)
                if int(labels.max()) >= len(names):
                    raise ValueError(f"eval.classnames lists {len(names)} classes, the eval data has label "
                                     f"{int(labels.max())}; list every class, in label order")
                metrics["accuracy"] = float(((images @ classes.T).argmax(1) == labels).float().mean())
            return metrics

    def _class_embeddings(self, model: nn.Module, names: list[str], device: torch.device) -> torch.Tensor:
        """Each class's prompts (the templates with its name) embedded and averaged, as open_clip's zero-shot does."""
        assert self.tokenizer is not None
        rows = []
        for name in names:
            tokens = self.tokenizer([template.format(name) for template in self.evaluation.templates]).to(device)
            mean = model.encode_text(tokens, normalize=True).mean(0)
            rows.append(mean / mean.norm())
        return torch.stack(rows)


class ShardsClassification(_Reading, DigitsTask):
    """Labelled images of your own: scored, trained and evaluated (accuracy against the eval labels) as the
    digits task; `target` and `label` are both the label member."""

    name = "classification"

    def __init__(self, data: DataConfig, evaluation: EvalConfig, transform: Callable, tokenizer: Callable | None):
        DigitsTask.__init__(self)
        _Reading.__init__(self, data, evaluation, transform, tokenizer)


def shards_task(data: DataConfig, evaluation: EvalConfig, built: models.Built, image_size: int | None,
                context_length: int | None):
    """The task of `data` reading with the recipe's `data.transforms`, else the learner's preprocessing (`built`):
    its own eval transform (train data too: deterministic pixels, so that a resumed run, the cache and the
    learner see the same sample), else `resize_crop` to data.image_size; its own tokenizer, else open_clip's
    CLIP tokenizer at the model's context length (`pipelines.data.tokenize`)."""
    transform = shards.named_transforms(data.transforms) if data.transforms else built.preprocess_val
    if transform is None:
        if image_size is None:
            raise ValueError("data.image_size: the model brings no preprocessing of its own, so give the side that "
                             "images are resized and centre-cropped to, e.g. data.image_size: 224 (or name "
                             "torchvision transforms in data.transforms)")
        transform = functools.partial(shards.resize_crop, size=image_size)
    tokenizer = built.tokenizer
    if tokenizer is None and data.task == "contrastive":
        from .data import tokenize

        tokenizer = functools.partial(tokenize, context_length=context_length or 77)
    kind = ShardsContrastive if data.task == "contrastive" else ShardsClassification
    return kind(data, evaluation, transform, tokenizer)
