"""Resume with stateful sources (torchdata's StatefulDataLoader, HF datasets' IterableDataset), epochs
(`Pipeline.set_epoch`, the iterable's own `set_epoch`), torchdata's own save/load cases, and bad sources."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

import curate

from .conftest import (
    MapDataset,
    assert_same_stream,
    check_resume,
    make_samples,
    roundtrip,
    run_test_save_load_state,
)
from .test_nodes import STAGES, _chain


def _select(source, **over):
    """A model-free pipeline (uniform rule, seeded sampling) with a shuffle block of 3 superbatches of 20."""
    options = dict(rule="uniform", method="sample", batch_size=4, superbatch_size=20, shuffle_buffer=60, seed=7)
    options.update(over)
    return curate.pipeline(source, **options)


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["__key__"]]


# ---------------------------------------------------------------- StatefulDataLoader


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_source_resumes_exactly_at_every_point(num_workers):
    """230 samples in loader batches of 10: 12 superbatches an epoch, the last shuffle block is superbatches 9-11
    (the short tail of 10 in it); checkpoints at every position of it, after the last batch and after the
    StopIteration (the harness's own cases), and in epoch 2."""
    data = make_samples(230)

    def build():
        loader = StatefulDataLoader(MapDataset(data), batch_size=10, shuffle=True, num_workers=num_workers,
                                    generator=torch.Generator().manual_seed(3))
        return _select(loader)

    full = check_resume(build, points=[0, 1, 5, 9, 10, 11])
    assert len(full) == 12


# ---------------------------------------------------------------- HF datasets


def _hf(n: int = 90, shards: int = 3):
    datasets = pytest.importorskip("datasets")
    table = {"__key__": [f"s{i:04d}" for i in range(n)], "input": [[float(i)] * 4 for i in range(n)],
             "target": [i % 3 for i in range(n)]}
    return datasets.Dataset.from_dict(table).to_iterable_dataset(num_shards=shards).with_format("torch")


def test_hf_iterable_dataset_source_resumes_exactly():
    """Its own state_dict resumes it in O(1); curate sets its epoch, so the checkpoint position is used in the
    resumed epoch only (it was repeated at every later epoch)."""
    full = check_resume(lambda: _select(_hf(), shuffle_buffer=0), points=[0, 1, 2, 3], epochs=3)
    assert len(full) == 5


def test_hf_iterable_dataset_gets_curates_epoch():
    ds = _hf()
    p = _select(ds, shuffle_buffer=0)
    for epoch in range(3):
        list(p)
        assert ds.epoch == epoch
    p.set_epoch(7)
    list(p)
    assert ds.epoch == 7


# ---------------------------------------------------------------- set_epoch


def _epoch_sources(data):
    """Sources whose order depends on the epoch: a list (curate's shuffle only), a DataLoader shuffling with its
    generator, one with a DistributedSampler (its set_epoch), the same in batches (batch_sampler)."""
    return {
        "list": lambda: data,
        "generator": lambda: DataLoader(MapDataset(data), batch_size=10, shuffle=True,
                                        generator=torch.Generator().manual_seed(3)),
        "distributed_sampler": lambda: DataLoader(
            MapDataset(data), sampler=DistributedSampler(MapDataset(data), num_replicas=1, rank=0, seed=4)),
        "batch_sampler": lambda: DataLoader(MapDataset(data), batch_size=10, sampler=DistributedSampler(
            MapDataset(data), num_replicas=1, rank=0, seed=4)),
    }


@pytest.mark.parametrize("kind", ["list", "generator", "distributed_sampler", "batch_sampler"])
def test_set_epoch_draws_that_epochs_randomness(kind):
    """open_clip's resume: a fresh pipeline, set_epoch(e), then iterate: epoch e of an uninterrupted run, not epoch
    0's selection again; the source's own set_epoch (a DistributedSampler's) is called with curate's epoch."""
    data = make_samples(130)
    source = _epoch_sources(data)[kind]
    p = _select(source())
    epochs = [_keys(p) for _ in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]
    for e in (2, 1, 0):
        fresh = _select(source())
        fresh.set_epoch(e)
        assert _keys(fresh) == epochs[e], f"set_epoch({e}) gave another epoch's selection"
        if e < 2:
            assert _keys(fresh) == epochs[e + 1], "the epoch after it follows"


def test_set_epoch_after_load_state_dict():
    """The loaded state's epoch (its rest), or the next one once nothing of it is left; anything else is refused."""
    data = make_samples(130)
    p = _select(data)
    epochs = [list(p) for _ in range(3)]
    first = _select(data)
    list(first)
    it = iter(first)
    head = [next(it) for _ in range(2)]
    mid = roundtrip(first.state_dict())
    rest = [next(it) for _ in range(len(epochs[1]) - 2)]
    end = roundtrip(first.state_dict())  # after the last batch, before the StopIteration
    assert next(it, None) is None
    stopped = roundtrip(first.state_dict())

    resumed = _select(data)
    resumed.load_state_dict(mid)
    resumed.set_epoch(1)
    assert_same_stream(head + list(resumed), epochs[1])
    resumed.set_epoch(2)
    assert_same_stream(list(resumed), epochs[2])
    assert rest
    for state in (end, stopped):  # the open_clip loop: set_epoch(2) for the epoch after the checkpoint's
        resumed = _select(data)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)
        assert_same_stream(list(resumed), epochs[2])
    resumed = _select(data)
    resumed.load_state_dict(end)
    resumed.set_epoch(1)  # the loop that checkpointed after the last batch resumes in that epoch: nothing is left
    assert list(resumed) == []
    for state, epoch in ((mid, 0), (mid, 2), (stopped, 1), (end, 3)):
        resumed = _select(data)
        resumed.load_state_dict(state)
        with pytest.raises(ValueError, match="set_epoch"):
            resumed.set_epoch(epoch)


