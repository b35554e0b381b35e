"""What a recipe's task needs, in one place: data, models, the scorer, the training loss and evaluation.

A task is an object in one registry, `TASKS`, named by the recipe's `data.dataset`; jobs look their task
up once (`task_of(recipe)`) and ask it, instead of switching on the name. Two tasks on the embedded digits
data: "pairs" (image-text, a tiny CLIP/SigLIP: the JEST family, `pipelines.task_pairs`) and "digits"
(noisy-label classification, a small CNN/MLP: the RHO-LOSS family, `pipelines.task_digits`). A new task is
a class with the `Task` methods and an entry in `TASKS` (and in the recipe's `data.dataset` choices).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, cast

import torch
from torch import nn
from torch.utils.data import default_collate

from curate.files import atomic_write, write_json

from . import data as digits_data
from . import models, web
from .extras import needs_extra
from .recipe import FlexiConfig, ModelConfig, Recipe
from .task_digits import DigitsTask
from .task_pairs import PairsTask
from .task_web import WebTask

__all__ = ["GENERIC_KINDS", "MissingDataError", "TASKS", "Task", "build_model", "check_data",
           "dataset_identity", "get_task", "image_size", "in_memory_batches", "load_model", "load_reference",
           "load_split", "manifest", "own_data", "reference_hash", "resolve_device", "save_model", "scorer_for",
           "shard_counts", "shard_urls", "task_of"]


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

    def scorer(self, cfg: ModelConfig, *, flexi: FlexiConfig | None = None):
        """The curate scorer for a model of `cfg`; with `flexi`, the scorer of Flexi-JEST's mixed-resolution
        training forward (what the FLOP ledger measures for training), for tasks that support it."""
        ...

    def train_loss(self, model: nn.Module, batch: dict, cfg: ModelConfig, device: torch.device, *,
                   flexi: FlexiConfig | None = None) -> torch.Tensor:
        """The batch loss the model trains on (with `flexi`: at Flexi-JEST's mixed resolution)."""
        ...

    def actor_loss(self, cfg: ModelConfig) -> Callable[[nn.Module, dict], torch.Tensor]:
        """Per-example training losses, with grad, for an ACL actor of `cfg`."""
        ...

    def evaluate(self, model: nn.Module, batches: list[dict], cfg: ModelConfig, device: torch.device) -> dict:
        """Test metrics ("accuracy" always) over collated batches; leaves the model in the mode it found it in."""
        ...


TASKS: dict[str, Task] = {"pairs": PairsTask(), "digits": DigitsTask(), "web": WebTask()}
# model kinds any task builds: their interface is the user's to fit to the task
GENERIC_KINDS = ("open_clip", "torchvision", "factory")


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"data.dataset: unknown task {name!r}; the tasks are {sorted(TASKS)}") from None


def own_data(recipe: Recipe) -> bool:
    """Whether the recipe reads your own shards (data.format webdataset | parquet), not the embedded digits."""
    return recipe.data.format != "digits"


def task_of(recipe: Recipe) -> Task:
    """The recipe's task: the embedded dataset's (data.dataset), or for your own shards the data.task reading
    them with the learner's preprocessing and tokenizer (built once per data, eval and model section)."""
    if not own_data(recipe):
        return get_task(recipe.data.dataset)
    return _shards_task(recipe.data.model_dump_json(), recipe.eval.model_dump_json(), recipe.model.model_dump_json())


@functools.lru_cache(maxsize=8)
def _shards_task(data_json: str, eval_json: str, model_json: str) -> Task:
    from .recipe import DataConfig, EvalConfig
    from .task_shards import shards_task

    data, cfg = DataConfig.model_validate_json(data_json), ModelConfig.model_validate_json(model_json)
    with torch.random.fork_rng(devices=[]):  # building the model for its preprocessing draws no run's randomness
        built = _built(cfg, data.task_name, data.image_size)
    length = getattr(built.model, "context_length", None)
    return cast(Task, shards_task(data, EvalConfig.model_validate_json(eval_json), built, data.image_size, length))


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
    """The embedded dataset's manifest.json (data.format: digits)."""
    from curate.files import read_bytes

    if own_data(recipe):
        raise ValueError(f"data.format {recipe.data.format}: your own shards have no manifest (it is the embedded "
                         "digits data's)")
    root = recipe.data.root.rstrip("/")
    try:
        made = json.loads(read_bytes(f"{root}/manifest.json", recipe.data.storage_options))
    except FileNotFoundError:
        raise MissingDataError(
            f"data.root: no dataset at {root!r} (no manifest.json); make it with "
            f"`curate data {'web' if recipe.data.dataset == 'web' else 'digits'} {root}` "
            "or set prepare: true in the recipe"
        ) from None
    if recipe.data.dataset == "web" and (version := made.get("web", {}).get("version", 1)) != web.VERSION:
        # its concepts are not this code's prompts
        raise ValueError(f"data.root: the web world at {root!r} is version {version}, this curate reads version "
                         f"{web.VERSION} (other concepts); move it aside and remake it with `curate data web {root}`")
    return made


