import pytest
import torch

from curate.rules import RULES, get_rule, needs_learner, needs_reference


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
    assert needs_learner(RULES["learnability"]) and needs_reference(RULES["learnability"])
    assert needs_learner(RULES["hard_learner"]) and not needs_reference(RULES["hard_learner"])
    assert needs_reference(RULES["easy_reference"]) and not needs_learner(RULES["easy_reference"])
    assert not needs_learner(RULES["uniform"]) and not needs_reference(RULES["uniform"])
