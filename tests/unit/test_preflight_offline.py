"""Offline validation (HF_HUB_OFFLINE=1) of a recipe naming hub models and datasets: what can
be checked from shipped files is checked; what needs the hub is skipped and said so."""

import json

import pytest
from conftest import ALPACA, TINY_LLAMA, tiny_recipe

from dpkit import model as model_module
from dpkit.preflight import check_recipe
from dpkit.recipe import recipe_from_dict


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    shipped = tmp_path / "hub_configs"
    (shipped / "org" / "tiny").mkdir(parents=True)
    (shipped / "org" / "tiny" / "config.json").write_text(json.dumps(TINY_LLAMA))
    monkeypatch.setattr(model_module, "SHIPPED_HUB_CONFIGS", shipped)
    return shipped


def hub_recipe(tmp_path, sources):
    raw = tiny_recipe(tmp_path / "run", data={"sources": sources})
    raw["model"] = {"name_or_path": "org/tiny"}
    return recipe_from_dict(raw)


def test_hub_model_and_dataset_validate_offline(tmp_path, offline_hub):
    recipe = hub_recipe(tmp_path, [{"path": "someone/some-dataset"},
                                   {"path": str(ALPACA), "format": "alpaca"}])
    report = check_recipe(recipe, world_size=2, on_cpu=False)
    assert report.problems == []
    text = "\n".join(report.notes)
    assert "offline: tokenizer 'org/tiny' not checked" in text
    assert "offline: hub datasets ['someone/some-dataset'] not checked" in text


def test_local_sources_are_still_checked_offline(tmp_path, offline_hub):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    recipe = hub_recipe(tmp_path, [{"path": "someone/some-dataset"},
                                   {"path": str(bad), "format": "alpaca"}])
    report = check_recipe(recipe, world_size=2, on_cpu=False)
    assert [p.where for p in report.problems] == ["data.sources[1]", "data.sources[1]"]
    assert "no column 'instruction'" in str(report.problems[0])


def test_unshipped_hub_model_offline_says_what_to_do(tmp_path, offline_hub):
    raw = tiny_recipe(tmp_path / "run")
    raw["model"] = {"name_or_path": "org/not-shipped"}
    report = check_recipe(recipe_from_dict(raw), world_size=2, on_cpu=False)
    assert len(report.problems) == 1
    assert "has no config.json shipped under" in str(report.problems[0])
