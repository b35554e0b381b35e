"""Models: tiny ones for the embedded digits data, and builders for users' own.

The tiny ones (a CLIP/SigLIP pair model, a CNN and an MLP classifier) are sized so that a forward+backward of
a batch of 64 takes a few milliseconds on 2 CPU cores, which is what lets tests, notebooks and benchmarks
train learner and reference models for real.

Users' own models, each returned as a `Built` (the model, its image transforms, its tokenizer):
`open_clip_model` (an open_clip architecture by name, or a model config JSON), `torchvision_model` (a
torchvision architecture by name) and `from_factory` (the user's own function). Nothing is downloaded:
weights are randomly initialised from the seed in force (`torch.manual_seed`), or read from a local file
(`pretrained`, `read_weights`: safetensors, or a torch state_dict read as data only).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curate.cache import model_hash  # re-exported: the one provenance hash, shared with the score cache

from .extras import MissingExtraError, needs_extra

__all__ = ["tiny_clip", "HashedEmbedding", "small_cnn", "mlp", "Built", "open_clip_model", "torchvision_model",
           "from_factory", "read_weights", "check_weights_fit", "model_hash", "zero_shot_accuracy", "eval_mode"]

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


@dataclass
class Built:
    """A model and what feeds it.

    Attributes:
        model: the torch module.
        preprocess_train: PIL.Image → float tensor (C, H, W), with the training augmentation; None when the
            data layer makes the tensors itself.
        preprocess_val: the same without augmentation (evaluation, scoring).
        tokenizer: list[str] → LongTensor (N, L) of token ids, for image-text models; None otherwise.
    """

    model: nn.Module
    preprocess_train: Callable | None = None
    preprocess_val: Callable | None = None
    tokenizer: Callable | None = None


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in a local weights file, read as data only.

    A `.safetensors` file, or a torch file read with `torch.load(..., weights_only=True)` (so a planted pickle
    cannot run code): a plain state_dict, or a dict holding it under "state_dict" (open_clip_train's checkpoints)
    or "model" (curate's run checkpoints). A "module." prefix on every name (DistributedDataParallel) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.pretrained: no weights file at {str(path)!r}; give the path of a local "
                         ".safetensors or torch state_dict file (curate downloads no weights)")
    if path.suffix == ".safetensors":
        with needs_extra("model.pretrained (.safetensors)"):
            from safetensors.torch import load_file
        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorError: a damaged or foreign file
            raise ValueError(f"model.pretrained: {path} is not a readable .safetensors file ({error})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError for a foreign object; RuntimeError / EOFError for a damaged file
            reason = (str(error).strip().splitlines() or [""])[0][:200]
            raise ValueError(f"model.pretrained: {path} is not a weights file curate can load safely "
                             f"({type(error).__name__}: {reason}); save the weights alone, as "
                             "torch.save(model.state_dict(), path) or safetensors.torch.save_file") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"model.pretrained: {path} holds no state_dict (a dict of parameter names to tensors, "
                         "alone or under 'state_dict' or 'model'); save it as torch.save(model.state_dict(), path)")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_weights_fit(model: nn.Module, weights: dict, source: str, fix: str) -> None:
    """Names the first parameter whose name or shape differs (load_state_dict's error lists them all, unsorted).

    `source` starts the message (e.g. "reference: runs/ref/model.safetensors"), `fix` ends it."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in weights:
            raise ValueError(f"{source} has no parameter {name!r}, which the recipe's model has; {fix}")
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{source} has {name!r} of shape {tuple(weights[name].shape)}, the recipe's model "
                             f"{tuple(tensor.shape)}; {fix}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ValueError(f"{source} has parameters the recipe's model lacks ({extra[:3]}"
                         f"{'...' if len(extra) > 3 else ''}); {fix}")


@torch.no_grad()
def _load_pretrained(model: nn.Module, pretrained: str | Path, what: str) -> None:
    weights = read_weights(pretrained)
    check_weights_fit(model, weights, f"model.pretrained: {pretrained}",
                      f"they are weights of another model: give the weights of {what}, or the model they were "
                      "trained as")
    model.load_state_dict(weights)


# create_model_and_transforms' keywords that load or download weights, or that curate sets itself
_OPEN_CLIP_REFUSED = {"model_name", "pretrained", "load_weights", "pretrained_image", "pretrained_text",
                      "pretrained_image_path", "pretrained_text_path", "cache_dir", "weights_only",
                      "require_pretrained", "cast_dtype"}


def _read_open_clip_config(path: str) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of a config JSON: open_clip's model config ({"embed_dim", "vision_cfg",
    "text_cfg", ...}) or the hub's open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...})."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"model.config: no model config JSON at {str(file)!r}")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"model.config: {file} is not JSON ({error})") from None
    if isinstance(config, dict) and isinstance(config.get("model_cfg"), dict):
        return config["model_cfg"], dict(config.get("preprocess_cfg") or {})
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg")
               if not isinstance(config, dict) or key not in config]
    if missing:
        raise ValueError(f"model.config: {file} is not an open_clip model config (it lacks {missing}); write "
                         '{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}} as in open_clip\'s model_configs')
    return config, {}


