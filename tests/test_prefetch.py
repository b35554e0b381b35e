"""pipeline(prefetch=1): superbatch n+1 is scored in a background thread while batch n trains.

The claim, proved against a hand-written replay: prefetch=0 is live scoring (superbatch n scored with
the weights after n steps); prefetch=1 is live scoring with the weights of one step earlier (after
n − 1 steps), whatever the timing of the two threads.
"""

import copy
import random
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

import curate
from curate.batch import take
from curate.scorers import score_model
from curate.sync import WeightSync

from .conftest import check_resume, make_samples

B, b = 24, 6
SCORER = curate.ClassificationScorer()


class JitteryScorer(curate.ClassificationScorer):
    """A real scorer that sleeps a little at random, so any race between scoring and training would show."""

    def __init__(self, seed=0, most=0.002):
        super().__init__()
        self.rng, self.most = random.Random(seed), most

    def __call__(self, model, batch):
        time.sleep(self.rng.uniform(0, self.most))
        return super().__call__(model, batch)


class SleepyScorer(curate.ClassificationScorer):
    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def __call__(self, model, batch):
        time.sleep(self.seconds)
        return super().__call__(model, batch)


class JitteryCollate:
    """Collates superbatches with a random delay, as data loading has, so the thread's timing varies."""

    def __init__(self, seed=0, most=0.002):
        self.rng, self.most = random.Random(seed), most

    def __call__(self, samples):
        time.sleep(self.rng.uniform(0, self.most))
        return default_collate(samples)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _step(model, opt, batch):
    opt.zero_grad()
    F.cross_entropy(model(batch["input"]), batch["target"]).backward()
    opt.step()


def _train_through_pipeline(data, prefetch, kind, jitter=0.002):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    learner = model if kind == "module" else WeightSync(model).attach(opt)
    pipe = curate.pipeline(data, batch_size=b, superbatch_size=B, learner=learner, scorer=JitteryScorer(most=jitter),
                           rule="hard_learner", method="topk", shuffle_buffer=0, prefetch=prefetch,
                           collate=JitteryCollate(most=jitter))
    rng, keys = random.Random(1), []
    for batch in pipe:
        keys.append(batch["__key__"])
        time.sleep(rng.uniform(0, jitter))
        _step(model, opt, batch)
    return keys, pipe.stats()


def _replay(data, lag):
    """By hand: superbatch n is scored with the weights after max(n − lag, 0) training steps."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    history, keys, scorer = [copy.deepcopy(model.state_dict())], [], copy.deepcopy(model)
    for n, start in enumerate(range(0, len(data), B)):
        superbatch = default_collate(data[start:start + B])
        scorer.load_state_dict(history[max(n - lag, 0)])
        loss = score_model(scorer, superbatch, curate.ClassificationScorer(), 1024).loss
        batch = take(superbatch, torch.topk(loss, b).indices)
        keys.append(batch["__key__"])
        _step(model, opt, batch)
        history.append(copy.deepcopy(model.state_dict()))
    return keys


@pytest.mark.parametrize("kind", ["module", "sync"])
def test_prefetch_scores_with_the_weights_of_one_step_earlier(kind):
    data = make_samples(B * 16)
    live, one_step_earlier = _replay(data, lag=0), _replay(data, lag=1)
    assert live != one_step_earlier  # the two claims are distinguishable on this data
    keys, stats = _train_through_pipeline(data, prefetch=0, kind=kind)
    assert keys == live and stats["score_lag_steps"] == 0
    keys, stats = _train_through_pipeline(data, prefetch=1, kind=kind)
    assert keys == one_step_earlier and stats["score_lag_steps"] == 1
    assert stats["sync"]["version"] >= 16


def test_prefetch_overlaps_scoring_with_training():
    """Scoring and training each take ~40 ms a batch: in sequence ~80 ms, overlapped ~40 ms."""
    data = make_samples(B * 8)

    def run(prefetch):
        model = _mlp()
        pipe = curate.pipeline(data, batch_size=b, superbatch_size=B, learner=model, rule="hard_learner",
                               scorer=SleepyScorer(0.04), method="topk", shuffle_buffer=0, prefetch=prefetch,
                               count_flops=False)
        start = time.perf_counter()
        for _ in pipe:
            time.sleep(0.04)  # the training step (sleep releases the GIL, like a CUDA step or a C++ kernel)
        return time.perf_counter() - start

    sequential, overlapped = run(0), run(1)
    assert overlapped < 0.75 * sequential, f"{overlapped=:.3f}s {sequential=:.3f}s"


def test_prefetch_stream_equals_no_prefetch_for_a_fixed_model_over_two_epochs():
    data = make_samples(B * 5 + 7)  # a short last superbatch too
    model = _mlp()

    def epochs(prefetch):
        pipe = curate.pipeline(data, batch_size=b, superbatch_size=B, learner=model, scorer=SCORER,
                               rule="hard_learner", method="sample", shuffle_buffer=40, seed=3, prefetch=prefetch)
        return [[x["__key__"] for x in pipe] for _ in range(2)]

    plain, prefetched = epochs(0), epochs(1)
    assert plain == prefetched and plain[0] != plain[1] and len(plain[0]) == 6


def test_prefetch_resumes_exactly():
    data = make_samples(B * 6)
    model = _mlp()

    def build():
        return curate.pipeline(data, batch_size=b, superbatch_size=B, learner=model, scorer=SCORER,
                               rule="hard_learner", method="sample", shuffle_buffer=30, seed=1, prefetch=1)

    check_resume(build, points=[1, 4])


class FailingScorer(curate.ClassificationScorer):
    def __init__(self, fail_at):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("scorer broke on purpose")
        return super().__call__(model, batch)


def test_an_error_in_the_background_thread_reaches_the_loop():
    pipe = curate.pipeline(make_samples(B * 5), batch_size=b, superbatch_size=B, learner=_mlp(),
                           scorer=FailingScorer(fail_at=3), rule="hard_learner", method="topk", shuffle_buffer=0,
                           prefetch=1, count_flops=False)
    it = iter(pipe)
    next(it), next(it)
    with pytest.raises(RuntimeError, match="scorer broke on purpose"):
        next(it)


def test_prefetch_must_be_0_or_1():
    with pytest.raises(ValueError, match="prefetch must be 0 or 1, got prefetch=2"):
        curate.pipeline(make_samples(10), batch_size=2, learner=_mlp(), scorer=curate.ClassificationScorer(),
                        rule="hard_learner", prefetch=2)
