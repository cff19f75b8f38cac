"""`dpkit train`'s memory check before launch (on GPU machines): a recipe that won't fit is
refused with the suggestion from dpkit plan, unless train.skip_memory_check is set."""

from conftest import tiny_recipe

from dpkit.preflight import check_recipe
from dpkit.recipe import recipe_from_dict


def test_too_small_gpus_are_refused_with_a_suggestion(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", zero={"stage": 0}))
    report = check_recipe(recipe, world_size=2, on_cpu=False, gpus_per_node=2,
                          gpu_memory_bytes=1 << 20)  # 1 MiB GPUs: nothing fits
    problems = [p for p in report.problems if "fit" in p.message]
    assert len(problems) == 1
    assert "train.skip_memory_check=true" in problems[0].fix


def test_roomy_gpus_pass_and_the_override_skips_the_check(tmp_path):
    recipe = recipe_from_dict(tiny_recipe(tmp_path / "run", zero={"stage": 0}))
    assert check_recipe(recipe, 2, False, gpus_per_node=2, gpu_memory_bytes=80 << 30).problems == []
    skip = recipe_from_dict(tiny_recipe(tmp_path / "run", zero={"stage": 0},
                                        train={"skip_memory_check": True}))
    assert check_recipe(skip, 2, False, gpus_per_node=2, gpu_memory_bytes=1 << 20).problems == []