_DOWNLOAD_FIX = ("curate downloads nothing at run time; use model.kind: factory with a function that builds the "
                 "model and returns a pipelines.models.Built with its tokenizer")


def _open_clip_downloads(model_cfg: dict, where: str) -> None:
    """A ValueError for an architecture open_clip can only build or tokenize with a download from the HF hub."""
    text_cfg = model_cfg.get("text_cfg", {})
    fix = _DOWNLOAD_FIX
    if text_cfg.get("hf_model_name"):
        raise ValueError(f"{where}: its text tower is the Hugging Face model {text_cfg['hf_model_name']!r}, which "
                         f"open_clip downloads to build; {fix}")
    if text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"{where}: its tokenizer is the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}, "
                         f"which needs a download; {fix}")


def open_clip_model(name: str | None = None, *, config: str | None = None, pretrained: str | None = None,
                    **options: Any) -> Built:
    """An open_clip model with open_clip's own image transforms and tokenizer, built without any download.

    Args:
        name: an open_clip architecture (`open_clip.list_models()`, e.g. "ViT-B-32"), randomly initialised.
        config: instead of `name`, the path of a model config JSON for an architecture open_clip does not
            list: open_clip's format ({"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}) or the hub's
            open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}). open_clip's registry is left as
            it was (the config is built through a temporary `local-dir:`).
        pretrained: a local weights file loaded into the model (`read_weights`); its names and shapes must be
            the model's exactly.
        options: keywords of `open_clip.create_model_and_transforms` (e.g. force_image_size, force_context_length,
            aug_cfg, image_mean) or of the model class (e.g. init_logit_bias, quick_gelu); not those that load or
            download weights.

    Returns: a `Built` with preprocess_train/preprocess_val as `create_model_and_transforms` makes them and the
    CLIP BPE tokenizer (`open_clip.get_tokenizer`) at the model's context length. Architectures whose text tower
    or tokenizer comes from the Hugging Face hub (the SigLIP family, hf_model_name or hf_tokenizer_name in the
    text_cfg) need a download and are a ValueError: build those in a factory.
    """
    with needs_extra("open_clip_model"):
        import open_clip
        from open_clip.coca_model import CoCa

    if (name is None) == (config is None):
        raise ValueError("open_clip_model: give exactly one of model.name (an open_clip architecture) or "
                         f"model.config (a model config JSON), got name={name!r} config={config!r}")
    if name is not None:
        where = f"model.name: {name}"
        if name not in open_clip.list_models():
            raise ValueError(f"model.name: open_clip has no model {name!r}"
                             f"{_did_you_mean(name, open_clip.list_models())} Give model.name: one of "
                             "open_clip.list_models(); or give model.config, a model config JSON")
        model_cfg, preprocess_cfg = open_clip.get_model_config(name), {}
        if "siglip" in name.lower():  # open_clip.get_tokenizer gives every SigLIP name a tokenizer from the hub
            raise ValueError(f"{where}: its tokenizer is a SigLIP tokenizer from the Hugging Face hub, which needs "
                             f"a download; {_DOWNLOAD_FIX}")
    else:
        where = f"model.config: {config}"
        model_cfg, preprocess_cfg = _read_open_clip_config(str(config))
    _open_clip_downloads(model_cfg, where)

    refused = sorted(set(options) & _OPEN_CLIP_REFUSED)
    if refused:
        raise ValueError(f"model.options: {refused} would load or download weights, or are curate's to set; give "
                         "model.pretrained, a local weights file, for weights")
    custom_text = model_cfg.get("custom_text") or options.get("force_custom_text")
    model_class = open_clip.CLIP
    if custom_text:
        model_class = CoCa if "multimodal_cfg" in model_cfg else open_clip.CustomTextCLIP
    takes = (set(inspect.signature(open_clip.create_model_and_transforms).parameters)
             | set(inspect.signature(model_class.__init__).parameters)) - _OPEN_CLIP_REFUSED - {"self", "model_kwargs"}
    unknown = sorted(set(options) - takes)
    if unknown:
        hints = "".join(_did_you_mean(option, takes) for option in unknown)
        raise ValueError(f"model.options: open_clip_model cannot take {unknown}{hints} It takes "
                         f"{sorted(takes)}")

    with tempfile.TemporaryDirectory(prefix="curate-open-clip-") as folder:
        if name is not None:
            source = name
        else:  # open_clip's local-dir: schema reads a config without registering it (the folder holds no weights)
            Path(folder, "open_clip_config.json").write_text(
                json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
            source = f"local-dir:{folder}"
        with _quiet_about_weights():
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                source, pretrained=None, load_weights=False, pretrained_image=False, pretrained_text=False, **options)
        context_length = getattr(model, "context_length", None)
        tokenizer = open_clip.get_tokenizer(source, context_length=context_length)
    vocab_size = getattr(model, "vocab_size", None)
    if vocab_size is not None and vocab_size < tokenizer.vocab_size:
        raise ValueError(f"{where}: text_cfg.vocab_size {vocab_size} is below the CLIP BPE tokenizer's "
                         f"{tokenizer.vocab_size} ids, which would index past the token embedding; set vocab_size "
                         f"to {tokenizer.vocab_size}, or build the model in a factory with your own tokenizer")
    if pretrained is not None:
        _load_pretrained(model, pretrained, f"open_clip {name or config}")
    return Built(model, preprocess_train, preprocess_val, tokenizer)


