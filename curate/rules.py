"""Score rules: how learner and reference losses combine into a selection score.

Every rule is a pure, elementwise function `rule(learner, reference) -> score` over tensors of any
shape, so the same rule scores per-example losses (B,) and blocks of per-pair losses (B, c).
Higher score = more worth training on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Rule", "RULES", "get_rule", "needs_learner", "needs_reference"]

Rule = Callable[[Tensor | None, Tensor | None], Tensor]


def learnability(learner: Tensor, reference: Tensor) -> Tensor:
    """RHO-LOSS / JEST learnability: learner loss − reference loss (reducible holdout loss)."""
    return learner - reference


def hard_learner(learner: Tensor, reference: Tensor | None = None) -> Tensor:
    """Hardest examples for the learner: its own loss."""
    return learner


def easy_reference(learner: Tensor | None, reference: Tensor) -> Tensor:
    """Easiest examples for the reference: its negated loss."""
    return -reference


def uniform(learner: Tensor | None, reference: Tensor | None) -> Tensor:
    """No preference: every score is zero, so sampling is uniform."""
    like = learner if learner is not None else reference
    return torch.zeros_like(like)


RULES: dict[str, Rule] = {
    "learnability": learnability,
    "rho": learnability,
    "hard_learner": hard_learner,
    "easy_reference": easy_reference,
    "uniform": uniform,
}

_USES_LEARNER = {learnability, hard_learner}
_USES_REFERENCE = {learnability, easy_reference}


def get_rule(name: str) -> Rule:
    """The rule registered under `name`; an unknown name raises listing the valid ones."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"rule: unknown rule {name!r}; valid rules are {sorted(RULES)}") from None


def needs_learner(rule: Rule) -> bool:
    return rule in _USES_LEARNER


def needs_reference(rule: Rule) -> bool:
    return rule in _USES_REFERENCE
