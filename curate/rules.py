"""Score rules: how learner and reference losses combine into a selection score.

A `Rule` is a pure, elementwise function `fn(learner, reference) -> score` over tensors of any shape (so
the same rule scores per-example losses (B,) and blocks of per-pair losses (B, c)), together with which
of the two models it reads: a model the rule does not read is never scored. Higher score = more worth
training on. Built-ins are registered by name in `RULES`; a custom rule is `Rule(fn, uses_learner=...,
uses_reference=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

__all__ = ["RULES", "Rule", "as_rule", "get_rule"]

RuleFn = Callable[[Tensor | None, Tensor | None], Tensor]


@dataclass(frozen=True)
class Rule:
    """A score rule and the models it reads.

    Args:
        fn: `fn(learner, reference) -> score`, elementwise; an argument is None when that model was not
            scored (the rule does not use it).
        uses_learner, uses_reference: which models' losses `fn` reads. A rule that reads neither gives every
            sample the same score, 0 (that is `uniform`: `JointSelect` then samples uniformly, without calling
            `fn`).
        name: for messages and stats; default `fn.__name__`.
    """

    fn: RuleFn
    uses_learner: bool
    uses_reference: bool
    name: str = ""

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Rule: fn must be a function (learner, reference) -> score, got {self.fn!r}")
        if not self.name:
            object.__setattr__(self, "name", getattr(self.fn, "__name__", type(self.fn).__name__))

    @property
    def uses_models(self) -> bool:
        return self.uses_learner or self.uses_reference

    def __call__(self, learner: Tensor | None, reference: Tensor | None) -> Tensor:
        return self.fn(learner, reference)


def _learnability(learner: Tensor, reference: Tensor) -> Tensor:
    return learner - reference


def _hard_learner(learner: Tensor, reference: Tensor | None) -> Tensor:
    return learner


def _easy_reference(learner: Tensor | None, reference: Tensor) -> Tensor:
    return -reference


def _uniform(learner: Tensor | None, reference: Tensor | None) -> Tensor:
    like = learner if learner is not None else reference
    if like is None:
        raise ValueError("rule uniform: no losses to shape the scores by; JointSelect scores a superbatch that no "
                         "model scored as all zeros itself")
    return torch.zeros_like(like)


# A Rule passes None only for a model it does not read, so each built-in takes a Tensor for the models it declares;
# RuleFn cannot say which argument may be None, hence the casts.
learnability = Rule(cast(RuleFn, _learnability), True, True, "learnability")  # RHO-LOSS / JEST: reducible holdout loss
hard_learner = Rule(cast(RuleFn, _hard_learner), True, False, "hard_learner")  # the learner's own loss: hardest first
easy_reference = Rule(cast(RuleFn, _easy_reference), False, True, "easy_reference")  # the reference's negated loss
uniform = Rule(_uniform, False, False, "uniform")  # no preference: uniform sampling

RULES: dict[str, Rule] = {
    "learnability": learnability,
    "rho": learnability,
    "hard_learner": hard_learner,
    "easy_reference": easy_reference,
    "uniform": uniform,
}


def get_rule(name: str) -> Rule:
    """The rule registered under `name`; an unknown name raises listing the valid ones."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"rule: unknown rule {name!r}; valid rules are {sorted(RULES)}") from None


def as_rule(rule: str | Rule | RuleFn, *, learner: bool, reference: bool) -> Rule:
    """A `Rule` from a registered name, a `Rule`, or a plain function, which reads the models that are given
    (`learner` / `reference`: whether each was passed)."""
    if isinstance(rule, str):
        return get_rule(rule)
    if isinstance(rule, Rule):
        return rule
    if not callable(rule):
        raise TypeError(f"rule: expected a name from {sorted(RULES)}, a curate.Rule or a function "
                        f"(learner, reference) -> score, got {rule!r}")
    return Rule(rule, uses_learner=learner, uses_reference=reference)
