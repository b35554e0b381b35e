"""Hugging Face: curated batches in `transformers.Trainer`, and scorers for HF models (`pip install "curate[hf]"`).

    trainer = Trainer(model=model, args=TrainingArguments(...))
    curate.integrations.hf.attach(trainer, pipe)   # pipe = curate.pipeline(loader, learner=model, ...)
    trainer.train()                                # or trainer.train(resume_from_checkpoint=True)

`attach` makes the Trainer train on `pipe`'s batches (each stripped to what `model.forward` takes, so `__key__` and
other fields never reach `model(**inputs)`), saves every rank's pipeline state into each checkpoint folder
(`curate.save_state`) and resumes it from there. Resume goes through curate's own state: the Trainer's own
data skip (`skip_first_batches`, which rebuilds a DataLoader from `.dataset` and replays the epoch) is turned
off (`args.ignore_data_skip = True`).

Scorers: `CausalLMScorer` (per-sequence mean next-token loss, for RHO-LOSS / ACL selection of language-model
training sequences) and `HFClassificationScorer` (sequence classification: keyword inputs, `.logits`).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..learner import unwrap_ddp
from ..losses import cross_entropy_losses
from ..pipeline import Pipeline
from ..scorers import ClassificationScorer, Kind, ModelScores, TargetError, _check_precision, _where, model_device
from ..state import load_state, save_state
from . import require

require("transformers", "hf", "transformers", "curate.integrations.hf")  # a named error, not a bare one below
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

__all__ = ["CausalLMScorer", "CurateCallback", "HFClassificationScorer", "TrainerLoader", "attach"]

log = logging.getLogger("curate.integrations.hf")

_IGNORE_INDEX = -100  # the label HF models (and F.cross_entropy) skip


def _logits(output) -> Tensor:
    """The logits of an HF model's output (a ModelOutput, a dict or a tuple whose first item they are)."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, tuple | list):
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned {type(output).__name__} without .logits; HF scorers read "
                        "`model(**inputs).logits`")
    return logits


class CausalLMScorer:
    """Per-sequence mean next-token cross-entropy of a causal language model (GPT-2, Llama, ...): what RHO-LOSS
    and ACL rank language-model training sequences by.

    Token t is predicted from tokens < t (logits shifted by one, as HF's own loss does); the mean is over the
    tokens that count: `attention_mask` 1 (padding is never scored) and, with `label_key`, labels that are not
    -100 (HF's ignore index, e.g. a masked prompt). A sequence with no such token has no loss and raises a
    `TargetError` naming it (its NaN would otherwise reach selection).

    Args:
        input_key: the token ids (B, T). mask_key: the attention mask (B, T), or None when every token counts.
        label_key: labels (B, T) in HF's convention (the input ids, -100 where not scored); None: the input ids.
        autocast, dtype: as for `curate.ClassificationScorer` (the losses are fp32 whatever the forward's precision).
    """

    kind: Kind = "example"

    def __init__(self, input_key: str = "input_ids", mask_key: str | None = "attention_mask",
                 label_key: str | None = None, *, autocast: torch.dtype | None = None,
                 dtype: torch.dtype | None = None):
        _check_precision("CausalLMScorer", autocast, dtype)
        self.input_key, self.mask_key, self.label_key = input_key, mask_key, label_key
        self.keys = tuple(k for k in (input_key, mask_key, label_key) if k is not None)
        self.autocast, self.dtype = autocast, dtype

    def __call__(self, model: nn.Module, batch: dict) -> ModelScores:
        device = model_device(model)
        ids = batch[self.input_key].to(device, non_blocking=True)
        mask = None if self.mask_key is None else batch[self.mask_key].to(device, non_blocking=True)
        logits = _logits(model(input_ids=ids, attention_mask=mask) if mask is not None else model(input_ids=ids))
        labels = ids if self.label_key is None else batch[self.label_key].to(device, non_blocking=True)
        targets, logits = labels[:, 1:], logits[:, :-1]
        counted = targets != _IGNORE_INDEX
        if mask is not None:
            counted &= mask[:, 1:].bool()
        tokens = F.cross_entropy(logits.float().flatten(0, 1), targets.clamp_min(0).flatten(),
                                 reduction="none").view_as(targets)
        n = counted.sum(1)
        if not bool((n > 0).all()):
            raise TargetError(f"CausalLMScorer: {_where(n == 0, batch)} have no token to predict (fewer than 2 "
                              "tokens under the attention mask, or every label -100); drop them before the pipeline")
        return ModelScores.of_losses((tokens * counted).sum(1) / n)

    def __repr__(self) -> str:
        return (f"CausalLMScorer(input_key={self.input_key!r}, mask_key={self.mask_key!r}, "
                f"label_key={self.label_key!r})")


