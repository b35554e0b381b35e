"""The learning-rate schedule the learner (`train.warmup`) and the reference (`reference.schedule`) share.

Set from the step count alone, so a resumed run follows the same rates without a scheduler's state."""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The learning rate at 0-based `step` of `steps`, as a fraction of the peak: linear warmup over the first
    `warmup` steps, then constant or a cosine decay that reaches 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
