"""curate.batch: counting, splitting, slicing and indexing collated batches."""

import pytest
import torch

from curate.batch import batch_size_of, slice_batch, split_batch, take


def test_split_batch_round_trips():
    batch = {"__key__": ["a", "b"], "x": torch.arange(6).view(2, 3), "meta": ["m0", "m1"]}
    samples = split_batch(batch)
    assert samples[1]["__key__"] == "b" and samples[1]["x"].tolist() == [3, 4, 5] and samples[1]["meta"] == "m1"
    with pytest.raises(TypeError, match="field 'x'"):
        split_batch({"__key__": ["a", "b"], "x": torch.zeros(3)})


def test_batch_size_comes_from_the_keys_else_the_first_field():
    assert batch_size_of({"__key__": ["a", "b", "c"], "x": torch.zeros(3)}) == 3
    assert batch_size_of({"x": torch.zeros(4, 2)}) == 4 and batch_size_of({"t": ["a", "b"]}) == 2
    with pytest.raises(TypeError, match="cannot tell the batch size"):
        batch_size_of({"scale": torch.tensor(1.0)})


def test_take_and_slice_keep_the_order_asked_for():
    batch = {"__key__": ["a", "b", "c", "d"], "x": torch.arange(8).view(4, 2)}
    picked = take(batch, torch.tensor([3, 0, 2]))
    assert picked["__key__"] == ["d", "a", "c"] and picked["x"][:, 0].tolist() == [6, 0, 4]
    part = slice_batch(batch, 1, 3)
    assert part["__key__"] == ["b", "c"] and part["x"][:, 0].tolist() == [2, 4]
