"""Scorers and score providers: how one model's losses (or embeddings) are computed from a collated batch.

A `Scorer` is called on micro-batches (under `torch.no_grad()`, model in eval mode, by `score_model`) and
returns `ModelScores`. Built-ins: `ClassificationScorer` (per-example cross-entropy) and `ContrastiveScorer`
(the open_clip API: `encode_image`, `encode_text`, `logit_scale`, `logit_bias`). A custom scorer is any object
with `keys` (the batch fields it reads), `kind` (what its scores are) and `__call__(model, batch)`.

Precision is `score_model`'s, so every scorer and provider gets it: floating inputs are cast to the model's
floating dtype (a bf16 scoring copy takes bf16 inputs; token ids and labels stay integers), the forward runs
under `torch.autocast` when the scorer's `autocast` attribute names a dtype, and the scores come back in fp32.

A `ScoreProvider` scores a whole superbatch without being a model the pipeline forwards itself: a
`ScoreCache` (offline reference scores), a `WeightSync` snapshot, an ACL `Actor`, or `ModelProvider`, which
is how a plain `nn.Module` is scored.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import batch_size_of, slice_batch
from .losses import cross_entropy_losses, sigmoid_example_losses, softmax_example_losses

__all__ = ["ClassificationScorer", "ContrastiveScorer", "Kind", "ModelProvider", "ModelScores", "ScoreProvider",
           "Scorer", "TargetError", "model_device", "model_dtype", "score_model"]

_IGNORE_INDEX = -100  # F.cross_entropy's default ignore_index: such a target scores 0


class TargetError(ValueError):
    """The labels cannot be scored as given (ignore_index, out-of-range or float class indices, soft labels that
    are not distributions): cross-entropy would crash or, worse, score them wrongly without a word."""

Kind = Literal["example", "sigmoid", "softmax"]


@dataclass
class ModelScores:
    """One model's view of a superbatch.

    Args:
        loss: per-example losses (B,). For contrastive scores it is computed on first access (it costs
            O(B²·d)), from the embeddings with the whole superbatch as negatives.
        image_emb, text_emb: L2-normalised embeddings (B, d), contrastive only.
        scale: t = exp(logit_scale); bias: the sigmoid loss's logit bias (0 for softmax).
        kind: "example" (per-example losses only), "sigmoid" or "softmax".
    """

    kind: Kind = "example"
    image_emb: Tensor | None = None
    text_emb: Tensor | None = None
    scale: float = 1.0
    bias: float = 0.0
    _loss: Tensor | None = field(default=None, repr=False)

    @property
    def loss(self) -> Tensor:
        if self._loss is None:
            if self.kind == "sigmoid":
                self._loss = sigmoid_example_losses(*self._embeddings(), self.scale, self.bias)
            elif self.kind == "softmax":
                self._loss = softmax_example_losses(*self._embeddings(), self.scale)
            else:
                raise AssertionError("example scores are built with a loss")
        return self._loss

    @property
    def size(self) -> int:
        rows = self.loss if self.kind == "example" else self.image_emb
        assert rows is not None, f"{self.kind} scores are built with image and text embeddings"
        return rows.shape[0]

    @property
    def contrastive(self) -> bool:
        return self.kind != "example"

    @classmethod
    def of_losses(cls, loss: Tensor) -> ModelScores:
        return cls(kind="example", _loss=loss)

    def _embeddings(self) -> tuple[Tensor, Tensor]:
        """(image_emb, text_emb) of contrastive scores, which are built with both."""
        image, text = self.image_emb, self.text_emb
        assert image is not None and text is not None, f"{self.kind} scores are built with image and text embeddings"
        return image, text

    def to(self, device: torch.device | str) -> ModelScores:
        return self._map(lambda t: t.to(device))

    def float(self) -> ModelScores:
        """These scores in fp32, whatever precision the forward ran in (what the rules and the sampler read)."""
        return self._map(Tensor.float)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> ModelScores:
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        return ModelScores(self.kind, apply(self.image_emb), apply(self.text_emb), self.scale, self.bias,
                           apply(self._loss))

    def nonfinite(self) -> Tensor:
        """Bool mask (B,) of examples whose loss or embeddings are NaN/inf."""
        if self.kind == "example":
            return ~torch.isfinite(self.loss)
        image, text = self._embeddings()
        bad = ~torch.isfinite(image).all(1) | ~torch.isfinite(text).all(1)
        if not (torch.isfinite(torch.tensor(self.scale)) and torch.isfinite(torch.tensor(self.bias))):
            bad[:] = True
        return bad

    @staticmethod
    def cat(parts: list[ModelScores]) -> ModelScores:
        """Concatenate the scores of consecutive micro-batches."""
        head = parts[0]
        cat = lambda name: None if getattr(head, name) is None else torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return ModelScores(head.kind, cat("image_emb"), cat("text_emb"), head.scale, head.bias,
                      cat("_loss") if head.kind == "example" else None)


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer); None when it has none."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


@runtime_checkable
class Scorer(Protocol):
    """Computes one model's `ModelScores` from a (micro-)batch.

    Attributes:
        keys: the batch fields it reads (checked against every superbatch, so a typo fails naming them).
        kind: what its scores are: "example" (per-example losses), "sigmoid" or "softmax" (embeddings for the
            contrastive losses). A `ScoreCache` serves the matching columns.

    Optional attributes, read by `score_model` (the built-in scorers take them as arguments): `autocast`, a
    dtype to run the forward under `torch.autocast` in, and `dtype`, the dtype floating inputs are cast to
    (default: the model's floating dtype). Both None when absent.
    """

    keys: tuple[str, ...]
    kind: Kind

    def __call__(self, model: nn.Module, batch: dict) -> ModelScores: ...


@runtime_checkable
class ScoreProvider(Protocol):
    """Scores a superbatch in a model's place (a ScoreCache, a WeightSync snapshot, an Actor, a ModelProvider).

    `micro_batch_size` bounds any forward pass the provider runs (the Score stage passes its own).
    """

    def scores(self, batch: dict, scorer: Scorer, micro_batch_size: int) -> ModelScores: ...


class ModelProvider:
    """A plain `nn.Module` as a `ScoreProvider`: scored live, without grad, in eval mode (`score_model`)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def scores(self, batch: dict, scorer: Scorer, micro_batch_size: int) -> ModelScores:
        return score_model(self.model, batch, scorer, micro_batch_size)

    def __repr__(self) -> str:
        return f"ModelProvider({type(self.model).__name__})"


def score_model(model: nn.Module, batch: dict, scorer: Scorer, micro_batch_size: int) -> ModelScores:
    """The scores of `model` on `batch`, forwarded in slices of `micro_batch_size` without grad, in eval mode.

    The model's train/eval mode is restored afterwards (eval so dropout does not add noise to the
    scores and batch-norm statistics are not updated by the scoring pass).

    Precision: the floating fields among `scorer.keys` are cast to `scorer.dtype`, default the model's floating
    dtype (so a bf16 copy of an fp32 learner scores fp32 batches; integer fields are left alone); with
    `scorer.autocast` set the forward runs under `torch.autocast` on the model's device type in that dtype. The
    scores are returned in fp32.
    """
    n = batch_size_of(batch)
    dtype = getattr(scorer, "dtype", None) or model_dtype(model)
    autocast = getattr(scorer, "autocast", None)
    precision = (torch.autocast(model_device(model).type, dtype=autocast) if autocast is not None
                 else contextlib.nullcontext())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), precision:
            parts = [_score_slice(model, batch, scorer, dtype, i, min(i + micro_batch_size, n))
                     for i in range(0, n, micro_batch_size)]
    finally:
        model.train(was_training)
    return ModelScores.cat(parts).float()


