"""`model.kind: factory`: a user's own model function in a recipe, end to end through the CLI, and every way a
factory or a reference checkpoint can fail to fit, each a named error."""

from pathlib import Path

import pytest
from torch import nn

from pipelines import data, tasks
from pipelines.cli import main
from pipelines.recipe import RecipeError, load_recipe
from pipelines.train import load_checkpoint
from pipelines.train_reference import train_reference

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "rho_loss.yaml"
FACTORY = "tests.test_factory:wide_mlp"


def wide_mlp(hidden: int = 32, *, image_size: int) -> nn.Module:
    """A user's classifier: it takes the dataset's image size, which curate passes because it asks for it."""
    return nn.Sequential(nn.Flatten(), nn.Linear(image_size**2, hidden), nn.GELU(), nn.Linear(hidden, 10))


def not_a_model(hidden: int = 32):
    return {"hidden": hidden}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    data.make_digits(out, n_train=600, n_curated=200, n_test=200, shard_size=200)
    return out


def _values(digits: Path, out: Path, **model) -> list[str]:
    values = {"data.root": digits, "train.out": out, "cache.path": out / "cache", "reference.steps": 5,
              "reference.batch_size": 32, "train.steps": 4, "train.eval_every": 2, "train.batch_size": 8,
              "selection.shuffle_buffer": 32, "model.kind": "factory", "model.factory": FACTORY, **model}
    return [f"{key}={value}" for key, value in values.items()]


def _args(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def test_a_factory_model_runs_the_whole_job(digits, tmp_path):
    values = _values(digits, tmp_path, **{"model.options": '{"hidden": 24}'})
    assert main(["run", str(RECIPE), *_args(values)]) == 0  # prepare: reference, cache, then the runs
    for run in ("learnability", "uniform"):
        weights = load_checkpoint(tmp_path / run / "checkpoint.pt")["model"]
        assert tuple(weights["1.weight"].shape) == (24, 16 * 16)  # the factory's model, at the data's image size
    recipe = load_recipe(RECIPE, values)
    reference, _ = tasks.load_model(recipe.reference_path, recipe, recipe.reference_model)
    assert isinstance(reference[2], nn.GELU)


@pytest.mark.parametrize("factory, options, message", [
    ("no_such_package.models:build", {}, r"cannot import 'no_such_package.models'.*sys.path"),
    ("tests.test_factory:wide_mpl", {}, r"has no function 'wide_mpl'; did you mean wide_mlp"),
    (FACTORY, {"depth": 3}, r"mlp\(hidden: int = 32, \*, image_size: int\).* cannot take model.options \['depth'\]"),
    ("tests.test_factory:not_a_model", {}, r"returned a dict, not a torch.nn.Module"),
])
def test_a_factory_that_does_not_fit_is_a_named_error(digits, tmp_path, factory, options, message):
    import json

    recipe = load_recipe(RECIPE, _values(digits, tmp_path, **{"model.factory": factory,
                                                              "model.options": json.dumps(options)}))
    with pytest.raises(ValueError, match=message):
        tasks.build_model(recipe.model, recipe, seed=0)


@pytest.mark.parametrize("override, message", [
    ({"model.kind": "mlp"}, r"model.factory names the function of kind: factory"),
    ({"model.factory": None}, r"model.factory names the function of kind: factory"),
    ({"model.factory": "tests.test_factory.wide_mlp"}, r"expected 'package.module:function'"),
])
def test_a_factory_spelt_wrong_is_a_recipe_error(digits, tmp_path, override, message):
    values = [v for v in _values(digits, tmp_path) if v.split("=")[0] not in override]
    values += [f"{key}={value}" for key, value in override.items() if value is not None]
    with pytest.raises(RecipeError, match=message):
        load_recipe(RECIPE, values)


def test_a_reference_trained_for_another_model_names_the_parameter(digits, tmp_path):
    trained = load_recipe(RECIPE, _values(digits, tmp_path, **{"model.options": '{"hidden": 24}'}))
    train_reference(trained, log=lambda *_: None)
    other = load_recipe(RECIPE, _values(digits, tmp_path, **{"model.options": '{"hidden": 32}'}))
    with pytest.raises(ValueError, match=r"has '1.weight' of shape \(24, 256\), the recipe's model \(32, 256\); "
                                         r"it was trained for another model"):
        tasks.load_model(other.reference_path, other, other.reference_model)