# ---------------------------------------------------------------- torchdata's own cases


@pytest.mark.parametrize("stage", STAGES)
def test_torchdata_save_load_state_cases_on_every_stage(stage):
    data = make_samples(200)
    node = _chain(stage, data).root
    run_test_save_load_state(node, midpoint=2)


# ---------------------------------------------------------------- bad sources


def _one_shot(data):
    return (s for s in data)


@pytest.mark.parametrize("make", [_one_shot, lambda data: iter(data)], ids=["generator", "iter(list)"])
def test_a_one_shot_iterator_is_refused_at_its_second_epoch(make):
    p = _select(make(make_samples(60)), shuffle_buffer=0)
    assert len(list(p)) == 3  # its one epoch is fine
    with pytest.raises(TypeError, match="re-iterable"):
        list(p)


def test_integer_keys_are_refused():
    data = [{**s, "__key__": i} for i, s in enumerate(make_samples(40))]
    with pytest.raises(TypeError, match="__key__ must be a str"):
        list(_select(data, shuffle_buffer=0))
    with pytest.raises(TypeError, match="__key__ must be a str"):  # collated by a DataLoader: a tensor of keys
        list(_select(DataLoader(MapDataset(data), batch_size=10), shuffle_buffer=0))


def test_re_iterable_sources_are_never_refused(tmp_path):
    """DataLoaders (with workers), webdataset pipelines, HF IterableDatasets and curate.Shards are their own
    iterables' factories: two epochs each."""
    import webdataset as wds

    data = make_samples(60)
    with wds.ShardWriter(str(tmp_path / "shard-%06d.tar"), maxcount=20) as sink:
        for s in data:
            sink.write({"__key__": s["__key__"], "input.pth": s["input"], "target.pth": s["target"]})
    urls = [str(tmp_path / f"shard-{i:06d}.tar") for i in range(3)]

    def load(shard_urls):
        return wds.DataPipeline(wds.SimpleShardList(shard_urls), wds.tarfile_to_samples(), wds.decode(),  # both lines
                                wds.map(lambda s: {"__key__": s["__key__"], "input": s["input.pth"],
                                                    "target": s["target.pth"]}))

    sources = {
        "dataloader": DataLoader(MapDataset(data), batch_size=10),
        "dataloader_workers": DataLoader(MapDataset(data), batch_size=10, num_workers=1),
        "webdataset": load(urls),
        "hf": _hf(60),
        "shards": curate.Shards(urls, load, rank=0, world_size=1),
        "shards_dataloader": DataLoader(curate.Shards(urls, load, rank=0, world_size=1), batch_size=None),
    }
    for name, source in sources.items():
        p = _select(source, shuffle_buffer=0)
        assert [len(_keys(p)) for _ in range(2)] == [12, 12], name
