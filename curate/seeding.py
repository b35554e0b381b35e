"""One place that turns a user seed into per-epoch / per-step / per-rank seeds.

Every random choice in curate draws from a generator made here, so a pipeline is a pure
function of (data, models, seed) and resumes to the same stream.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "make_generator"]


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends on `seed` and every part (names, epochs, steps, ranks).

    Hashing (not adding) keeps streams for (epoch=1, step=0) and (epoch=0, step=1) apart.
    """
    text = ":".join([str(int(seed)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def make_generator(seed: int, *parts: object) -> torch.Generator:
    """A CPU generator seeded with `derive_seed(seed, *parts)`.

    CPU on purpose: the same seed gives the same draws whatever device the models are on.
    """
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, *parts))
    return generator
