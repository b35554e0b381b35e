import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from curate import selection
from curate.losses import sigmoid_pair_losses, softmax_example_losses
from curate.rules import Rule, get_rule
from curate.scorers import ModelScores
from curate.selection import DenseGain, SigmoidGain, SoftmaxGain, chunk_sizes, joint, sample, sampling_entropy, topk


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


def test_sampling_entropy_is_the_normalised_shannon_entropy_of_the_draw():
    logits = torch.tensor([2.0, 0.5, -1.0, float("-inf"), 0.0])
    for t in (0.5, 1.0, 3.0):
        p = torch.softmax(logits[[0, 1, 2, 4]].double() / t, 0)
        expected = -(p * p.log()).sum() / torch.log(torch.tensor(4.0, dtype=torch.float64))  # 4 finite candidates
        assert float(sampling_entropy(logits, t)) == pytest.approx(float(expected), rel=1e-5)
    assert float(sampling_entropy(torch.full((7,), 3.0), 1.0)) == pytest.approx(1.0)  # uniform
    assert float(sampling_entropy(logits, 0.0)) == 0.0  # greedy
    assert float(sampling_entropy(torch.tensor([1.0, float("-inf")]), 1.0)) == 0.0  # one candidate left


def test_recording_entropies_leaves_the_draw_unchanged_and_gives_one_per_chunk():
    learner, reference = _scores("sigmoid", seed=7), _scores("sigmoid", seed=8)
    rule = get_rule("learnability")
    entropies: list = []
    picked = joint(SigmoidGain(learner, reference, rule), 20, n_chunks=4, generator=_gen(3), entropies=entropies)
    assert picked.tolist() == joint(SigmoidGain(learner, reference, rule), 20, n_chunks=4, generator=_gen(3)).tolist()
    gain = SigmoidGain(learner, reference, rule)
    expected = [sampling_entropy(gain.first(), 1.0)]
    for chunk in picked.split(5)[:-1]:  # chunk i+1 draws from the gains after chunks 1..i, over the rest
        logits = gain.add(chunk)
        taken = torch.isin(torch.arange(64), picked[: 5 * len(expected)])
        expected.append(sampling_entropy(logits.masked_fill(taken, float("-inf")), 1.0))
    torch.testing.assert_close(torch.stack(entropies), torch.stack(expected))
    one: list = []
    assert sample(gain.first(), 20, generator=_gen(3), entropies=one).tolist() == \
        sample(gain.first(), 20, generator=_gen(3)).tolist() and len(one) == 1


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


@pytest.mark.parametrize("seed", range(3))
def test_joint_given_draws_conditioned_on_them_as_greedy_brute_force(seed):
    dense = torch.randn(30, 30, generator=_gen(seed))
    given = torch.tensor([3, 17, 25])
    picked = joint(DenseGain(dense), 6, n_chunks=6, temperature=0, given=given)

    def score(subset):
        return dense[subset][:, subset].sum()

    chosen, expected = given.tolist(), []
    for _ in range(6):  # one greedy pick per chunk: the best marginal gain given everything in the batch so far
        best = max((j for j in range(30) if j not in chosen), key=lambda j: score(chosen + [j]) - score(chosen))
        chosen.append(best)
        expected.append(best)
    assert picked.tolist() == expected
    with pytest.raises(ValueError, match="cannot keep 31 of 30"):  # the given count towards the batch
        joint(DenseGain(dense), 28, n_chunks=4, given=given)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_joint_adds_a_given_set_larger_than_a_chunk_in_pieces_as_at_once(kind):
    scores = _scores(kind, n=40, d=8, scale=6.0, bias=-3.0)
    rule = get_rule("hard_learner")

    def gain():
        if kind == "sigmoid":
            return SigmoidGain(scores, None, rule)
        return SoftmaxGain(scores, None, rule, scores.loss, None)

    given = torch.tensor([5, 9, 13, 21, 30, 33, 38])  # more than a chunk (2): added in pieces
    whole = gain()
    after = whole.add(given)  # the same set added in one piece
    picked = joint(gain(), 6, n_chunks=3, temperature=0.0, given=given)
    expected = joint(_Given(whole, after, given), 6, n_chunks=3, temperature=0.0)
    assert picked.tolist() == expected.tolist() and not set(picked.tolist()) & set(given.tolist())


