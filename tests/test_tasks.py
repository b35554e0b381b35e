"""pipelines.tasks: the task registry the jobs look their task up in, and the recipe-level helpers around it."""

import typing

import pytest
import torch

from pipelines import tasks
from pipelines.data import make_digits
from pipelines.models import model_hash
from pipelines.recipe import DataConfig, ModelConfig, parse_recipe


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    make_digits(out, n_train=40, n_curated=20, n_test=20, shard_size=20)
    return out


def _recipe(digits, dataset: str, kind: str):
    return parse_recipe(f"name: t\ndata: {{root: {digits}, dataset: {dataset}}}\nmodel: {{kind: {kind}}}\n")


def test_the_registry_and_the_recipe_schema_name_the_same_tasks_and_models():
    assert set(typing.get_args(DataConfig.model_fields["dataset"].annotation)) == set(tasks.TASKS)
    kinds = [kind for task in tasks.TASKS.values() for kind in task.models] + list(tasks.GENERIC_KINDS)  # any task's
    assert set(kinds) == set(typing.get_args(ModelConfig.model_fields["kind"].annotation))
    assert all(task.name == name for name, task in tasks.TASKS.items())


def test_an_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError,
                       match=r"data.dataset: unknown task 'cifar'; the tasks are \['digits', 'pairs', 'web'\]"):
        tasks.get_task("cifar")


@pytest.mark.parametrize(("dataset", "kind"), [("pairs", "tiny_clip"), ("digits", "small_cnn"), ("digits", "mlp")])
def test_each_task_builds_scores_trains_and_evaluates_its_models(digits, dataset, kind):
    recipe = _recipe(digits, dataset, kind)
    task = tasks.task_of(recipe)
    model = tasks.build_model(recipe.model, recipe, seed=3)
    again = tasks.build_model(recipe.model, recipe, seed=3)
    assert model_hash(model) == model_hash(again)  # the seed fixes the weights
    (batch,) = tasks.in_memory_batches(tasks.load_split(recipe, "test"), batch_size=64)
    assert len(batch["__key__"]) == 20
    loss = task.train_loss(model, batch, recipe.model, torch.device("cpu"))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    per_example = task.actor_loss(recipe.model)(model, batch)
    assert per_example.shape == (20,) and per_example.requires_grad
    with torch.no_grad():
        scores = tasks.scorer_for(recipe)(model.eval(), batch)
    assert scores.contrastive == (dataset == "pairs")
    model.train()
    metrics = task.evaluate(model, [batch], recipe.model, torch.device("cpu"))
    assert 0 <= metrics["accuracy"] <= 1 and model.training  # evaluation leaves the mode it found


def test_a_model_of_another_task_is_refused_naming_both(digits):
    with pytest.raises(ValueError, match=r"model.kind: tiny_clip is a model of data.dataset: pairs or web, not digits; "
                                         r"the "
                                         r"models of digits are \['small_cnn', 'mlp', 'open_clip', 'torchvision', "
                                         r"'factory'\]"):
        recipe = _recipe(digits, "digits", "tiny_clip")
        tasks.build_model(recipe.model, recipe, seed=0)
    with pytest.raises(ValueError, match=r"model.kind: mlp is a model of data.dataset: digits, not pairs"):
        recipe = _recipe(digits, "pairs", "mlp")
        tasks.build_model(recipe.model, recipe, seed=0)
