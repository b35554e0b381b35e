import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from curate.losses import sigmoid_pair_losses, softmax_example_losses
from curate.rules import get_rule
from curate.scorers import ModelScores
from curate.selection import DenseGain, SigmoidGain, SoftmaxGain, chunk_sizes, joint, sample, topk


def _scores(kind, n=64, d=16, seed=0, scale=8.0, bias=-4.0):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=g), dim=1)
    v = F.normalize(u + torch.randn(n, d, generator=g), dim=1)
    return ModelScores(kind, u, v, scale, bias if kind == "sigmoid" else 0.0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_topk_is_the_k_best():
    scores = torch.tensor([0.1, 3.0, -1.0, 2.0, 2.5])
    assert topk(scores, 3).tolist() == [1, 4, 3]


def test_sample_exact_size_unique_and_seeded():
    scores = torch.randn(200)
    a = sample(scores, 40, generator=_gen(1))
    assert a.numel() == 40 and a.unique().numel() == 40
    assert torch.equal(a, sample(scores, 40, generator=_gen(1)))
    assert not torch.equal(a, sample(scores, 40, generator=_gen(2)))


def test_sample_at_zero_temperature_is_topk():
    scores = torch.randn(100)
    assert set(sample(scores, 10, temperature=0.0, generator=_gen(0)).tolist()) == set(topk(scores, 10).tolist())


def test_sample_draws_in_proportion_to_softmax():
    scores = torch.tensor([0.0, 1.0, 2.0, -1.0])
    expected = torch.softmax(scores / 0.5, 0)
    counts = torch.zeros(4)
    g = _gen(0)
    n = 20000
    for _ in range(n):
        counts[sample(scores, 1, temperature=0.5, generator=g)] += 1
    # 4 standard errors of a binomial proportion
    tolerance = 4 * (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() < tolerance).all(), (counts / n, expected)


def test_chunk_sizes_round_to_within_one():
    assert chunk_sizes(32, 16) == [2] * 16
    sizes = chunk_sizes(100, 16)
    assert sum(sizes) == 100 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="n_chunks"):
        chunk_sizes(4, 5)


@pytest.mark.parametrize("rule", ["learnability", "hard_learner", "easy_reference"])
@pytest.mark.parametrize("seed", range(4))
def test_memory_efficient_joint_equals_dense(rule, seed):
    learner, reference = _scores("sigmoid", seed=seed), _scores("sigmoid", seed=100 + seed, scale=5.0)
    fn = get_rule(rule)
    dense = fn(sigmoid_pair_losses(learner.image_emb, learner.text_emb, learner.scale, learner.bias),
               sigmoid_pair_losses(reference.image_emb, reference.text_emb, reference.scale, reference.bias))
    a = joint(DenseGain(dense), 16, n_chunks=4, generator=_gen(seed))
    b = joint(SigmoidGain(learner, reference, fn), 16, n_chunks=4, generator=_gen(seed))
    assert a.tolist() == b.tolist()


def _siglip_set_score(scores: ModelScores, subset: list[int]) -> torch.Tensor:
    """Brute force from open_clip: the summed SigLIP loss of the sub-batch, |S| · SigLipLoss(S)."""
    idx = torch.tensor(subset)
    loss = SigLipLoss()(scores.image_emb[idx], scores.text_emb[idx], torch.tensor(scores.scale),
                        torch.tensor(scores.bias))
    return loss * len(subset)


def test_sigmoid_conditional_gain_is_brute_force_set_difference():
    learner, reference = _scores("sigmoid", n=12, seed=3), _scores("sigmoid", n=12, seed=4)
    gain = SigmoidGain(learner, reference, get_rule("learnability"))
    chunks = [torch.tensor([2, 7]), torch.tensor([0, 11, 5])]
    logits = gain.first()
    selected: list[int] = []
    for chunk in [None, *chunks]:
        if chunk is not None:
            logits = gain.add(chunk)
            selected += chunk.tolist()
        for k in range(12):
            if k in selected:
                continue
            def s(subset):
                if not subset:
                    return torch.tensor(0.0)
                return _siglip_set_score(learner, subset) - _siglip_set_score(reference, subset)
            expected = s(selected + [k]) - s(selected)
            torch.testing.assert_close(logits[k], expected, rtol=1e-4, atol=1e-4)


def test_softmax_gain_is_each_candidates_loss_within_the_selected_set():
    learner, reference = _scores("softmax", n=12, seed=5, scale=6.0), _scores("softmax", n=12, seed=6, scale=4.0)
    rule = get_rule("learnability")
    gain = SoftmaxGain(learner, reference, rule, learner.loss, reference.loss)
    torch.testing.assert_close(gain.first(), learner.loss - reference.loss)
    selected = [1, 4, 9]
    logits = gain.add(torch.tensor(selected))
    for k in set(range(12)) - set(selected):
        idx = torch.tensor(selected + [k])

        def loss_of_k(s, idx=idx):
            return softmax_example_losses(s.image_emb[idx], s.text_emb[idx], s.scale)[-1]

        torch.testing.assert_close(logits[k], loss_of_k(learner) - loss_of_k(reference), rtol=1e-4, atol=1e-4)


def test_one_chunk_is_independent_sampling_from_the_diagonal():
    learner, reference = _scores("sigmoid", seed=7), _scores("sigmoid", seed=8)
    rule = get_rule("learnability")
    gain = SigmoidGain(learner, reference, rule)
    diagonal = gain.first()
    dense = rule(sigmoid_pair_losses(learner.image_emb, learner.text_emb, learner.scale, learner.bias),
                 sigmoid_pair_losses(reference.image_emb, reference.text_emb, reference.scale, reference.bias))
    torch.testing.assert_close(diagonal, torch.diagonal(dense))
    picked = joint(gain, 20, n_chunks=1, generator=_gen(3))
    assert picked.tolist() == sample(diagonal, 20, generator=_gen(3)).tolist()


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_joint_exact_size_no_duplicates_seeded(kind):
    learner, reference = _scores(kind, n=100, seed=1), _scores(kind, n=100, seed=2)
    rule = get_rule("learnability")

    def draw(seed):
        gain = (SigmoidGain(learner, reference, rule) if kind == "sigmoid"
                else SoftmaxGain(learner, reference, rule, learner.loss, reference.loss))
        return joint(gain, 30, n_chunks=7, generator=_gen(seed))

    a = draw(0)
    assert a.numel() == 30 and a.unique().numel() == 30
    assert torch.equal(a, draw(0))
    assert not torch.equal(a, draw(1))


def test_joint_prefers_the_jointly_learnable_set():
    # Greedy joint selection (temperature 0) maximises the set score better than a random set
    learner, reference = _scores("sigmoid", n=80, seed=11), _scores("sigmoid", n=80, seed=12)
    rule = get_rule("learnability")
    dense = rule(sigmoid_pair_losses(learner.image_emb, learner.text_emb, learner.scale, learner.bias),
                 sigmoid_pair_losses(reference.image_emb, reference.text_emb, reference.scale, reference.bias))
    picked = joint(SigmoidGain(learner, reference, rule), 16, n_chunks=16, temperature=0, generator=_gen(0))
    set_score = dense[picked][:, picked].sum()
    subsets = (torch.randperm(80, generator=_gen(s))[:16] for s in range(50))
    random_scores = [dense[idx][:, idx].sum() for idx in subsets]
    assert set_score > max(random_scores)


def test_bad_selection_sizes():
    with pytest.raises(ValueError, match="cannot keep 11 of 10"):
        topk(torch.zeros(10), 11)
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.zeros(10), 3, temperature=-1.0)
