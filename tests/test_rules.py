import pytest
import torch

import curate
from curate.rules import RULES, Rule, as_rule, get_rule


def test_rules_are_the_published_formulas():
    learner, reference = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([0.5, 1.5, 0.5])
    torch.testing.assert_close(get_rule("learnability")(learner, reference), learner - reference)
    assert get_rule("rho") is get_rule("learnability")
    torch.testing.assert_close(get_rule("hard_learner")(learner, reference), learner)
    torch.testing.assert_close(get_rule("easy_reference")(learner, reference), -reference)
    torch.testing.assert_close(get_rule("uniform")(learner, reference), torch.zeros(3))


def test_rules_are_elementwise_on_pair_blocks():
    learner, reference = torch.rand(4, 3), torch.rand(4, 3)
    torch.testing.assert_close(get_rule("learnability")(learner, reference), learner - reference)


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown rule 'rhoo'.*easy_reference.*learnability"):
        get_rule("rhoo")


def test_which_models_each_rule_reads():
    assert RULES["learnability"].uses_learner and RULES["learnability"].uses_reference
    assert RULES["hard_learner"].uses_learner and not RULES["hard_learner"].uses_reference
    assert RULES["easy_reference"].uses_reference and not RULES["easy_reference"].uses_learner
    assert not RULES["uniform"].uses_learner and not RULES["uniform"].uses_reference


def test_a_plain_function_reads_the_models_given_and_a_rule_says_what_it_reads():
    fn = lambda learner, reference: reference * 2  # noqa: E731
    plain = as_rule(fn, learner=True, reference=True)
    assert plain.uses_learner and plain.uses_reference and plain.name == "<lambda>"
    only_reference = Rule(fn, uses_learner=False, uses_reference=True, name="double_reference")
    assert as_rule(only_reference, learner=True, reference=True) is only_reference
    assert as_rule("rho", learner=False, reference=False) is RULES["learnability"]
    with pytest.raises(TypeError, match="a curate.Rule or a function"):
        as_rule(3, learner=True, reference=True)


def test_a_rule_that_reads_only_the_reference_never_scores_the_learner():
    calls = []

    class Counting(torch.nn.Linear):
        def forward(self, x):
            calls.append(len(x))
            return super().forward(x)

    torch.manual_seed(0)
    learner, reference = Counting(8, 3), torch.nn.Linear(8, 3)
    rule = Rule(lambda learner, reference: -reference, uses_learner=False, uses_reference=True)
    samples = [{"__key__": f"s{i}", "input": torch.randn(8), "target": torch.tensor(i % 3)} for i in range(40)]
    batches = list(curate.pipeline(samples, learner=learner, reference=reference, rule=rule, method="topk",
                                   scorer=curate.ClassificationScorer(), batch_size=4, superbatch_size=20,
                                   shuffle_buffer=0, count_flops=False))
    assert len(batches) == 2 and calls == []
    x = torch.stack([s["input"] for s in samples[:20]])
    y = torch.tensor([i % 3 for i in range(20)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(reference(x), y, reduction="none")
    assert batches[0]["__key__"] == [f"s{i}" for i in torch.topk(-loss, 4).indices.tolist()]