class _Given:
    """`gain` after `given` was added in one piece (its logits `after`), with `given` masked out."""

    def __init__(self, gain, after, given):
        self.gain, self.after, self.taken = gain, after, torch.isin(torch.arange(len(after)), given)

    def first(self):
        return self.after.masked_fill(self.taken, float("-inf"))

    def add(self, chunk):
        return self.gain.add(chunk).masked_fill(self.taken, float("-inf"))


def test_bad_selection_sizes():
    with pytest.raises(ValueError, match="cannot keep 11 of 10"):
        topk(torch.zeros(10), 11)
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.zeros(10), 3, temperature=-1.0)


def _trained_like(kind, n, d, seed, scale, bias, like=None):
    """Clustered embeddings with close image/text pairs; with `like`, a small perturbation of that model's
    (a reference close to the learner, so learnability cancels between them pair by pair)."""
    g = _gen(seed)
    if like is None:
        centers = torch.randn(6, d, generator=g)
        u = F.normalize(centers[torch.randint(6, (n,), generator=g)] + 0.4 * torch.randn(n, d, generator=g), dim=1)
        v = F.normalize(u + 0.3 * torch.randn(n, d, generator=g), dim=1)
    else:
        u = F.normalize(like.image_emb + 0.1 * torch.randn(n, d, generator=g), dim=1)
        v = F.normalize(like.text_emb + 0.1 * torch.randn(n, d, generator=g), dim=1)
    return ModelScores(kind, u, v, scale, bias if kind == "sigmoid" else 0.0)


def _models(kind, data, n=240):
    if data == "random":
        return _scores(kind, n=n, d=32, seed=21, scale=10.0, bias=-10.0), _scores(kind, n=n, d=32, seed=22)
    learner = _trained_like(kind, n, 32, 23, 10.0, -10.0)
    return learner, _trained_like(kind, n, 32, 24, 9.0, -9.0, like=learner)


class _Recorded:
    """A gain that records every logits vector it returns."""

    def __init__(self, gain):
        self.gain, self.logits = gain, []

    def first(self):
        self.logits.append(self.gain.first())
        return self.logits[-1]

    def add(self, chunk):
        self.logits.append(self.gain.add(chunk))
        return self.logits[-1]


def _squared_learner(learner, reference):  # a rule that is not linear in the losses
    return learner * learner - reference


_RULES = {"learnability": get_rule("learnability"), "hard_learner": get_rule("hard_learner"),
          "squared": Rule(_squared_learner, True, True)}


@pytest.mark.parametrize("tile", [None, 100])  # the default (one tile here) and ragged row tiles of 100 floats
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("n_chunks", [1, 3, 8])
@pytest.mark.parametrize("rule", sorted(_RULES))
@pytest.mark.parametrize("data", ["random", "trained"])
def test_fused_sigmoid_gain_equals_the_dense_matrix(data, rule, n_chunks, temperature, tile, monkeypatch):
    if tile is not None:
        monkeypatch.setattr(selection, "_TILE", tile)
    learner, reference = _models("sigmoid", data)
    fn = _RULES[rule]
    pairs = [sigmoid_pair_losses(m.image_emb, m.text_emb, m.scale, m.bias) for m in (learner, reference)]
    fused, dense = _Recorded(SigmoidGain(learner, reference, fn)), _Recorded(DenseGain(fn(*pairs)))
    picked = joint(fused, 48, n_chunks=n_chunks, temperature=temperature, generator=_gen(5))
    assert picked.tolist() == joint(dense, 48, n_chunks=n_chunks, temperature=temperature, generator=_gen(5)).tolist()
    # the logits against the dense matrix in float64, at each step
    exact = DenseGain(fn(*(sigmoid_pair_losses(m.image_emb.double(), m.text_emb.double(), m.scale, m.bias)
                           for m in (learner, reference))))
    exact.scores = exact.scores.double()
    exact.gain = exact.gain.double()
    free = torch.ones(240, dtype=torch.bool)
    starts = [0, *torch.tensor(chunk_sizes(48, n_chunks)).cumsum(0).tolist()]
    for step, got in enumerate(fused.logits):
        if step:
            chunk = picked[starts[step - 1]:starts[step]]
            free[chunk] = False
            expected = exact.add(chunk)
        else:
            expected = exact.first()
        scale = expected.abs().max()
        torch.testing.assert_close(got[free].double(), expected[free], rtol=0, atol=5e-6 * scale)
        torch.testing.assert_close(got[free], dense.logits[step][free], rtol=0, atol=5e-6 * scale)
        # the chunks already taken (masked from then on) hold their corrected diagonal too
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=5e-6 * scale)


