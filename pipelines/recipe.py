"""YAML recipes: typed, validated configuration for the jobs the `curate` CLI runs.

The application's schema, so it lives beside the jobs, not in the library: `curate` itself needs neither
pydantic nor pyyaml (they come with the app extra). The only place YAML is parsed. Unknown keys and wrong
types fail with the YAML path and line (`recipe.yaml:12: selection.n_chunks: expected an integer, got 'x'`);
malformed YAML with line and column. `--set key.path=value` overrides are applied before validation, so
they are checked too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from curate import RULES

from .extras import needs_extra

with needs_extra("curate recipes (pipelines.recipe)"):
    import yaml
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

__all__ = ["Recipe", "RecipeError", "apply_overrides", "load_recipe", "parse_recipe"]


class RecipeError(ValueError):
    """A recipe that cannot be read or validated; the message names the file, path and line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FieldsConfig(_Strict):
    """Which member (webdataset: the file extension; Parquet: the column) holds each field of a sample.

    `image`, `text` and `label` may list alternatives separated by ';' (the first present is taken, as
    webdataset's `to_tuple("jpg;png")`). `key` is `__key__` (webdataset's sample key) or a column name.
    """

    image: str = "jpg;jpeg;png;webp"
    text: str = "txt"
    label: str = "cls"
    key: str = "__key__"


class DataConfig(_Strict):
    """Where the samples are.

    `format: digits` (the default) reads the embedded dataset `curate data digits ROOT` writes under `root`
    (`dataset` picks its task: pairs or digits). `format: webdataset` (tar shards, as img2dataset writes them) or
    `parquet` (image bytes + columns, as Hugging Face / DataComp exports) reads your own shards: `train`,
    `curated` (what `curate train-reference` trains on) and `eval` are shard URLs, each a brace pattern
    (`shards/train-{000000..000099}.tar`), a glob or a list, local or s3:// (with `storage_options`); `task` says what
    they hold: `contrastive` (image + text) or `classification` (image + label). Images go through
    `transforms` (torchvision.transforms.v2 ops by name, deterministic ones), else the model's own
    preprocessing, else a resize and centre crop to `image_size`.
    """

    format: Literal["digits", "webdataset", "parquet"] = "digits"
    root: str = "data/digits"
    dataset: Literal["pairs", "digits", "web"] = "pairs"
    task: Literal["contrastive", "classification"] | None = None
    train: str | list[str] | None = None
    curated: str | list[str] | None = None
    eval: str | list[str] | None = None
    fields: FieldsConfig = Field(default_factory=FieldsConfig)
    image_size: int | None = Field(None, gt=0)
    transforms: list[str | dict[str, dict[str, Any] | None]] | None = None
    on_corrupt: Literal["fail", "skip"] = "fail"
    storage_options: dict[str, Any] = Field(default_factory=dict)

    def model_post_init(self, context: Any) -> None:
        if self.format == "digits":
            own = ("task", "train", "curated", "eval", "transforms")
            given = [key for key in own if getattr(self, key) is not None]
            if given:
                raise ValueError(f"data.{given[0]} is for your own shards (format: webdataset or parquet); the "
                                 "embedded digits data (format: digits) is chosen by data.root and data.dataset")
            return
        if self.task is None:
            raise ValueError(f"data.task: format {self.format} needs the task its samples are for: contrastive "
                             "(image + text) or classification (image + label)")
        if self.train is None:
            raise ValueError(f"data.train: format {self.format} needs the train shards' URLs, e.g. "
                             "train: shards/train-{000000..000009}.tar")

    @property
    def task_name(self) -> str:
        """The task's name: the embedded dataset's (pairs | digits) or `task` for your own shards."""
        return self.dataset if self.format == "digits" else str(self.task)