def check_data(recipe: Recipe) -> None:
    """Fails, naming what is missing and how to make or fix it, when the recipe's train data is not there."""
    if own_data(recipe):
        shard_urls(recipe, "train")
    else:
        manifest(recipe)


SPLIT_KEYS = {"train": "train", "curated": "curated", "test": "eval"}  # a split → its data.* key of own shards


def shard_urls(recipe: Recipe, split: str) -> list[str]:
    """The shards of a split ("train", "curated" or "test": your own shards' data.eval), in order."""
    if own_data(recipe):
        key = SPLIT_KEYS[split]
        urls = getattr(recipe.data, key)
        if urls is None:
            raise MissingDataError(f"data.{key}: the recipe gives no {key} shards; "
                                   + ("give the clean data the reference trains on, or a trained reference as "
                                      "reference.checkpoint" if key == "curated" else "give their URLs"))
        return _expanded(json.dumps(urls), json.dumps(recipe.data.storage_options, sort_keys=True), f"data.{key}")
    manifest(recipe)  # a clear error when the data is missing
    return digits_data.shard_urls(recipe.data.root, recipe.data.dataset, split,
                                  storage_options=recipe.data.storage_options)


@functools.lru_cache(maxsize=32)
def _expanded(urls_json: str, options_json: str, what: str) -> list[str]:
    from .shards import expand

    return expand(json.loads(urls_json), json.loads(options_json), what=what)


def shard_counts(recipe: Recipe) -> list[int | None]:
    """Samples per train shard as the manifest lists them (None each for your own shards: not known ahead)."""
    if own_data(recipe):
        return [None] * len(shard_urls(recipe, "train"))
    return [shard["count"] for shard in manifest(recipe)[recipe.data.dataset]["splits"]["train"]["shards"]]


def dataset_identity(recipe: Recipe) -> str:
    """The train split's identity, recorded in every cache part: the embedded dataset's name and a hash of its
    manifest's shard list (paths, counts, sha256 of each shard: the same data wherever it lives); for your own
    shards the task and a hash of the format, field map, the pixels' preprocessing (data.transforms,
    data.image_size) and shard URLs (shards rewritten in place under the same URLs are not told apart: rescore
    with `curate precompute --overwrite`)."""
    if own_data(recipe):
        what = {"format": recipe.data.format, "fields": recipe.data.fields.model_dump(),
                "transforms": recipe.data.transforms, "image_size": recipe.data.image_size,
                "urls": shard_urls(recipe, "train")}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
        return f"{recipe.data.task}/train:{digest}"
    shards = manifest(recipe)[recipe.data.dataset]["splits"]["train"]["shards"]
    digest = hashlib.sha256(json.dumps(shards, sort_keys=True).encode()).hexdigest()[:16]
    return f"{recipe.data.dataset}/train:{digest}"


def load_split(recipe: Recipe, split: str):
    """The samples of one split as a re-iterable webdataset pipeline."""
    return task_of(recipe).load(shard_urls(recipe, split), storage_options=recipe.data.storage_options)


def image_size(recipe: Recipe) -> int | None:
    """The side of the data's images: the manifest's, or your own data's data.image_size (None if not given)."""
    return recipe.data.image_size if own_data(recipe) else manifest(recipe)["image_size"]


def build_model(cfg: ModelConfig, recipe: Recipe, seed: int) -> nn.Module:
    """A fresh model of `cfg`, initialised from `seed` (the same seed gives the same weights)."""
    torch.manual_seed(seed)
    return _built(cfg, recipe.data.task_name, image_size(recipe)).model


