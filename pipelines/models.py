"""Tiny models for the embedded digits data: a CLIP/SigLIP pair model, a CNN and an MLP classifier.

Sized so that a forward+backward of a batch of 64 takes a few milliseconds on 2 CPU cores, which is
what lets tests, notebooks and benchmarks train learner and reference models for real. Nothing is
downloaded: weights are randomly initialised from the seed in force (`torch.manual_seed`).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from curate.cache import model_hash  # re-exported: the one provenance hash, shared with the score cache

from .extras import needs_extra

__all__ = ["tiny_clip", "HashedEmbedding", "small_cnn", "mlp", "from_factory", "model_hash", "zero_shot_accuracy",
           "eval_mode"]

TOKENIZER_VOCAB = 49408  # open_clip's CLIP BPE tokenizer


class HashedEmbedding(nn.Embedding):
    """Token embedding with `num_embeddings` rows for ids of any size: row = id mod num_embeddings.

    Why: a full 49408-row table is 96% of a tiny CLIP's weights, and its dense gradient plus the
    optimizer update over it cost ~40% of a training step; the digit captions use ~100 distinct ids,
    which do not collide at 4096 rows. open_clip still pools text at `argmax` of the *original* ids
    (the end-of-text token), so only the lookup changes.
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids % self.num_embeddings)


def tiny_clip(loss: str = "sigmoid", *, embed_dim: int = 64, image_size: int = 16, patch_size: int = 4,
              width: int = 64, layers: int = 2, heads: int = 2, text_width: int = 64, text_layers: int = 2,
              text_heads: int = 2, context_length: int = 16, vocab_size: int = 4096) -> nn.Module:
    """An `open_clip.model.CLIP` with a tiny ViT image tower and a tiny causal text transformer.

    `loss="sigmoid"` initialises logit scale/bias as SigLIP does (t = 10, b = -10), so the pairwise
    sigmoid loss starts near its balanced optimum; `loss="softmax"` uses CLIP's t = 1/0.07 and no bias.
    `encode_text` takes open_clip BPE ids (`pipelines.data.tokenize`); below the tokenizer's 49408 they
    are hashed into `vocab_size` rows (`HashedEmbedding`). Defaults: 16×16 images in 4×4 patches
    (17 tokens), 2 layers of width 64, ~0.4M parameters.
    """
    with needs_extra("tiny_clip"):
        from open_clip.model import CLIP

    if loss not in ("sigmoid", "softmax"):
        raise ValueError(f"tiny_clip: loss must be 'sigmoid' or 'softmax', got {loss=}")
    if image_size % patch_size:
        raise ValueError(f"tiny_clip: image_size must divide by patch_size, got {image_size=} {patch_size=}")
    if not 2 <= vocab_size <= TOKENIZER_VOCAB:
        raise ValueError(f"tiny_clip: vocab_size must be in [2, {TOKENIZER_VOCAB}], got {vocab_size=}")
    if width % heads or text_width % text_heads:
        raise ValueError(f"tiny_clip: widths must divide by heads, got {width=} {heads=} {text_width=} {text_heads=}")
    vision_cfg = {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers,
                  "head_width": width // heads, "mlp_ratio": 2.0}
    text_cfg = {"context_length": context_length, "vocab_size": vocab_size, "width": text_width,
                "heads": text_heads, "layers": text_layers, "mlp_ratio": 2.0}
    if loss == "sigmoid":
        model = CLIP(embed_dim, vision_cfg, text_cfg, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    else:
        model = CLIP(embed_dim, vision_cfg, text_cfg)
    if vocab_size < TOKENIZER_VOCAB:  # same initial weights, hashed lookup
        model.token_embedding = HashedEmbedding(vocab_size, text_width, _weight=model.token_embedding.weight.data)
    return model


def small_cnn(num_classes: int = 10, *, image_size: int = 16, in_channels: int = 1, width: int = 32) -> nn.Module:
    """Two conv blocks (3×3 conv, ReLU, 2×2 max-pool) and a linear head: logits (N, num_classes)."""
    if image_size % 4:
        raise ValueError(f"small_cnn: image_size must divide by 4 (two 2×2 pools), got {image_size=}")
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (image_size // 4) ** 2, num_classes),
    )


def mlp(num_classes: int = 10, *, image_size: int = 16, in_channels: int = 1, hidden: int = 256) -> nn.Module:
    """Flatten, two hidden ReLU layers, linear head (the RHO-LOSS paper's small-model family)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * image_size**2, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes),
    )


@torch.no_grad()
def from_factory(spec: str, options: dict, *, image_size: int) -> nn.Module:
    """The model `spec` ("package.module:function") returns for `options`, plus `image_size` when the function
    takes it. Every way this can go wrong is a ValueError naming the factory and the fix."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"model.factory: cannot import {module_name!r} ({error}); install the package that "
                         "holds it, or run from the directory that does (it must be on sys.path)") from error
    function = getattr(module, name, None)
    if not callable(function):
        close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=3)
        raise ValueError(f"model.factory: {module_name} has no function {name!r}"
                         + (f"; did you mean {' or '.join(close)}?" if close else ""))
    kwargs = dict(options)
    try:
        signature: inspect.Signature | None = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin or C callable: no signature to read, so call it as written
        signature = None
    if signature is not None:
        if "image_size" in signature.parameters and "image_size" not in kwargs:
            kwargs["image_size"] = image_size
        try:
            signature.bind(**kwargs)
        except TypeError as error:  # checked before the call, so a TypeError inside the factory stays its own
            raise ValueError(f"model.factory: {spec}{signature} cannot take model.options {sorted(options)} "
                             f"({error})") from error
    model = function(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.factory: {spec} returned a {type(model).__name__}, not a torch.nn.Module; "
                         "return the model itself")
    return model


def zero_shot_accuracy(model: nn.Module, batches: Iterable[dict], *, prompts: torch.Tensor | None = None,
                       image_key: str = "image", label_key: str = "label") -> float:
    """Fraction of images whose nearest class prompt (cosine) is their true label.

    Args:
        batches: collated batches with `image_key` images and `label_key` int labels.
        prompts: token ids (10, L); default `class_prompts()` ("a photo of the digit {name}") at the
            model's context length.
    """
    from .data import class_prompts

    with eval_mode(model):
        prompts = class_prompts(context_length=model.context_length) if prompts is None else prompts
        prompts = prompts.to(next(model.parameters()).device)
        classes = model.encode_text(prompts, normalize=True)
        correct = total = 0
        device = classes.device
        for batch in batches:
            image = model.encode_image(batch[image_key].to(device), normalize=True)
            correct += int(((image @ classes.T).argmax(1) == torch.as_tensor(batch[label_key], device=device)).sum())
            total += len(image)
    if total == 0:
        raise ValueError("zero_shot_accuracy: no batches; pass a non-empty iterable of collated batches")
    return correct / total


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode for the block, then back in the mode it was in (evaluation happens mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
