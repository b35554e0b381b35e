"""curate.learner: every kind of learner= resolves to one LearnerSide (provider, ledger role, sync, trained model)."""

import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

import curate
from curate.learner import as_provider, resolve_learner

from .conftest import make_samples

SCORER = curate.ClassificationScorer()


def _model():
    torch.manual_seed(0)
    return nn.Linear(8, 3)


def test_a_module_is_scored_live_and_its_scoring_forward_is_its_training_forward():
    model = _model()
    side = resolve_learner(model)
    assert isinstance(side.provider, curate.ModelProvider) and side.provider.model is model and side.live
    assert (side.role, side.sync, side.trained, side.scores_training_forward, side.staleness) == (
        "learner", None, model, True, 0)
    assert not resolve_learner(model, train_model=_model()).scores_training_forward  # another model trains
    assert not resolve_learner(model, train_scorer=SCORER).scores_training_forward  # another forward trains


def test_a_prefetched_module_scores_from_a_sync_made_for_it():
    model = _model()
    side = resolve_learner(model, prefetch=1)
    assert isinstance(side.provider, curate.WeightSync) and side.sync is side.provider and side.owns_sync
    assert not side.live and side.trained is model and side.scores_training_forward
    with pytest.raises(ValueError, match="prefetch must be 0 or 1"):
        resolve_learner(model, prefetch=2)


def test_a_weight_sync_lags_by_its_staleness():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = curate.WeightSync(model, every=3).attach(optimizer)
    for _ in range(4):
        optimizer.step()
    side = resolve_learner(sync)
    assert side.staleness == 1 and side.trained is model and side.scores_training_forward and not side.owns_sync


def test_an_actor_is_its_own_ledger_role_and_scores_in_order():
    proxy = _model()
    actor = curate.Actor(proxy, torch.optim.SGD(proxy.parameters(), lr=0.1))
    trained = _model()
    side = resolve_learner(actor, prefetch=1, train_model=trained)
    assert (side.role, side.actor, side.in_order, side.scores_training_forward) == ("actor", actor, True, False)
    assert resolve_learner(side, train_model=trained) is side  # resolved once


def test_a_resolved_side_must_fit_the_pipeline_it_goes_into():
    side = resolve_learner(_model())
    with pytest.raises(ValueError, match="resolve it with prefetch=1"):
        curate.pipeline(make_samples(40), learner=side, scorer=SCORER, rule="hard_learner", batch_size=4, prefetch=1)
    with pytest.raises(ValueError, match="train_model differs"):
        resolve_learner(side, train_model=_model())


def test_providers_must_take_micro_batch_size_and_anything_else_is_refused():
    class Old:
        def scores(self, batch, scorer):
            return None

    with pytest.raises(TypeError, match="must take micro_batch_size"):
        resolve_learner(Old())
    with pytest.raises(TypeError, match="must be an nn.Module or a ScoreProvider"):
        as_provider(42, "reference")


# ---------------------------------------------------------------- sharded learners


@pytest.fixture
def gloo_group(tmp_path):
    """A 1-process gloo group on CPU, for as long as one test runs (FSDP and fully_shard need one)."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already running")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


SUPPORTED = r"curate.WeightSync\(full\).*full state dict.*sync.push\(\).*curate.Actor"


def _refused(model, what):
    """resolve_learner, pipeline(learner=) and WeightSync all refuse `model`, naming `what` and the ways that work."""
    with pytest.raises(ValueError, match=f"resolve_learner: the learner is {what}.*{SUPPORTED}"):
        resolve_learner(model)
    with pytest.raises(ValueError, match=what):
        curate.pipeline(make_samples(40), learner=model, scorer=SCORER, rule="hard_learner", batch_size=4)
    with pytest.raises(ValueError, match=f"WeightSync: the learner is {what}"):
        curate.WeightSync(model)


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")  # one rank: nothing to shard over
def test_an_fsdp_learner_is_refused(gloo_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    _refused(FullyShardedDataParallel(_model(), device_id=torch.device("cpu")), r"FSDP-wrapped")
    outer = nn.Sequential(FullyShardedDataParallel(_model(), device_id=torch.device("cpu")))  # wrapped inside
    _refused(outer, r"FSDP-wrapped")


def test_a_fully_sharded_learner_is_refused_and_a_synced_full_copy_scores_in_its_place(gloo_group):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    sharded = fully_shard(_model(), mesh=mesh)
    _refused(sharded, "sharded: its parameters are DTensors")
    with_dtensors = _model()  # DTensor parameters without fully_shard (e.g. tensor parallelism)
    with_dtensors.weight = nn.Parameter(distribute_tensor(with_dtensors.weight.detach(), mesh))
    _refused(with_dtensors, "sharded: its parameters are DTensors")

    # the way the error names: a WeightSync over a full copy, loaded from the gathered state dict, pushed
    full = _model()
    sync = curate.WeightSync(full)
    optimizer = torch.optim.SGD(sharded.parameters(), lr=0.5)
    batch = default_collate(make_samples(16))
    nn.functional.cross_entropy(sharded(batch["input"]), batch["target"]).backward()
    optimizer.step()
    full.load_state_dict(get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True)))
    assert sync.push() == 1
    trained = {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in sharded.named_parameters()}
    expected = nn.functional.cross_entropy(torch.func.functional_call(_model(), trained, batch["input"]),
                                           batch["target"], reduction="none")
    torch.testing.assert_close(resolve_learner(sync).provider.scores(batch, SCORER, 8).loss, expected.detach())


def test_a_deepspeed_engine_is_refused_by_its_type_and_zero3_by_its_parameters():
    engine_type = type("DeepSpeedEngine", (nn.Module,), {"__module__": "deepspeed.runtime.engine"})
    engine = engine_type()
    engine.module = _model()
    _refused(engine, r"a DeepSpeed engine \(DeepSpeedEngine\)")
    partitioned = _model()
    for i, param in enumerate(partitioned.parameters()):
        param.ds_id = i  # what deepspeed.zero.Init marks the parameters it partitions with
    _refused(partitioned, "partitioned by DeepSpeed ZeRO-3")