class ModelConfig(_Strict):
    """A model: `kind` names a built-in builder (the demo's tiny_clip, small_cnn, mlp), `open_clip` (`name`, an
    open_clip architecture, or `config`, a model config JSON of your own; built without weights unless
    `pretrained` names a local weights file; `loss: sigmoid` starts it as SigLIP does, logit scale 10 and bias
    -10, unless options set init_logit_scale / init_logit_bias), `torchvision` (`name`, an architecture of
    torchvision.models; e.g. options: {num_classes: 10}), or `factory`, your own function named by
    `factory: "package.module:function"`.
    `options` are the builder's keyword arguments. A factory gets `image_size` (the data's) too when its
    signature takes it, and returns an `nn.Module` with the task's interface (a classifier's
    `model(images) -> logits`, or the open_clip API `encode_image` / `encode_text` / `logit_scale` for
    contrastive tasks), or a tuple `(model, preprocess_train, preprocess_val)` as open_clip's
    `create_model_and_transforms` does."""

    kind: Literal["tiny_clip", "small_cnn", "mlp", "open_clip", "torchvision", "factory"] = "tiny_clip"
    name: str | None = None
    config: str | None = None
    pretrained: str | None = None
    factory: str | None = None
    loss: Literal["sigmoid", "softmax"] = "sigmoid"
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _factory_spelling(cls, value: str | None) -> str | None:
        module, _, name = (value or "").partition(":")
        if value is not None and not (module and name.isidentifier()):
            raise ValueError(f"expected 'package.module:function', got {value!r}")
        return value

    def model_post_init(self, context: Any) -> None:
        if (self.kind == "factory") != (self.factory is not None):
            raise ValueError("model.factory names the function of kind: factory (e.g. kind: factory, factory: "
                             f"'mypkg.models:build'); got kind: {self.kind} with factory: {self.factory!r}")
        if self.kind == "open_clip" and (self.name is None) == (self.config is None):
            raise ValueError("model.kind: open_clip needs exactly one of model.name (an open_clip architecture, "
                             "e.g. ViT-B-32) or model.config (a model config JSON file)")
        if self.kind == "torchvision" and self.name is None:
            raise ValueError("model.kind: torchvision needs model.name, an architecture of torchvision.models "
                             "(e.g. resnet18)")
        if self.kind not in ("open_clip", "torchvision"):
            given = [key for key in ("name", "config", "pretrained") if getattr(self, key) is not None]
            if given:
                raise ValueError(f"model.{given[0]} is a key of kind: open_clip or torchvision, not {self.kind}")
        if self.config is not None and self.kind != "open_clip":
            raise ValueError("model.config (a model config JSON) is a key of kind: open_clip")