def _score_slice(model: nn.Module, batch: dict, scorer: Scorer, dtype: torch.dtype | None, start: int,
                 stop: int) -> ModelScores:
    try:
        return scorer(model, _cast(slice_batch(batch, start, stop), scorer.keys, dtype))
    except TargetError as e:  # its positions are the micro-batch's: say where that starts
        raise TargetError(f"{e} [in the micro-batch of rows {start}-{stop - 1}]") from None


def _cast(batch: dict, keys: tuple[str, ...], dtype: torch.dtype | None) -> dict:
    """`batch` with its floating fields among `keys` in `dtype` (None: as they are)."""
    if dtype is None:
        return batch
    cast = lambda v: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v  # noqa: E731
    return {name: cast(value) if name in keys else value for name, value in batch.items()}


def _check_precision(owner: str, autocast: torch.dtype | None, dtype: torch.dtype | None) -> None:
    for name, value in (("autocast", autocast), ("dtype", dtype)):
        if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
            raise ValueError(f"{owner}: {name} must be a floating-point torch.dtype (e.g. torch.bfloat16) or None, "
                             f"got {name}={value!r}")


def _precision_repr(autocast: torch.dtype | None, dtype: torch.dtype | None) -> str:
    return "".join(f", {name}={value}" for name, value in (("autocast", autocast), ("dtype", dtype)) if value)