class HFClassificationScorer(ClassificationScorer):
    """Per-example cross-entropy of an HF sequence classifier: `model(**{k: batch[k] for k in input_keys}).logits`
    against `batch[label_key]` (class indices or soft labels, checked as `curate.ClassificationScorer` does)."""

    def __init__(self, input_keys: Sequence[str] = ("input_ids", "attention_mask"), label_key: str = "labels", *,
                 autocast: torch.dtype | None = None, dtype: torch.dtype | None = None):
        if isinstance(input_keys, str):
            raise TypeError(f"HFClassificationScorer: input_keys takes a sequence of field names, got the string "
                            f"{input_keys!r}; write input_keys=({input_keys!r},)")
        super().__init__(input_keys[0], label_key, autocast=autocast, dtype=dtype)
        self.input_keys = tuple(input_keys)
        self.keys = (*self.input_keys, label_key)

    def __call__(self, model: nn.Module, batch: dict) -> ModelScores:
        device = model_device(model)
        logits = _logits(model(**{k: batch[k].to(device, non_blocking=True) for k in self.input_keys}))
        return ModelScores.of_losses(cross_entropy_losses(logits, self._targets(batch, logits)))

    def __repr__(self) -> str:
        return f"HFClassificationScorer(input_keys={self.input_keys!r}, label_key={self.target_key!r})"


def forward_fields(model: nn.Module, label_names: Sequence[str] = ()) -> tuple[str, ...]:
    """The batch fields `model(**batch)` takes: its forward's parameters, plus the label fields (as Trainer keeps)."""
    names = [n for n, p in inspect.signature(unwrap_ddp(model).forward).parameters.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return tuple(dict.fromkeys([*names, *label_names, "labels", "label", "label_ids"]))


class TrainerLoader:
    """A pipeline as the Trainer's train dataloader: batches stripped to `fields`, `len()` and `set_epoch` the
    pipeline's (the Trainer sizes its schedule by them and calls set_epoch before each epoch, also on resume)."""

    def __init__(self, pipe: Pipeline, fields: Sequence[str]):
        self.pipe, self.fields = pipe, tuple(fields)

    def __len__(self) -> int:
        return len(self.pipe)

    def set_epoch(self, epoch: int) -> None:
        self.pipe.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.pipe:
            if not isinstance(batch, dict):
                raise TypeError(f"curate.integrations.hf: the pipeline yields {type(batch).__name__}, the Trainer "
                                "takes dicts of model inputs; build it without output=")
            kept = {name: batch[name] for name in self.fields if name in batch}
            if not kept:
                raise ValueError(f"curate.integrations.hf: no field of the batch ({sorted(batch)}) is an input of "
                                 f"the model ({list(self.fields)}); pass fields= to attach")
            yield kept


class CurateCallback(TrainerCallback):
    """Saves this rank's pipeline state into each Trainer checkpoint folder (`curate.save_state`, one file per rank)
    and, when the Trainer resumes (global step > 0 at train begin), loads it from the folder of that step:
    `checkpoint_dir` when given, else `args.output_dir/checkpoint-{step}`, the Trainer's own layout."""

    def __init__(self, pipe: Pipeline, checkpoint_dir: str | os.PathLike | None = None):
        self.pipe, self.checkpoint_dir = pipe, checkpoint_dir

    def on_save(self, args, state, control, **kwargs):
        save_state(self._folder(args, state.global_step), self.pipe)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        folder = self._folder(args, state.global_step)
        try:
            load_state(folder, self.pipe)
        except FileNotFoundError as error:  # load_state names the states the folder does hold
            raise FileNotFoundError(
                f"curate.integrations.hf: resuming at step {state.global_step}, but {folder} holds no curate pipeline "
                f"state of rank {self.pipe.rank} (the checkpoint was saved without curate's callback, or elsewhere); "
                f"pass checkpoint_dir= (the folder given as resume_from_checkpoint) to attach. {error}") from None
        log.info("curate: resumed the pipeline's stream from %s", folder)

    def _folder(self, args, step: int) -> str:
        if self.checkpoint_dir is not None:
            return os.fspath(self.checkpoint_dir)
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def attach(trainer, pipe: Pipeline, *, fields: Sequence[str] | None = None,
           checkpoint_dir: str | os.PathLike | None = None) -> CurateCallback:
    """Make `trainer` train on `pipe`'s batches and checkpoint / resume its stream (see the module doc).

    Args:
        fields: the batch fields passed to the model; default what `trainer.model.forward` takes plus the label
            fields (`trainer.label_names`, "labels").
        checkpoint_dir: where to resume the pipeline's state from when that is not the Trainer's default
            checkpoint folder of the resumed step (e.g. `resume_from_checkpoint` pointed elsewhere).

    Returns the callback it added.
    """
    if not isinstance(pipe, Pipeline):
        raise TypeError(f"attach: pipe must be a curate.Pipeline (what curate.pipeline returns), got "
                        f"{type(pipe).__name__}")
    if fields is None:
        fields = forward_fields(trainer.model, trainer.label_names or ())
    loader = TrainerLoader(pipe, fields)
    trainer.get_train_dataloader = lambda: loader
    trainer.args.ignore_data_skip = True  # the Trainer's skip would replay the epoch through a rebuilt DataLoader
    callback = CurateCallback(pipe, checkpoint_dir)
    trainer.add_callback(callback)
    return callback