class ReferenceConfig(_Strict):
    """The reference model: trained on the curated split by `curate train-reference`."""

    path: str | None = None  # default: <train.out>/reference
    checkpoint: str | None = None  # a given reference's weights file (safetensors or torch): used, never trained
    model: ModelConfig | None = None  # default: the learner's architecture
    steps: int = Field(400, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    # "cosine": linear warmup over `warmup` steps, then cosine decay to 0 at `steps` (CLIP's and SigLIP's schedule)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup: int = Field(0, ge=0)


class CacheConfig(_Strict):
    """Offline reference scores: None scores the reference online at every step."""

    path: str | None = None
    missing: Literal["error", "online"] = "error"
    batch_size: int = Field(512, gt=0)


class ActorConfig(_Strict):
    """ACL: a small proxy trained online on the selected batches, scoring in the learner's place."""

    model: ModelConfig
    lr: float = Field(1e-3, gt=0)


class FlexiConfig(_Strict):
    """Flexi-JEST (Evans et al., 2024, §3.4; `pipelines.flexi`): the superbatch is scored with its images
    downsampled by `downsample`, and the learner trains on `train_share` of every batch at that resolution (the
    rest at full), so that its low-resolution scores stay accurate. Needs an open_clip ViT image tower."""

    downsample: int = Field(2, ge=2)
    train_share: float = Field(0.5, ge=0, le=1)


class SelectionConfig(_Strict):
    """What `curate.pipeline` is given; see its docstring for each knob."""

    rule: str = "learnability"
    method: Literal["topk", "sample", "joint"] = "joint"
    filter_ratio: float = Field(0.8, ge=0, lt=1)
    n_chunks: int = Field(16, gt=0)
    temperature: float = Field(1.0, ge=0)
    uniform_share: float = Field(0.0, ge=0, le=1)
    warmup: int = Field(0, ge=0)  # curate.pipeline's selection_warmup
    shuffle_buffer: int = Field(1024, ge=0)
    actor: ActorConfig | None = None
    flexi: FlexiConfig | None = None

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        if value not in RULES:
            raise ValueError(f"unknown rule {value!r}; valid rules are {sorted(RULES)}")
        return value

    @field_validator("flexi")
    @classmethod
    def _flexi_without_actor(cls, value: FlexiConfig | None, info: ValidationInfo) -> FlexiConfig | None:
        if value is not None and info.data.get("actor") is not None:
            raise ValueError("Flexi-JEST trains the learner at the resolution it scores at, and an ACL actor "
                             "(selection.actor) scores in its place; set one of them")
        return value


class CurationConfig(_Strict):
    """Offline curation (`curate curate-set`): alignment filter, dedup and cluster balance of the reference's
    embeddings."""

    aligned_share: float | None = Field(None, gt=0, le=1)  # keep this share best aligned (image·text); None: all
    embedding: Literal["image", "text", "both"] = "image"
    n_clusters: int | None = Field(None, gt=0)  # default round(√N)
    threshold: float = Field(0.95, ge=0, le=1)  # cosine at or above which two samples are duplicates
    per_cluster: int | None = Field(None, gt=0)  # None: no cap after dedup
    train_on_curated: bool = False  # `curate run` trains only on the curated key list


class EvalConfig(_Strict):
    """Evaluation of your own data (format webdataset | parquet): a classifier's accuracy against the eval data's
    labels; a contrastive model's zero-shot accuracy over `classnames` (in label order, each class's prompts
    the `templates` with its name for `{}`, embeddings averaged), or with no classnames its image→text
    retrieval R@1 over the eval pairs (reported as accuracy)."""

    classnames: list[str] | None = None
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."])

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, value: list[str]) -> list[str]:
        for template in value:
            if "{}" not in template:
                raise ValueError(f"the template {template!r} has no {{}} for the class name")
        return value or ["a photo of a {}."]


