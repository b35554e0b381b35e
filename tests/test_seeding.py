"""curate.seeding: one user seed, independent reproducible streams per (purpose, epoch, step, rank)."""

import torch

from curate.seeding import derive_seed, make_generator


def test_derived_seeds_are_stable_distinct_and_63_bit():
    assert derive_seed(0, "select", 1, 0) == derive_seed(0, "select", 1, 0)
    seeds = {derive_seed(s, *parts) for s in (0, 1) for parts in
             [("select", 1, 0), ("select", 0, 1), ("shuffle", 1, 0), ("select", 10), ("select", 1, 0, 0)]}
    assert len(seeds) == 10  # (epoch 1, step 0) and (epoch 0, step 1) do not collide: hashed, not added
    assert all(0 <= s < 2**63 for s in seeds)


def test_generators_draw_the_same_on_any_device_choice():
    a, b = make_generator(3, "x"), make_generator(3, "x")
    assert a.device.type == "cpu" and torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))
    other = torch.rand(5, generator=make_generator(3, "y"))
    assert not torch.equal(other, torch.rand(5, generator=make_generator(3, "x")))
