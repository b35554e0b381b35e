from pathlib import Path

import pytest

from pipelines.recipe import RecipeError, load_recipe, parse_recipe

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


def test_wrong_type_names_the_yaml_path_and_line():
    with pytest.raises(RecipeError, match=r"r\.yaml:3: selection\.n_chunks: expected an integer, got 'x'"):
        parse_recipe("name: a\nselection:\n  n_chunks: x\n", "r.yaml")


def test_unknown_key_names_the_path_and_line():
    with pytest.raises(RecipeError, match=r"r\.yaml:3: selection\.n_chunk: unknown key"):
        parse_recipe("name: a\nselection:\n  n_chunk: 4\n", "r.yaml")


def test_malformed_yaml_gives_line_and_column():
    with pytest.raises(RecipeError, match=r"r\.yaml:2:\d+: malformed YAML"):
        parse_recipe("name: a\nselection: {a: [1, 2}\n", "r.yaml")


def test_unknown_rule_lists_the_valid_rules():
    with pytest.raises(RecipeError, match=r"selection\.rule: .*unknown rule 'rhoo'; valid rules are"):
        parse_recipe("name: a\nselection: {rule: rhoo}\n")


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ""])
def test_a_name_that_is_a_path_is_refused(name):
    with pytest.raises(RecipeError, match=r"name: .*must be a plain directory name"):
        parse_recipe(f"name: '{name}'\n")


def test_flexi_with_an_actor_is_refused_naming_both():
    text = "name: r\nselection:\n  actor: {model: {kind: tiny_clip}}\n  flexi: {downsample: 2}\n"
    with pytest.raises(RecipeError, match=r"selection\.flexi: .*ACL actor \(selection\.actor\).*set one of them"):
        parse_recipe(text, "r.yaml")
    assert parse_recipe(text.replace("  actor: {model: {kind: tiny_clip}}\n", ""), "r.yaml").selection.flexi


def test_out_of_range_values_are_rejected():
    with pytest.raises(RecipeError, match=r"selection\.filter_ratio"):
        parse_recipe("name: a\nselection: {filter_ratio: 1.5}\n")


def test_overrides_are_parsed_and_validated():
    recipe = parse_recipe("name: a\n", overrides=["selection.n_chunks=8", "compare=[uniform]", "train.lr=0.01"])
    assert recipe.selection.n_chunks == 8 and recipe.compare == ["uniform"] and recipe.train.lr == 0.01
    with pytest.raises(RecipeError, match=r"selection\.n_chunks: expected an integer, got 'many'"):
        parse_recipe("name: a\n", overrides=["selection.n_chunks=many"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        parse_recipe("name: a\n", overrides=["selection.n_chunks"])


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("recipes/nope.yaml")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