class ClassificationScorer:
    """Per-example cross-entropy of `model(batch[input_key])` against `batch[target_key]`.

    Args:
        input_key: the batch field fed to the model.
        target_key: the class labels: indices in [0, C) of any integer dtype, or soft labels, a float (B, C)
            tensor with one probability distribution per example (label smoothing, mixup). Checked on every
            micro-batch (a few tensor ops): -100 (PyTorch's ignore_index, which cross-entropy scores 0, as if
            learnt), indices outside [0, C), float indices and rows that are not distributions raise a
            `TargetError` naming the samples.
        autocast: run the scoring forward under `torch.autocast` in this dtype (e.g. torch.bfloat16; CPU and
            CUDA); None: in the model's own precision.
        dtype: the dtype floating inputs are cast to; None: the model's floating dtype (its first floating
            parameter's), which is right unless that parameter's dtype differs from the layer the input enters.
        Both are applied by `score_model`, through which every provider scores; the losses are fp32.
    """

    kind: Kind = "example"

    def __init__(self, input_key: str = "input", target_key: str = "target", *,
                 autocast: torch.dtype | None = None, dtype: torch.dtype | None = None):
        _check_precision("ClassificationScorer", autocast, dtype)
        self.input_key, self.target_key = input_key, target_key
        self.keys: tuple[str, ...] = (input_key, target_key)
        self.autocast, self.dtype = autocast, dtype

    def __call__(self, model: nn.Module, batch: dict) -> ModelScores:
        device = model_device(model)
        logits = model(batch[self.input_key].to(device, non_blocking=True))
        return ModelScores.of_losses(cross_entropy_losses(logits, self._targets(batch, logits)))

    def _targets(self, batch: dict, logits: Tensor) -> Tensor:
        """The batch's targets, checked before cross-entropy reads them: class indices (any integer dtype, as
        int64) in [0, C), or soft labels, one probability distribution over the C classes per example."""
        targets = batch[self.target_key]
        if not isinstance(targets, Tensor):
            raise TargetError(f"ClassificationScorer: field {self.target_key!r} must be a tensor of class indices, "
                              f"got {type(targets).__name__}")
        targets = targets.to(logits.device, non_blocking=True)
        indices_shape = logits.shape[:1] + logits.shape[2:]  # the class dim is 1, as in F.cross_entropy
        integer = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
        if integer and targets.shape == indices_shape:
            targets = targets.long()
            self._check_indices(targets, logits.shape[1], batch)
            return targets
        if targets.is_floating_point() and targets.shape == logits.shape:
            self._check_distributions(targets, batch)
            return targets
        if targets.shape == indices_shape:
            raise TargetError(f"ClassificationScorer: field {self.target_key!r} is {targets.dtype}, but class indices "
                              "must be integers: cast them with .long() (soft labels are a float (B, C) tensor of "
                              "class probabilities)")
        raise TargetError(f"ClassificationScorer: field {self.target_key!r} has shape {tuple(targets.shape)} for "
                          f"logits of shape {tuple(logits.shape)}; give {tuple(indices_shape)} class indices or "
                          f"{tuple(logits.shape)} class probabilities")

    def _check_indices(self, targets: Tensor, classes: int, batch: dict) -> None:
        if not targets.numel():
            return
        low, high = torch.stack(torch.aminmax(targets)).tolist()  # one reduction, one device sync: what a valid
        if low >= 0 and high < classes:  # micro-batch pays; the error path below may take its time
            return
        bad = (targets < 0) | (targets >= classes)
        values = targets[bad].unique().tolist()
        if _IGNORE_INDEX in values:
            ignored = targets == _IGNORE_INDEX
            raise TargetError(f"ClassificationScorer: target {_IGNORE_INDEX} (PyTorch's ignore_index) for "
                              f"{_where(ignored, batch)}: cross-entropy scores it loss 0, which selection would read "
                              "as already learnt; drop those samples before the pipeline or give them a class")
        raise TargetError(f"ClassificationScorer: class indices outside [0, {classes}): "
                          f"{sorted(values, reverse=True)[:10]} for {_where(bad, batch)}; the model has {classes} "
                          "outputs: check the labels (1-based? another label set?) and the model's number of classes")

    def _check_distributions(self, targets: Tensor, batch: dict) -> None:
        if not targets.numel():
            return
        # bf16 soft labels (cast with the inputs for a bf16 copy) sum to 1 only within their rounding
        tol = max(1e-4, 8 * torch.finfo(targets.dtype).eps)
        sums = targets.sum(1, dtype=torch.float32)
        low, off = torch.stack([targets.amin().float(), (sums - 1).abs().amax()]).tolist()  # one device sync
        if low >= 0 and off <= tol:  # NaN fails both comparisons
            return
        bad = (targets < 0).any(1) | ~((sums - 1).abs() <= tol)
        if bad.any():
            raise TargetError(f"ClassificationScorer: float targets in {self.target_key!r} are soft labels, whose "
                              f"rows must be probability distributions (>= 0, summing to 1), but are not for "
                              f"{_where(bad, batch)}; for class indices cast them with .long(); multi-hot "
                              "(multi-label) targets need a scorer with a per-class sigmoid loss "
                              "(F.binary_cross_entropy_with_logits), a custom curate.Scorer")

    def __repr__(self) -> str:
        return (f"ClassificationScorer(input_key={self.input_key!r}, target_key={self.target_key!r}"
                f"{_precision_repr(self.autocast, self.dtype)})")