def _built(cfg: ModelConfig, task_name: str, size: int | None) -> models.Built:
    """A model of `cfg` with what it brings (preprocessing, tokenizer), from torch's global RNG."""
    if cfg.kind == "open_clip":
        options = dict(cfg.options)
        if cfg.loss == "sigmoid" and task_name in ("contrastive", "pairs"):  # SigLIP's initial t = 10, b = -10
            options.setdefault("init_logit_bias", -10.0)
            options.setdefault("init_logit_scale", math.log(10.0))
        return models.open_clip_model(cfg.name, config=cfg.config, pretrained=cfg.pretrained, **options)
    if cfg.kind == "torchvision":
        return models.torchvision_model(cast(str, cfg.name), pretrained=cfg.pretrained, **cfg.options)
    if cfg.kind == "factory":
        return models.from_factory(cast(str, cfg.factory), cfg.options, image_size=size)
    task = get_task({"contrastive": "pairs", "classification": "digits"}.get(task_name, task_name))
    if cfg.kind not in task.models:
        owners = [name for name, other in TASKS.items() if cfg.kind in other.models]
        raise ValueError(f"model.kind: {cfg.kind} is a model of data.dataset: {' or '.join(owners)}, not "
                         f"{task_name}; the models of {task_name} are {[*task.models, *GENERIC_KINDS]}")
    if size is None:
        raise ValueError(f"data.image_size: model.kind {cfg.kind} is built for the data's image size; give it, "
                         "e.g. data.image_size: 32")
    return models.Built(task.models[cfg.kind](cfg, size))


_REFERENCE_FIX = ("it was trained for another model: retrain it with `curate train-reference RECIPE`, or set "
                  "reference.model to the architecture it was trained with")


def scorer_for(recipe: Recipe, cfg: ModelConfig | None = None, *, flexi: FlexiConfig | None = None):
    """The task's scorer for `cfg` (default: the learner's model); with `flexi`, of its mixed-resolution training."""
    return task_of(recipe).scorer(cfg or recipe.model, flexi=flexi)


def in_memory_batches(samples, batch_size: int = 512) -> list[dict]:
    """A split collated into batches once (caption and noise dropped): test splits for repeated evaluation, and
    the benchmark's in-memory train split, whose big tensors forked workers share."""
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
    models.check_weights_fit(model, weights, f"reference: {path}/model.safetensors", _REFERENCE_FIX)
    model.load_state_dict(weights)
    if models.model_hash(model) != info["hash"]:
        raise ValueError(f"reference: {path}/model.safetensors does not match the hash in model.json; "
                         "retrain it with `curate train-reference RECIPE`")
    return model.eval(), info


def load_reference(recipe: Recipe) -> tuple[nn.Module, dict]:
    """The reference model in eval mode and its info: the weights file reference.checkpoint when the recipe gives
    one (safetensors, or a torch checkpoint read with weights_only=True), else the reference `curate
    train-reference` trained (its model.safetensors and model.json under reference.path)."""
    cfg = recipe.reference_model
    if recipe.reference.checkpoint is None:
        return load_model(recipe.reference_path, recipe, cfg)
    path = Path(recipe.reference.checkpoint)
    if not path.is_file():
        raise MissingDataError(f"reference.checkpoint: no file {str(path)!r}; give the reference's weights file "
                               "(safetensors or a torch checkpoint), or unset it to train one")
    model = build_model(cfg, recipe, seed=0)
    weights = models.read_weights(path)
    models.check_weights_fit(model, weights, f"reference.checkpoint: {path}",
                             "it holds weights of another model: set reference.model to the architecture it was "
                             "trained with, or give the checkpoint of this one")
    model.load_state_dict(weights)
    return model.eval(), {"hash": models.model_hash(model), "checkpoint": str(path)}


def reference_hash(recipe: Recipe) -> str | None:
    """The reference's `model_hash`: of the reference.checkpoint's weights, or from the trained reference's
    model.json (load_model checks it against the weights); None when there is no reference yet."""
    if recipe.reference.checkpoint is not None:
        path = Path(recipe.reference.checkpoint)
        stat = path.stat() if path.is_file() else None
        return _checkpoint_hash(recipe.model_dump_json(), stat and (stat.st_size, stat.st_mtime_ns))
    info = recipe.reference_path / "model.json"
    return json.loads(info.read_text())["hash"] if info.is_file() else None


@functools.lru_cache(maxsize=8)
def _checkpoint_hash(recipe_json: str, stamp) -> str | None:
    from .recipe import Recipe as RecipeModel

    return None if stamp is None else load_reference(RecipeModel.model_validate_json(recipe_json))[1]["hash"]