class _DenseSoftmaxGain:
    """SoftmaxGain's approximation from explicit |S|-column logit matrices and torch.logsumexp."""

    def __init__(self, learner, reference, rule):
        self.models, self.rule, self.selected = (learner, reference), rule, torch.tensor([], dtype=torch.long)

    def first(self):
        return self.rule(*(m.loss for m in self.models))

    def add(self, chunk):
        self.selected = torch.cat([self.selected, chunk])
        losses = []
        for m in self.models:
            positive = m.scale * (m.image_emb * m.text_emb).sum(1)
            row = torch.cat([positive[:, None], m.scale * m.image_emb @ m.text_emb[self.selected].T], 1)
            col = torch.cat([positive[:, None], m.scale * m.text_emb @ m.image_emb[self.selected].T], 1)
            losses.append((torch.logsumexp(row, 1) + torch.logsumexp(col, 1)) / 2 - positive)
        return self.rule(*losses)


@pytest.mark.parametrize("tile", [None, 100])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("n_chunks", [1, 3, 8])
@pytest.mark.parametrize("data", ["random", "trained"])
def test_fused_softmax_gain_equals_explicit_logsumexp(data, n_chunks, temperature, tile, monkeypatch):
    if tile is not None:
        monkeypatch.setattr(selection, "_TILE", tile)
    learner, reference = _models("softmax", data)
    rule = get_rule("learnability")
    fused = _Recorded(SoftmaxGain(learner, reference, rule, learner.loss, reference.loss))
    dense = _Recorded(_DenseSoftmaxGain(learner, reference, rule))
    picked = joint(fused, 48, n_chunks=n_chunks, temperature=temperature, generator=_gen(6))
    assert picked.tolist() == joint(dense, 48, n_chunks=n_chunks, temperature=temperature, generator=_gen(6)).tolist()
    for got, expected in zip(fused.logits, dense.logits, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=5e-6 * expected.abs().max())


def test_cpu_softplus_is_accurate_to_a_few_ulps_where_log_of_one_plus_exp_is_not():
    # from −87 up: below it softplus(x) ≈ e^x is subnormal in float32, for torch's softplus too
    x = torch.cat([torch.linspace(-87, 100, 20001), torch.tensor([0.0, -1e-30, 1e-30])])
    expected = F.softplus(x.double())  # the float32 inputs' exact softplus
    got = selection._softplus_(x.clone(), [torch.empty_like(x), torch.empty_like(x)])
    ulps = ((got.double() - expected).abs() / torch.finfo(torch.float32).eps / expected).max()
    assert ulps < 2, ulps
    naive = torch.log(1 + torch.exp(x))
    assert ((naive.double() - expected).abs() / expected).max() > 1e-3  # what the correction term is for


def test_joint_draws_every_chunks_noise_in_one_call():
    # chunk i's noise is row i of one (n_chunks, B) draw, the same numbers as n_chunks draws of B in turn
    scores = torch.zeros(50, 50)
    picked = joint(DenseGain(scores), 10, n_chunks=5, generator=_gen(9))
    g = _gen(9)
    taken: list[int] = []
    for _ in range(5):
        keys = sample(torch.zeros(50), 50, generator=g)  # all 50 ranked by this chunk's noise alone
        taken += [i for i in keys.tolist() if i not in taken][:2]
    assert picked.tolist() == taken