def _where(bad: Tensor, batch: dict) -> str:
    """'n samples (keys [...])' for a bad mask over a micro-batch (positions in it when samples have no keys)."""
    rows = bad.flatten(1).any(1) if bad.ndim > 1 else bad
    idx = rows.nonzero().flatten().tolist()
    keys = batch.get("__key__")
    named = ([keys[i] for i in idx[:10]], "keys") if keys is not None else (idx[:10], "positions in the micro-batch")
    return f"{len(idx)} samples ({named[1]} {named[0]}{'...' if len(idx) > 10 else ''})"


class _ContrastiveModel(Protocol):
    """The open_clip API `ContrastiveScorer` calls (plus `logit_bias` for the sigmoid loss, which may be absent)."""

    logit_scale: Tensor

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor: ...

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor: ...


class ContrastiveScorer:
    """Image-text embeddings from an open_clip-style model, for sigmoid (SigLIP) or softmax (CLIP) losses.

    Args:
        image_key: the batch field with images (a float tensor the model's `encode_image` takes).
        text_key: the batch field with token ids (what the model's `encode_text` takes).
        loss: "sigmoid" (needs `model.logit_bias`) or "softmax".
        autocast: run the scoring forward under `torch.autocast` in this dtype (e.g. torch.bfloat16; CPU and
            CUDA); None: in the model's own precision.
        dtype: the dtype the images are cast to (token ids stay integers); None: the model's floating dtype
            (its first floating parameter's).
        Both are applied by `score_model`, through which every provider scores; the embeddings are fp32.
    """

    def __init__(self, image_key: str = "image", text_key: str = "text",
                 loss: Literal["sigmoid", "softmax"] = "sigmoid", *,
                 autocast: torch.dtype | None = None, dtype: torch.dtype | None = None):
        if loss not in ("sigmoid", "softmax"):
            raise ValueError(f"ContrastiveScorer: loss must be 'sigmoid' or 'softmax', got {loss=}")
        _check_precision("ContrastiveScorer", autocast, dtype)
        self.image_key, self.text_key, self.loss = image_key, text_key, loss
        self.kind: Kind = loss
        self.keys = (image_key, text_key)
        self.autocast, self.dtype = autocast, dtype

    def __call__(self, model: nn.Module, batch: dict) -> ModelScores:
        device = model_device(model)
        clip = cast(_ContrastiveModel, model)  # duck-typed: any nn.Module with open_clip's API
        # normalised in fp32: a bf16 forward's features would otherwise be rounded to bf16 a second time
        image = F.normalize(self.encode_images(model, batch[self.image_key].to(device, non_blocking=True)).float(),
                            dim=-1)
        text = F.normalize(clip.encode_text(batch[self.text_key].to(device, non_blocking=True)).float(), dim=-1)
        scale = float(clip.logit_scale.float().exp())
        if self.loss == "sigmoid":
            logit_bias = getattr(model, "logit_bias", None)
            if logit_bias is None:
                raise ValueError(
                    "ContrastiveScorer: loss='sigmoid' needs model.logit_bias; build the model with "
                    "init_logit_bias (open_clip: a SigLIP config) or use loss='softmax'"
                )
            bias = float(logit_bias)
        else:
            bias = 0.0
        return ModelScores(self.loss, image, text, scale, bias)

    def encode_images(self, model: nn.Module, images: Tensor) -> Tensor:
        """The image features (not normalised): `model.encode_image`. A subclass may encode otherwise (e.g. some
        rows at another resolution) and the rest of scoring stays the same."""
        return cast(_ContrastiveModel, model).encode_image(images)

    def __repr__(self) -> str:
        return (f"ContrastiveScorer(image_key={self.image_key!r}, text_key={self.text_key!r}, loss={self.loss!r}"
                f"{_precision_repr(self.autocast, self.dtype)})")
