"""What a recipe's task needs, in one place: data, models, the training loss, scorer and evaluation.

Two tasks on the embedded digits data: "pairs" (image-text, a tiny CLIP/SigLIP: the JEST family) and
"digits" (noisy-label classification, a small CNN/MLP: the RHO-LOSS family).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

import curate
from curate.files import atomic_write, write_json

from . import data as digits_data
from . import models
from .recipe import ModelConfig, Recipe

__all__ = ["resolve_device", "manifest", "shard_urls", "load_split", "build_model", "scorer_for", "train_loss",
           "evaluate", "in_memory_batches", "MissingDataError",
           "PatchDropoutScorer", "actor_loss"]


class MissingDataError(FileNotFoundError):
    """Data a recipe points at is not there; the message says which and how to make it."""


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' was requested but no CUDA device is available; "
                           "use device: auto (or cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def manifest(recipe: Recipe) -> dict:
    import fsspec

    root = recipe.data.root.rstrip("/")
    try:
        with fsspec.open(f"{root}/manifest.json", "rt", **recipe.data.storage_options) as stream:
            return json.load(stream)
    except FileNotFoundError:
        raise MissingDataError(
            f"data.root: no dataset at {root!r} (no manifest.json); make it with `curate data digits {root}` "
            "or set prepare: true in the recipe"
        ) from None


def shard_urls(recipe: Recipe, split: str) -> list[str]:
    manifest(recipe)  # a clear error when the data is missing
    return digits_data.shard_urls(recipe.data.root, recipe.data.dataset, split,
                                  storage_options=recipe.data.storage_options)


def load_split(recipe: Recipe, split: str):
    """The samples of one split as a re-iterable webdataset pipeline."""
    urls = shard_urls(recipe, split)
    if recipe.data.dataset == "pairs":
        return digits_data.load_pairs(urls, storage_options=recipe.data.storage_options)
    return digits_data.load_digits(urls, storage_options=recipe.data.storage_options)


def build_model(cfg: ModelConfig, recipe: Recipe, seed: int) -> nn.Module:
    """A fresh model of `cfg`, initialised from `seed` (the same seed gives the same weights)."""
    image_size = manifest(recipe)["image_size"]
    torch.manual_seed(seed)
    if cfg.kind == "tiny_clip":
        if recipe.data.dataset != "pairs":
            raise ValueError("model.kind: tiny_clip needs data.dataset: pairs; use small_cnn or mlp for digits")
        return models.tiny_clip(cfg.loss, image_size=image_size, **cfg.options)
    if recipe.data.dataset != "digits":
        raise ValueError(f"model.kind: {cfg.kind} is a classifier; it needs data.dataset: digits")
    builder = models.small_cnn if cfg.kind == "small_cnn" else models.mlp
    return builder(10, image_size=image_size, **cfg.options)


def scorer_for(recipe: Recipe, cfg: ModelConfig | None = None, *, patch_dropout: float = 0.0):
    cfg = cfg or recipe.model
    if recipe.data.dataset == "pairs":
        if patch_dropout:
            return PatchDropoutScorer(patch_dropout, seed=recipe.train.seed, loss=cfg.loss)
        return curate.ContrastiveScorer(image_key="image", text_key="text", loss=cfg.loss)
    return curate.ClassificationScorer(input_key="image", target_key="target")


class PatchDropoutScorer(curate.ContrastiveScorer):
    """Flexi-JEST's cheaper scoring pass: the image tower sees a random `prob` share of its patches dropped.

    open_clip's PatchDropout only acts in train mode, and scoring runs in eval mode, so it is switched on
    for the scoring forward alone. The patches dropped are seeded by (seed, the batch's first key), so a
    resumed run drops the same ones. The FLOP ledger measures the cheaper forward.
    """

    def __init__(self, prob: float, seed: int = 0, **kwargs):
        super().__init__(image_key="image", text_key="text", **kwargs)
        self.prob, self.seed = prob, seed
        self.full = curate.ContrastiveScorer(image_key="image", text_key="text", **kwargs)  # for training FLOPs

    def __call__(self, model: nn.Module, batch: dict):
        from open_clip.transformer import PatchDropout

        visual = model.visual
        original = visual.patch_dropout
        visual.patch_dropout = PatchDropout(self.prob).train()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(curate.derive_seed(self.seed, "patch_dropout", batch["__key__"][0]))
                return super().__call__(model, batch)
        finally:
            visual.patch_dropout = original

    def __repr__(self) -> str:
        return f"PatchDropoutScorer(prob={self.prob}, loss={self.loss!r})"


def actor_loss(cfg: ModelConfig):
    """Per-example training losses with grad for an ACL actor (logit scale and bias trained too)."""
    def loss(model: nn.Module, batch: dict) -> torch.Tensor:
        if cfg.kind != "tiny_clip":
            return F.cross_entropy(model(batch["image"]), batch["target"], reduction="none")
        from curate.losses import sigmoid_example_losses, softmax_example_losses

        device = next(model.parameters()).device
        image = model.encode_image(batch["image"].to(device), normalize=True)
        text = model.encode_text(batch["text"].to(device), normalize=True)
        if cfg.loss == "sigmoid":
            return sigmoid_example_losses(image, text, model.logit_scale.exp(), model.logit_bias)
        return softmax_example_losses(image, text, model.logit_scale.exp())
    return loss


def train_loss(model: nn.Module, batch: dict, cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """The batch loss the model trains on: SigLIP / CLIP (open_clip's own losses) or cross-entropy."""
    if cfg.kind == "tiny_clip":
        from open_clip.loss import ClipLoss, SigLipLoss

        image = model.encode_image(batch["image"].to(device), normalize=True)
        text = model.encode_text(batch["text"].to(device), normalize=True)
        if cfg.loss == "sigmoid":
            return SigLipLoss()(image, text, model.logit_scale.exp(), model.logit_bias)
        return ClipLoss()(image, text, model.logit_scale.exp())
    return F.cross_entropy(model(batch["image"].to(device)), batch["target"].to(device))


def in_memory_batches(samples, batch_size: int = 512) -> list[dict]:
    """A (small) split collated into batches once, for repeated evaluation."""
    out, chunk = [], []
    for sample in samples:
        chunk.append({k: v for k, v in sample.items() if k not in ("caption", "noise")})
        if len(chunk) == batch_size:
            out.append(default_collate(chunk))
            chunk = []
    if chunk:
        out.append(default_collate(chunk))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict], cfg: ModelConfig, device: torch.device) -> dict:
    """Pairs: zero-shot accuracy (10 class prompts) and image→text R@1 (the top caption is of the same
    digit; captions repeat across images, so the exact caption is not asked for). Digits: accuracy."""
    was_training = model.training
    model.eval()
    try:
        if cfg.kind != "tiny_clip":
            correct = sum(int((model(b["image"].to(device)).argmax(1).cpu() == b["label"]).sum()) for b in batches)
            return {"accuracy": correct / sum(len(b["label"]) for b in batches)}
        images = torch.cat([model.encode_image(b["image"].to(device), normalize=True) for b in batches])
        texts = torch.cat([model.encode_text(b["text"].to(device), normalize=True) for b in batches])
        labels = torch.cat([b["label"] for b in batches]).to(device)
        r1 = torch.cat([labels[(images[i:i + 1024] @ texts.T).argmax(1)] for i in range(0, len(images), 1024)])
        return {"accuracy": models.zero_shot_accuracy(model, batches), "r1": float((r1 == labels).float().mean())}
    finally:
        model.train(was_training)


def save_model(model: nn.Module, path: Path, info: dict) -> None:
    """Weights as safetensors plus a JSON of config, hash and evaluation, each written atomically."""
    from safetensors.torch import save

    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / "model.safetensors") as stream:
        stream.write(save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    write_json(path / "model.json", {**info, "hash": models.model_hash(model)})


def load_model(path: Path, recipe: Recipe, cfg: ModelConfig) -> tuple[nn.Module, dict]:
    from safetensors.torch import load_file

    if not (path / "model.safetensors").is_file():
        raise MissingDataError(f"reference: no trained reference at {str(path)!r}; train it with "
                               "`curate train-reference RECIPE` or set prepare: true in the recipe")
    info = json.loads((path / "model.json").read_text())
    model = build_model(cfg, recipe, seed=0)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    if models.model_hash(model) != info["hash"]:
        raise ValueError(f"reference: {path}/model.safetensors does not match the hash in model.json; "
                         "retrain it with `curate train-reference RECIPE`")
    return model.eval(), info