class _NoWeightsWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "No pretrained weights loaded" not in message and "no CLIP weights found" not in message


@contextmanager
def _quiet_about_weights() -> Iterator[None]:
    """Drops open_clip's root-logger warnings that a model was built without weights: curate builds it so on
    purpose (weights come from model.pretrained or a checkpoint), and the warning reads as a failure."""
    root, quiet = logging.getLogger(), _NoWeightsWarnings()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


# torchvision builders' keywords that download weights, or that curate sets itself
_TORCHVISION_REFUSED = {"weights", "weights_backbone"}


def torchvision_model(name: str, *, pretrained: str | None = None, **options: Any) -> Built:
    """A torchvision architecture (`torchvision.models.list_models()`, e.g. "resnet18"), randomly initialised:
    `torchvision.models.get_model(name, weights=None, **options)` (options e.g. num_classes=10), with no backbone
    weights either. `pretrained`: a local weights file loaded into it (`read_weights`).

    Returns: a `Built` without transforms (the data layer makes the tensors at the recipe's image size) or
    tokenizer."""
    try:
        import torchvision.models as tv_models
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] != "torchvision":
            raise
        raise MissingExtraError("torchvision_model needs torchvision, which is not installed: "
                                "pip install torchvision") from error

    names = tv_models.list_models()
    if name not in names:
        raise ValueError(f"model.name: torchvision has no model {name!r}{_did_you_mean(name, names)} Give "
                         "model.name: one of torchvision.models.list_models()")
    refused = sorted(set(options) & _TORCHVISION_REFUSED)
    if refused:
        raise ValueError(f"model.options: {refused} would download weights; give model.pretrained, a local "
                         "weights file, for weights")
    builder = tv_models.get_model_builder(name)
    parameters = inspect.signature(builder).parameters
    kwargs = dict(options)
    if "weights_backbone" in parameters:  # detection/segmentation builders default to downloading one
        kwargs["weights_backbone"] = None
    try:
        model = builder(weights=None, **kwargs)
    except TypeError as error:  # the builders pass **kwargs on to the model class, which names the one it lacks
        if not any(f"'{option}'" in str(error) for option in options):
            raise
        raise ValueError(f"model.options: torchvision {name} cannot take {sorted(options)} ({error})") from error
    if pretrained is not None:
        _load_pretrained(model, pretrained, f"torchvision {name}")
    return Built(model)


@torch.no_grad()
def from_factory(spec: str, options: dict, *, image_size: int | None) -> Built:
    """What `spec` ("package.module:function") returns for `options`, plus `image_size` when the function
    takes it, as a `Built`. The function may return a torch module, a tuple like open_clip's
    `create_model_and_transforms`: (model, preprocess_train, preprocess_val), or (model, preprocess) for both,
    or a `Built` (full control, a tokenizer included). Every way this can go wrong is a ValueError naming the
    factory and the fix."""
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
        if "image_size" in signature.parameters and "image_size" not in kwargs and image_size is not None:
            kwargs["image_size"] = image_size
        try:
            signature.bind(**kwargs)
        except TypeError as error:  # checked before the call, so a TypeError inside the factory stays its own
            raise ValueError(f"model.factory: {spec}{signature} cannot take model.options {sorted(options)} "
                             f"({error})") from error
    result = function(**kwargs)
    return _as_built(result, spec)


def _as_built(result: object, spec: str) -> Built:
    fix = ("return the model itself, (model, preprocess), (model, preprocess_train, preprocess_val) or a "
           "pipelines.models.Built")
    if isinstance(result, Built):
        built = result
    elif isinstance(result, nn.Module):
        built = Built(result)
    elif isinstance(result, tuple) and len(result) in (2, 3):
        built = Built(result[0], result[1], result[-1])
    else:
        kind = f"tuple of {len(result)}" if isinstance(result, tuple) else type(result).__name__
        raise ValueError(f"model.factory: {spec} returned a {kind}, not a torch.nn.Module; {fix}")
    if not isinstance(built.model, nn.Module):
        raise ValueError(f"model.factory: {spec} returned a {type(built.model).__name__} as its model, not a "
                         f"torch.nn.Module; {fix}")
    for field in ("preprocess_train", "preprocess_val", "tokenizer"):
        value = getattr(built, field)
        if value is not None and not callable(value):
            raise ValueError(f"model.factory: {spec} returned a {type(value).__name__} as its {field}, which is not "
                             f"callable; {fix}")
    return built


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
