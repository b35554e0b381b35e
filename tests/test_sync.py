"""WeightSync: in-process snapshots, shared-memory snapshots read by real DataLoader workers, bad input."""

import copy
import gc
import os
import pickle
import time
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

import curate
from curate.nodes import Source, Superbatch
from curate.score import Score
from curate.scorers import score_model
from curate.sync import WeightSync

from .conftest import make_samples

SCORER = curate.ClassificationScorer()


def _mlp(seed=0, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def _step(model, opt, batch):
    opt.zero_grad()
    F.cross_entropy(model(batch["input"]), batch["target"]).backward()
    opt.step()


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- in-process


def test_push_copies_the_learner_and_counts_versions():
    data = default_collate(make_samples(32))
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sync = WeightSync(model)
    assert sync.version == 0 and _equal_states(_state(sync.module), _state(model))
    _step(model, opt, data)
    assert not _equal_states(_state(sync.module), _state(model))  # a copy: training does not touch it
    assert sync.push() == 1 and sync.version == 1
    assert _equal_states(_state(sync.module), _state(model))
    assert torch.equal(sync.scores(data, SCORER).loss, score_model(model, data, SCORER, 1024).loss)
    assert not any(p.requires_grad for p in sync.module.parameters())


def test_attach_pushes_every_k_steps_and_reports_staleness():
    data = default_collate(make_samples(32))
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sync = WeightSync(model, every=3).attach(opt)
    history = {0: _state(model)}
    for step in range(1, 8):
        _step(model, opt, data)
        history[step] = _state(model)
        assert sync.steps == step
        assert sync.synced_step == step - step % 3 and sync.staleness == step % 3 < 3
        assert _equal_states(_state(sync.module), history[sync.synced_step])
    assert sync.stats() | {"push_seconds": 0} == {"version": 2, "steps": 7, "synced_step": 6, "staleness": 1,
                                                   "every": 3, "push_seconds": 0}
    sync.detach()
    for _ in range(3):
        _step(model, opt, data)
    assert sync.version == 2 and sync.steps == 7


def test_shared_sync_pickles_handles_not_weights():
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))  # 1 MiB of weights
    sync = WeightSync(model, shared=True)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    payload = len(ForkingPickler.dumps(sync))  # what DataLoader workers receive (spawn)
    assert payload < weights / 20, f"{payload=} bytes for {weights=}: the weights were pickled"
    assert all(t.is_shared() for t in sync.module.state_dict().values())


def test_a_pickled_shared_sync_takes_the_same_lock_and_a_dead_holder_times_out(monkeypatch):
    """The cross-process lock travels in any pickle (a queue, not only a child's start-up arguments) as the same
    semaphore; a holder that never releases it (a worker killed mid-update) makes a push fail, naming why."""
    model = _mlp()
    sync = WeightSync(model, shared=True)
    received = ForkingPickler.loads(ForkingPickler.dumps(sync))
    monkeypatch.setattr("curate.sync._LOCK_TIMEOUT_S", 0.2)
    with received._counters():  # as a worker that died holding the lock would leave it
        with pytest.raises(TimeoutError, match="a process that held it died"):
            sync.push()
    assert sync.push() == 1  # released: pushes go on


# ---------------------------------------------------------------- DataLoader workers


class ScoredStream(IterableDataset):
    """Each DataLoader worker runs a Score stage on its shard of superbatches, scoring from the WeightSync."""

    def __init__(self, sync, samples, superbatch, repeats):
        self.sync, self.samples, self.superbatch, self.repeats = sync, samples, superbatch, repeats

    def __iter__(self):
        info = get_worker_info()
        shard = self.samples[info.id::info.num_workers] * self.repeats
        node = Score(Superbatch(Source(shard), self.superbatch), learner=self.sync, scorer=SCORER,
                     rule="hard_learner", count_flops=False)
        while True:
            steps_before = self.sync.steps  # the learner's step when this scoring starts
            try:
                scored = next(node)
            except StopIteration:
                return
            yield {"keys": scored.keys, "loss": scored.learner.loss, "version": self.sync.version,
                   "synced_step": self.sync.synced_step, "lag": steps_before - self.sync.synced_step,
                   "worker": info.id, "pid": os.getpid()}


def _live_loss(model, state, samples_by_key, keys):
    model = copy.deepcopy(model)
    model.load_state_dict(state)
    return score_model(model, default_collate([samples_by_key[k] for k in keys]), SCORER, 1024).loss


@pytest.mark.parametrize("every,context", [(1, "fork"), pytest.param(1, "spawn", marks=pytest.mark.slow), (3, "fork")])
def test_dataloader_workers_score_with_the_synced_weights(every, context):
    samples = make_samples(64)
    by_key = {s["__key__"]: s for s in samples}
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sync = WeightSync(model, every=every, shared=True).attach(opt)
    loader = DataLoader(ScoredStream(sync, samples, superbatch=8, repeats=4), batch_size=None, num_workers=2,
                        prefetch_factor=1, multiprocessing_context=context)
    history, items, n_train = {0: _state(model)}, [], 18
    for i, item in enumerate(loader):
        items.append(item)
        if i < n_train:  # train on the scored superbatch; the optimizer hook pushes every `every` steps
            _step(model, opt, default_collate([by_key[k] for k in item["keys"]]))
            history[sync.steps] = _state(model)
    assert len(items) == 32 and {it["pid"] for it in items}.isdisjoint({os.getpid()})
    for item in items:  # every score is, bit for bit, the live learner's at the step the worker synced to
        assert item["synced_step"] % every == 0 and item["version"] == item["synced_step"] // every
        assert item["lag"] <= every  # (negative when a push landed between reading the step and scoring)
        assert torch.equal(item["loss"], _live_loss(model, history[item["synced_step"]], by_key, item["keys"]))
    for worker in (0, 1):  # the version each worker sees only moves forward, and it does move
        versions = [it["version"] for it in items if it["worker"] == worker]
        assert versions == sorted(versions) and versions[-1] > versions[0]
    # once training stopped, every superbatch requested after the last push scores with the final weights
    assert sync.version == n_train // every
    for item in items[n_train + 2:]:
        assert item["version"] == sync.version
        live = score_model(model, default_collate([by_key[k] for k in item["keys"]]), SCORER, 1024).loss
        assert torch.equal(item["loss"], live)


