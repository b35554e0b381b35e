"""What a recipe's task needs, in one place: data, models, the scorer, the training loss and evaluation.

A task is an object in one registry, `TASKS`, named by the recipe's `data.dataset`; jobs look their task
up once (`task_of(recipe)`) and ask it, instead of switching on the name. Two tasks on the embedded digits
data: "pairs" (image-text, a tiny CLIP/SigLIP: the JEST family, `pipelines.task_pairs`) and "digits"
(noisy-label classification, a small CNN/MLP: the RHO-LOSS family, `pipelines.task_digits`). A new task is
a class with the `Task` methods and an entry in `TASKS` (and in the recipe's `data.dataset` choices).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, cast

import torch
from torch import nn
from torch.utils.data import default_collate

from curate.files import atomic_write, write_json

from . import data as digits_data
from . import models
from .extras import needs_extra
from .recipe import ModelConfig, Recipe
from .task_digits import DigitsTask
from .task_pairs import PairsTask, PatchDropoutScorer

__all__ = ["MissingDataError", "PatchDropoutScorer", "TASKS", "Task", "build_model", "get_task", "in_memory_batches",
           "load_model", "load_split", "manifest", "resolve_device", "save_model", "scorer_for", "shard_urls",
           "task_of"]


class Task(Protocol):
    """What the jobs ask of a task. `cfg` is a recipe's `ModelConfig` (the learner's, the reference's or the
    actor's), always of one of the task's `models`.

    Attributes:
        name: the `data.dataset` value, also the dataset's folder in the data's manifest.
        models: `model.kind` → builder(cfg, image_size) of a fresh model (initialised from torch's global RNG).
    """

    name: str

    @property
    def models(self) -> Mapping[str, Callable[[ModelConfig, int], nn.Module]]: ...

    def load(self, urls: str | Sequence[str], *, storage_options: dict | None = None) -> Iterable[dict]:
        """The samples of these shards, decoded, in shard order (re-iterable)."""
        ...

    def scorer(self, cfg: ModelConfig, *, patch_dropout: float = 0.0, seed: int = 0):
        """The curate scorer for a model of `cfg` (`patch_dropout`: Flexi-JEST's cheaper pass, if it has one)."""
        ...

    def train_loss(self, model: nn.Module, batch: dict, cfg: ModelConfig, device: torch.device) -> torch.Tensor:
        """The batch loss the model trains on."""
        ...

    def actor_loss(self, cfg: ModelConfig) -> Callable[[nn.Module, dict], torch.Tensor]:
        """Per-example training losses, with grad, for an ACL actor of `cfg`."""
        ...

    def evaluate(self, model: nn.Module, batches: list[dict], cfg: ModelConfig, device: torch.device) -> dict:
        """Test metrics ("accuracy" always) over collated batches; leaves the model in the mode it found it in."""
        ...


TASKS: dict[str, Task] = {"pairs": PairsTask(), "digits": DigitsTask()}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"data.dataset: unknown task {name!r}; the tasks are {sorted(TASKS)}") from None


def task_of(recipe: Recipe) -> Task:
    """The recipe's task (its `data.dataset`)."""
    return get_task(recipe.data.dataset)


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
    from curate.files import read_bytes

    root = recipe.data.root.rstrip("/")
    try:
        return json.loads(read_bytes(f"{root}/manifest.json", recipe.data.storage_options))
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
    return task_of(recipe).load(shard_urls(recipe, split), storage_options=recipe.data.storage_options)


def build_model(cfg: ModelConfig, recipe: Recipe, seed: int) -> nn.Module:
    """A fresh model of `cfg`, initialised from `seed` (the same seed gives the same weights)."""
    image_size = manifest(recipe)["image_size"]
    task = task_of(recipe)
    if cfg.kind == "factory":
        torch.manual_seed(seed)
        return models.from_factory(cast(str, cfg.factory), cfg.options, image_size=image_size)
    if cfg.kind not in task.models:
        owners = [name for name, other in TASKS.items() if cfg.kind in other.models]
        raise ValueError(f"model.kind: {cfg.kind} is a model of data.dataset: {' or '.join(owners)}, not "
                         f"{task.name}; the models of {task.name} are {list(task.models)}")
    torch.manual_seed(seed)
    return task.models[cfg.kind](cfg, image_size)


def _check_weights_fit(model: nn.Module, weights: dict, path: Path) -> None:
    """Names the first parameter whose name or shape differs (load_state_dict's error lists them all, unsorted)."""
    expected = model.state_dict()
    fix = ("it was trained for another model: retrain it with `curate train-reference RECIPE`, or set "
           "reference.model to the architecture it was trained with")
    for name, tensor in expected.items():
        if name not in weights:
            raise ValueError(f"reference: {path}/model.safetensors has no parameter {name!r}, which the recipe's "
                             f"model has; {fix}")
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise ValueError(f"reference: {path}/model.safetensors has {name!r} of shape {tuple(weights[name].shape)}"
                             f", the recipe's model {tuple(tensor.shape)}; {fix}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ValueError(f"reference: {path}/model.safetensors has parameters the recipe's model lacks "
                         f"({extra[:3]}{'...' if len(extra) > 3 else ''}); {fix}")


def scorer_for(recipe: Recipe, cfg: ModelConfig | None = None, *, patch_dropout: float = 0.0):
    """The task's scorer for `cfg` (default: the learner's model), seeded by train.seed where it draws."""
    return task_of(recipe).scorer(cfg or recipe.model, patch_dropout=patch_dropout, seed=recipe.train.seed)


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


def save_model(model: nn.Module, path: Path, info: dict) -> None:
    """Weights as safetensors plus a JSON of config, hash and evaluation, each written atomically."""
    with needs_extra("saving a model"):
        from safetensors.torch import save

    path.mkdir(parents=True, exist_ok=True)
    with atomic_write(path / "model.safetensors") as stream:
        stream.write(save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    write_json(path / "model.json", {**info, "hash": models.model_hash(model)})


def load_model(path: Path, recipe: Recipe, cfg: ModelConfig) -> tuple[nn.Module, dict]:
    with needs_extra("loading a model"):
        from safetensors.torch import load_file

    if not (path / "model.safetensors").is_file():
        raise MissingDataError(f"reference: no trained reference at {str(path)!r}; train it with "
                               "`curate train-reference RECIPE` or set prepare: true in the recipe")
    info = json.loads((path / "model.json").read_text())
    model = build_model(cfg, recipe, seed=0)
    weights = load_file(str(path / "model.safetensors"))
    _check_weights_fit(model, weights, path)
    model.load_state_dict(weights)
    if models.model_hash(model) != info["hash"]:
        raise ValueError(f"reference: {path}/model.safetensors does not match the hash in model.json; "
                         "retrain it with `curate train-reference RECIPE`")
    return model.eval(), info
