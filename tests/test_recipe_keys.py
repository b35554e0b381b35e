"""`curate --help` and every subcommand's --help explain every recipe key (pipelines/recipe_keys.py), and that
list is the schema's: a key added to `Recipe` without its meaning fails here."""

import typing

import pytest
from pydantic import BaseModel

from pipelines.cli import main
from pipelines.recipe import Recipe
from pipelines.recipe_keys import KEYS, MODEL_PREFIXES

COMMANDS = ["data", "train-reference", "precompute", "curate-set", "run", "inspect"]


def _leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        path = prefix + name
        nested = [t for t in (typing.get_args(info.annotation) or (info.annotation,))
                  if isinstance(t, type) and issubclass(t, BaseModel)]
        if path in MODEL_PREFIXES:  # documented once, as model.*
            keys.append(path)
        elif nested:
            keys += _leaves(nested[0], path + ".")
        else:
            keys.append(path)
    return keys


def test_the_help_lists_exactly_the_schemas_keys():
    leaves = _leaves(Recipe)
    assert len(leaves) > 50 and "data.fields.image" in leaves and "reference.model" in leaves
    assert sorted(KEYS) == sorted(leaves)
    assert all(meaning.strip() for meaning in KEYS.values())


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_curate_help_and_every_subcommands_help_explain_the_keys(command, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"] if command is None else [command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "recipe keys" in out
    for key in KEYS:
        assert f"  {key} " in out, key
    assert "reference.model and selection.actor.model take the model.* keys" in out