class TrainConfig(_Strict):
    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup: int = Field(0, ge=0)  # linear warmup to `lr` over these steps
    # "constant" after the warmup (a longer run continues the same one), or "cosine" decay to 0 at `steps`
    # (CLIP's and SigLIP's schedule: every budget is its own run)
    schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(50, gt=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    out: str | None = None  # default: runs/<name>


class DistributedConfig(_Strict):
    """Multi-process training: `torchrun --nproc_per_node=N -m pipelines.cli run RECIPE` (ignored in one process).

    `train.batch_size` stays the global batch: each of the N ranks trains on batch_size / N samples and
    scores superbatch / N candidates, so both must divide by N. `selection_scope`: "local" (each rank selects
    from its own superbatch) or "global" (every rank makes the decision a single process would make over
    all ranks' superbatches; see `curate.distributed`). `backend`: the process group's ("auto": nccl on
    CUDA, else gloo). `timeout_s`: how long a collective waits before failing (a stalled rank).
    """

    selection_scope: Literal["local", "global"] = "local"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = Field(600.0, gt=0)


class Recipe(_Strict):
    """A whole job: data, learner, reference (model or cache), selection and training.

    `prepare: true` makes whatever is missing (data, reference, cache) before training; otherwise a
    missing piece is an error naming the command that makes it. `compare` lists baselines trained in the
    same run for the learning curve: rule names, e.g. ["uniform"] (uniform trains on the data as it
    comes, without a superbatch). `distributed` configures multi-process runs under torchrun.
    """

    name: str
    prepare: bool = False
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    compare: list[str] = Field(default_factory=list)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # the run directory is runs/<name>: a path in the name would write somewhere else (runs/../../x)
        if not value or value in (".", "..") or not all(c.isalnum() or c in "-_." for c in value):
            raise ValueError(f"the name {value!r} must be a plain directory name (letters, digits, '-', '_', '.'), "
                             "since runs go to runs/<name>; set train.out to write somewhere else")
        return value

    @field_validator("train", "reference", "cache")
    @classmethod
    def _paths_inside(cls, value, info):
        # a relative output path is taken from the working directory (the run root); one that climbs out of it
        # (../../x) writes somewhere the user did not say, so only an absolute path may point outside
        key = {"train": "out", "reference": "path", "cache": "path"}[info.field_name]
        path = getattr(value, key)
        if path and "://" not in path and not Path(path).is_absolute() and not _inside(path):
            raise ValueError(f"{info.field_name}.{key}={path!r} points outside the working directory; give an "
                             "absolute path to write there explicitly")
        return value

    @field_validator("compare")
    @classmethod
    def _known_baselines(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in RULES:
                raise ValueError(f"unknown baseline {name!r}; a baseline is a rule name: {sorted(RULES)}")
        return value

    @property
    def out(self) -> Path:
        return Path(self.train.out or f"runs/{self.name}")

    @property
    def curated_keys_path(self) -> Path:
        return self.out / "curated_keys.parquet"

    @property
    def reference_path(self) -> Path:
        return Path(self.reference.path) if self.reference.path else self.out / "reference"

    @property
    def reference_model(self) -> ModelConfig:
        return self.reference.model or self.model


def _inside(path: str) -> bool:
    """Whether relative `path` stays inside the directory it is taken from (after resolving '..' lexically)."""
    depth = 0
    for part in Path(path).parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return False
    return True


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML: `3`, `0.5`, `true`, `[uniform]`)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key.path=value, e.g. --set selection.n_chunks=8")
        path, raw = item.split("=", 1)
        node = data
        keys = path.strip().split(".")
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {key!r} is not a section")
            node = child
        try:
            node[keys[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise RecipeError(f"--set {item!r}: the value {raw!r} is not valid YAML ({problem}); quote a string "
                              f"that holds YAML syntax, e.g. --set '{path.strip()}=\"{raw}\"'") from None
    return data


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """Validate recipe YAML text (with `overrides`); errors name `source`, the key path and the line."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise RecipeError(f"{where}: malformed YAML: {error.problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping (name: ..., selection: ...), "
                          f"got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        lines = [_describe(err, source, root) for err in error.errors()]
        raise RecipeError(f"{source}: invalid recipe:\n  " + "\n  ".join(lines)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist; the shipped recipes are in recipes/")
    return parse_recipe(path.read_text(), str(path), overrides)


# keys of earlier versions: what took their place
REPLACED = {"selection.score_patch_dropout": "Flexi-JEST scores at low resolution and trains at mixed resolution "
                                             "instead of dropping patches; use selection.flexi: {downsample: 2, "
                                             "train_share: 0.5}"}


def _describe(err: dict, source: str, root) -> str:
    loc = [str(part) for part in err["loc"] if not str(part).startswith("function-after")]
    path = ".".join(loc)
    line = _line_of(root, loc)
    where = f"{source}:{line}: " if line else ""
    if err["type"] == "extra_forbidden":
        if path in REPLACED:
            return f"{where}{path}: no longer a key: {REPLACED[path]}"
        return f"{where}{path}: unknown key (check the spelling; see pipelines/recipe.py for the valid keys)"
    expected = {"int_parsing": "expected an integer", "int_type": "expected an integer",
                "float_parsing": "expected a number", "float_type": "expected a number",
                "bool_parsing": "expected true or false", "string_type": "expected a string",
                "missing": "required key is missing"}.get(err["type"], err["msg"])
    got = "" if err["type"] == "missing" else f", got {err.get('input')!r}"
    return f"{where}{path}: {expected}{got}"


def _line_of(node, keys: list[str]) -> int | None:
    """The 1-based line of a key path in the composed YAML tree (None if it came from --set or a default)."""
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line
