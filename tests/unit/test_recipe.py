"""Recipe schema: parsing, overrides, and messages that name the key and the fix."""

from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_recipe, write_recipe

from dpkit.errors import RecipeError
from dpkit.recipe import Recipe, load_recipe, recipe_from_dict

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_exist():
    assert len(RECIPES) > 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_parses(path: Path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)


def test_overrides_apply_with_yaml_types(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out"))
    recipe = load_recipe(path, ["train.lr=1e-4", "zero.stage=3", "data.sources.0.max_rows=10",
                                "output.overwrite=true"])
    assert recipe.train.lr == 1e-4 and recipe.zero.stage == 3
    assert recipe.data.sources[0].max_rows == 10 and recipe.output.overwrite is True


def test_unknown_key_suggests_the_closest(tmp_path):
    raw = tiny_recipe(tmp_path / "out")
    raw["train"]["learning_rate"] = 1e-4
    raw["zero"]["stag"] = 3
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw)
    text = str(e.value)
    assert "zero.stag: unknown key — did you mean `zero.stage`?" in text
    assert "train.learning_rate: unknown key" in text
    assert len(e.value.problems) == 2  # every problem at once


def test_wrong_type_names_key_and_value(tmp_path):
    raw = tiny_recipe(tmp_path / "out")
    raw["train"]["global_batch_size"] = "sixteen"
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw)
    assert e.value.problems[0].where == "train.global_batch_size"
    assert "'sixteen'" in str(e.value)


def test_cross_field_checks(tmp_path):
    raw = tiny_recipe(tmp_path / "out")
    raw["zero"] = {"stage": 2, "offload_params": "cpu"}
    raw["data"]["eval_fraction"] = 0.1
    raw["data"]["eval_sources"] = raw["data"]["sources"]
    with pytest.raises(RecipeError) as e:
        recipe_from_dict(raw)
    text = str(e.value)
    assert "parameter offload needs `zero.stage: 3`" in text
    assert "Choose one" in text


def test_model_needs_exactly_one_source(tmp_path):
    raw = tiny_recipe(tmp_path / "out")
    raw["model"]["name_or_path"] = "org/model"
    with pytest.raises(RecipeError, match="exactly one of"):
        recipe_from_dict(raw)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_dump_round_trips(tmp_path):
    from dpkit.recipe import recipe_to_yaml

    recipe = recipe_from_dict(tiny_recipe(tmp_path / "out"))
    assert recipe_from_dict(yaml.safe_load(recipe_to_yaml(recipe))) == recipe


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "quickstart").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_quickstart_recipes_validate(path: Path, tmp_path, monkeypatch):
    """Everything `dpkit validate` checks, on the offline recipes (the library's hub recipes are
    validated offline in test_recipe_library.py)."""
    from dpkit.preflight import check_recipe

    monkeypatch.chdir(ROOT)  # recipe paths are relative to the repository root
    recipe = load_recipe(path, [f"output.dir={tmp_path / 'run'}"])
    report = check_recipe(recipe, world_size=2, on_cpu=True)
    assert report.problems == []
    assert any(note.startswith("data:") for note in report.notes)