def _read_while_pushed(sync, reads, results):
    torn, seen = 0, set()
    for _ in range(reads):
        values = {v for t in sync.scoring_module().state_dict().values() for v in t.unique().tolist()}
        torn += len(values) != 1 or values != {float(sync.version)}
        seen |= values
    try:
        sync.push()
        error = None
    except RuntimeError as e:
        error = str(e)
    results.put((torn, len(seen), error))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_workers_never_score_with_half_written_weights():
    """A reader copies while the owner pushes as fast as it can: every copy must be one whole version."""
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(8)])
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    sync = WeightSync(model, shared=True)
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    reader = ctx.Process(target=_read_while_pushed, args=(sync, 300, results))
    reader.start()
    version, deadline = 0, time.monotonic() + 60
    while results.empty() and time.monotonic() < deadline:
        version += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(version)  # every tensor of version v holds only the value v
        assert sync.push() == version
    torn, distinct, error = results.get(timeout=10)
    reader.join(timeout=10)
    assert torn == 0
    assert distinct > 5, "the reader should have seen many versions while pushes were under way"
    assert "only the process that owns the learner" in error


def _check_every_refresh(sync, stop, results):
    """A spawned reader: refresh until told to stop; each copy must hold one version in every tensor."""
    torn, versions = 0, []
    sync.scoring_module()
    results.put("ready")  # the owner pushes once both readers run: spawning them takes seconds
    while not stop.is_set():
        values = {v for t in sync.scoring_module().state_dict().values() for v in t.unique().tolist()}
        torn += values != {float(sync.version)}
        if not versions or versions[-1] != sync.version:
            versions.append(sync.version)
    results.put((torn, versions))


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_spawned_readers_only_ever_see_whole_versions():
    """The owner pushes version after version (every parameter equal to the version number) while two spawned
    readers refresh as fast as they can: every copy is one whole version, and versions only move forward. This
    holds by the lock's acquire/release semantics on any CPU (on x86-64 the old seqlock passed it too: TSO hid
    the missing barriers)."""
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(6)])
    _fill(model, 0)
    sync = WeightSync(model, shared=True)
    ctx = mp.get_context("spawn")
    stop, results = ctx.Event(), ctx.Queue()
    readers = [ctx.Process(target=_check_every_refresh, args=(sync, stop, results)) for _ in range(2)]
    for reader in readers:
        reader.start()
    assert [results.get(timeout=30) for _ in readers] == ["ready"] * 2
    version, deadline = 0, time.monotonic() + 2
    while time.monotonic() < deadline:
        version += 1
        _fill(model, version)
        assert sync.push() == version
    stop.set()
    outcomes = [results.get(timeout=30) for _ in readers]
    for reader in readers:
        reader.join(timeout=10)
        assert reader.exitcode == 0
    for torn, versions in outcomes:
        assert torn == 0
        assert versions == sorted(versions) and len(versions) > 5, versions


def _fill(model, value):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


# ---------------------------------------------------------------- bad input


def test_sync_into_a_model_with_other_shapes_names_the_parameter():
    with pytest.raises(ValueError, match=r"parameter '2.weight' has shape \(3, 16\) in the learner but \(4, 16\)"):
        WeightSync(_mlp(), module=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    with pytest.raises(ValueError, match=r"missing \['0.bias', '0.weight'"):
        WeightSync(_mlp(), module=nn.Linear(8, 3))
    model = _mlp()
    sync = WeightSync(model)
    before = _state(sync.module)
    model[2].weight = nn.Parameter(torch.randn(3, 16) + 5)
    model[0].weight = nn.Parameter(torch.randn(4, 8))  # shape changed: the push must not half-apply
    with pytest.raises(ValueError, match="'0.weight' has shape"):
        sync.push()
    assert _equal_states(_state(sync.module), before)


def test_push_after_the_learner_is_gone_raises():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = WeightSync(model).attach(opt)
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match="learner was garbage-collected"):
        sync.push()
    with pytest.raises(RuntimeError, match="learner was garbage-collected"):
        opt.step()  # the optimizer still holds the parameters; its hook finds the module gone


def test_in_process_sync_refuses_other_processes():
    sync = WeightSync(_mlp())
    with pytest.raises(TypeError, match="shared=True"):
        ForkingPickler.dumps(sync)
    loader = DataLoader(ScoredStream(sync, make_samples(16), 8, 1), batch_size=None, num_workers=1,
                        multiprocessing_context="fork")
    with pytest.raises(RuntimeError, match="will never see a push"):
        next(iter(loader))
    shared = WeightSync(_mlp(), shared=True)
    with pytest.raises(TypeError, match="without shared memory"):
        pickle.loads(pickle.dumps(shared))  # plain pickle copies the weights: it could never see a push


def test_bad_arguments():
    with pytest.raises(ValueError, match="every must be a positive int"):
        WeightSync(_mlp(), every=0)
    with pytest.raises(ValueError, match="device must be 'cpu'"):
        WeightSync(_mlp(), shared=True, device="cuda")
    with pytest.raises(TypeError, match="learner must be an nn.Module"):
        WeightSync("model")
    sync = WeightSync(_mlp())
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        sync.attach(object())
