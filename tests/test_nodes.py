"""Every stage through the one resume harness, plus each stage's own contract."""

import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.nodes import Loader

import curate
from curate import (
    Actor,
    ClassificationScorer,
    JointSelect,
    KeepKeys,
    Prefetch,
    RankSplit,
    Score,
    Shuffle,
    Source,
    Superbatch,
    TrainActor,
    TrainingFlops,
    Unbatch,
)
from curate.nodes import Batch

from .conftest import MapDataset, check_resume, make_samples, roundtrip


def _models():
    torch.manual_seed(0)
    return torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)


STAGES = ["source", "rank_split", "keep_keys", "shuffle", "superbatch", "score", "select", "train_actor", "prefetch",
          "training_flops", "batch", "unbatch"]


def _chain(stage: str, data):
    """The chain of every public stage, in pipeline order, up to `stage`; fresh models (and actor) per build."""
    learner, reference = _models()
    actor = Actor(learner, torch.optim.SGD(learner.parameters(), lr=0.1))
    scorer = ClassificationScorer()
    steps = {
        "source": lambda node: Source(data, group_size=9),
        "rank_split": lambda node: RankSplit(node, rank=1, world_size=2),
        "keep_keys": lambda node: KeepKeys(node, [s["__key__"] for s in data if int(s["__key__"][1:]) % 5]),
        "shuffle": lambda node: Shuffle(node, buffer_size=37, seed=1),
        "superbatch": lambda node: Superbatch(node, 20),
        "score": lambda node: Score(node, actor, reference, scorer, "learnability"),
        "select": lambda node: JointSelect(node, 4, method="sample", seed=3),
        "train_actor": lambda node: TrainActor(node, actor, scorer),
        "prefetch": lambda node: Prefetch(node),
        "training_flops": lambda node: TrainingFlops(node, reference, scorer),
        "unbatch": lambda node: Unbatch(node),
        "batch": lambda node: Batch(node, 7),
    }
    node = None
    for name in STAGES[: STAGES.index(stage) + 1]:
        node = steps[name](node)
    return curate.Pipeline(node)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_resumes_exactly(stage):
    data = make_samples(460)
    full = check_resume(lambda: _chain(stage, data), points=[0, 1, 3, 4])
    assert full, "the stage yielded nothing"


@pytest.mark.parametrize("stage", ["shuffle", "select"])
def test_second_epoch_resumes_exactly(stage):
    """Checkpoints taken in epoch 2 resume into epoch 2's order, not epoch 1's."""
    data = make_samples(400)

    loader = _chain(stage, data)
    epoch1, epoch2 = list(loader), list(loader)
    assert len(epoch1) == len(epoch2)
    assert any(not torch.equal(a["input"], b["input"]) for a, b in zip(epoch1, epoch2, strict=True))
    fresh = _chain(stage, data)
    list(fresh)
    it = iter(fresh)
    head = [next(it) for _ in range(2)]
    resumed = _chain(stage, data)
    resumed.load_state_dict(roundtrip(fresh.state_dict()))
    tail = list(resumed)
    assert [x["__key__"] for x in head + tail] == [x["__key__"] for x in epoch2]


def test_source_splits_dataloader_batches_and_resumes_with_workers():
    data = make_samples(203)
    gen = torch.Generator().manual_seed(5)

    def build():
        gen.manual_seed(5)
        loader = DataLoader(MapDataset(data), batch_size=16, shuffle=True, num_workers=2, generator=gen)
        return curate.Pipeline(Source(loader))

    full = check_resume(build, points=[1, 5, 9])
    assert [len(b["__key__"]) for b in full] == [16] * 12 + [11], "the loader's batches pass through, never split"
    assert sorted(k for b in full for k in b["__key__"]) == sorted(s["__key__"] for s in data)


def test_shuffle_is_a_permutation_and_seeded():
    data = make_samples(100)
    a, b, c = ([k for block in Loader(Shuffle(Source(data, group_size=7), 10, seed=seed)) for k in block["__key__"]]
               for seed in (0, 0, 1))
    assert sorted(a) == [s["__key__"] for s in data] and a == b and a != c
    assert sorted(a[:10]) == [s["__key__"] for s in data[:10]], "a block is a permutation of the next 10 samples"


def test_superbatch_short_tail_is_kept_or_counted():
    data = make_samples(105)
    kept = list(Loader(Superbatch(Source(data), 50)))
    assert [len(b["__key__"]) for b in kept] == [50, 50, 5]
    node = Superbatch(Source(data), 50, drop_last=True)
    assert [len(b["__key__"]) for b in Loader(node)] == [50, 50]
    assert node.stats()["dropped_tail"] == 5


def test_source_rejects_non_iterables():
    with pytest.raises(TypeError, match="expected an iterable"):
        Source(42)


def test_shuffling_dataloader_without_generator_warns():
    with pytest.warns(UserWarning, match="generator="):
        Source(DataLoader(MapDataset(make_samples(10)), shuffle=True))


def test_to_device_moves_tensors_once_and_pipeline_puts_it_before_scoring():
    from torch.utils.data import default_collate

    import curate

    data = make_samples(40)
    batches = [default_collate(data[i:i + 20]) for i in (0, 20)]
    out = list(Loader(curate.ToDevice(Source(batches), "meta")))
    assert [b["input"].device.type for b in out] == ["meta", "meta"]
    assert out[0]["__key__"] == batches[0]["__key__"] and out[0]["target"].dtype == torch.int64
    learner, reference = _models()
    options = dict(learner=learner, reference=reference, scorer=ClassificationScorer(), batch_size=4,
                   filter_ratio=0.8, method="topk")
    assert "to_device" not in curate.pipeline(data, **options).stages  # a CPU learner: batches stay where they are
    chain = [type(n).__name__ for n in curate.pipeline(data, device="meta", **options).chain]
    assert chain[chain.index("Superbatch") + 1:chain.index("Score") + 1] == ["ToDevice", "Score"]
