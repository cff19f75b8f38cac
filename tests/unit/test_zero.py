"""DeepSpeed config resolution: every "auto" filled from the recipe, mistakes refused."""

import json

import pytest
from conftest import tiny_recipe

from dpkit.errors import RecipeError
from dpkit.recipe import recipe_from_dict
from dpkit.zero import (DS_CONFIGS, MIN_COMM_BUCKET, batch_arithmetic, resolve_ds_config,
                        template_path)


def recipe(tmp_path, **sections):
    return recipe_from_dict(tiny_recipe(tmp_path / "out", **sections))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_auto_is_resolved(tmp_path, stage):
    r = recipe(tmp_path, zero={"stage": stage}, train={"global_batch_size": 24,
                                                       "micro_batch_size": 3})
    cfg = resolve_ds_config(r, world_size=4, hidden_size=64)
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 3
    assert cfg["gradient_accumulation_steps"] == 24 // (3 * 4)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False
    if stage >= 1:
        # hidden² (transformers' rule) would be 4096 elements: one bucket a parameter
        assert cfg["zero_optimization"]["reduce_bucket_size"] == MIN_COMM_BUCKET


def test_wide_models_keep_hidden_squared_buckets(tmp_path):
    cfg = resolve_ds_config(recipe(tmp_path), world_size=2, hidden_size=8192)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 8192 * 8192 > MIN_COMM_BUCKET
    assert cfg["zero_optimization"]["allgather_bucket_size"] == 8192 * 8192


def test_precision_and_offload_follow_the_recipe(tmp_path):
    r = recipe(tmp_path, model={"dtype": "bfloat16"},
               zero={"stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"})
    assert template_path(r).name == "zero3_offload.json"
    cfg = resolve_ds_config(r, world_size=2, hidden_size=32)
    assert cfg["bf16"]["enabled"] is True
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_every_template_resolves(tmp_path):
    names = sorted(p.stem for p in DS_CONFIGS.glob("*.json"))
    assert {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload",
            "zero3_nvme"} <= set(names)
    for name in names:
        stage = int(name[4])
        zero = {"stage": stage, "template": str(DS_CONFIGS / f"{name}.json")}
        if "offload" in name:
            zero["offload_optimizer"] = "cpu"
            if stage == 3:
                zero["offload_params"] = "cpu"
        if "nvme" in name:
            zero.update(offload_optimizer="nvme", offload_params="nvme", nvme_path="/nvme")
        cfg = resolve_ds_config(recipe(tmp_path, zero=zero), world_size=2, hidden_size=32)
        assert "auto" not in json.dumps(cfg), name


def test_batch_not_divisible_suggests_values(tmp_path):
    r = recipe(tmp_path, train={"global_batch_size": 20, "micro_batch_size": 3})
    with pytest.raises(RecipeError) as e:
        batch_arithmetic(r, world_size=2)
    msg = str(e.value)
    assert msg.startswith("train.global_batch_size: 20 is not divisible by")
    assert "set it to 18 or 24" in msg


def write_template(tmp_path, cfg) -> str:
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_unknown_keys_in_template_are_refused(tmp_path):
    cfg = json.loads((DS_CONFIGS / "zero2.json").read_text())
    cfg["gradient_clippin"] = 1.0
    cfg["zero_optimization"]["reduce_bucket_sise"] = 5
    r = recipe(tmp_path, zero={"stage": 2, "template": write_template(tmp_path, cfg)})
    with pytest.raises(RecipeError) as e:
        resolve_ds_config(r, 2, 32)
    msg = str(e.value)
    assert "gradient_clippin: unknown DeepSpeed key — did you mean `gradient_clipping`?" in msg
    cfg["gradient_clipping"] = "auto"
    del cfg["gradient_clippin"]
    r = recipe(tmp_path, zero={"stage": 2, "template": write_template(tmp_path, cfg)})
    with pytest.raises(RecipeError, match="zero_optimization.reduce_bucket_sise: unknown DeepSpeed"
                                          " key — did you mean `reduce_bucket_size`"):
        resolve_ds_config(r, 2, 32)


def test_unresolvable_auto_is_refused(tmp_path):
    cfg = json.loads((DS_CONFIGS / "zero2.json").read_text())
    cfg["zero_optimization"]["sub_group_size"] = "auto"
    r = recipe(tmp_path, zero={"stage": 2, "template": write_template(tmp_path, cfg)})
    with pytest.raises(RecipeError, match='zero_optimization.sub_group_size: is "auto" but dpkit '
                                          "cannot resolve it"):
        resolve_ds_config(r, 2, 32)


def test_conflicts_and_optimizer_sections_are_refused(tmp_path):
    cfg = json.loads((DS_CONFIGS / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 7
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
    r = recipe(tmp_path, zero={"stage": 2, "template": write_template(tmp_path, cfg)})
    with pytest.raises(RecipeError) as e:
        resolve_ds_config(r, 2, 32)
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu: is 7 but the recipe gives 2" in msg
    assert "optimizer and scheduler come from the recipe" in msg


def test_fp16_refused_on_cpu(tmp_path):
    r = recipe(tmp_path, model={"dtype": "float16"})
    with pytest.raises(RecipeError, match="float16 is not supported by DeepSpeed on CPU"):
        resolve_ds_config(r, 2, 32, on_cpu=True)
    assert resolve_ds_config(r, 2, 32, on_cpu=False)["fp16"]["enabled"] is True


def test_every_accepted_stage_and_offload_resolves_to_a_shipped_template(tmp_path):
    """The product of stage × optimizer offload × parameter offload: every combination the schema
    accepts names a template that exists and resolves with the offload devices asked for; every
    other combination is refused by the schema (one problem naming a `zero.` key)."""
    import itertools

    accepted = 0
    for stage, opt, par in itertools.product((0, 1, 2, 3), ("none", "cpu", "nvme"),
                                             ("none", "cpu", "nvme")):
        zero = {"stage": stage, "offload_optimizer": opt, "offload_params": par,
                "nvme_path": "/nvme"}
        try:
            r = recipe(tmp_path, zero=zero)
        except RecipeError as e:
            assert all(p.where.startswith("zero") for p in e.problems), (stage, opt, par, e)
            continue
        accepted += 1
        path = template_path(r)
        assert path.is_file(), (stage, opt, par, path)
        zo = resolve_ds_config(r, world_size=2, hidden_size=32)["zero_optimization"]
        assert zo["stage"] == stage
        assert zo.get("offload_optimizer", {}).get("device", "none") == opt, (stage, opt, par)
        assert zo.get("offload_param", {}).get("device", "none") == par, (stage, opt, par)
        assert "auto" not in json.dumps(zo)
    # 0: 1; 1 and 2: none/cpu optimizer; 3: all nine.
    assert accepted == 1 + 2 + 2 + 9


def test_the_layout_says_what_is_partitioned_and_where():
    """One object answers "is it partitioned?" for the whole job; its line is the run log's."""
    from dpkit.batch import plan_batch
    from dpkit.layout import Layout

    batch = plan_batch(16, 2, 8, 2)  # 4 data-parallel ranks × sequence-parallel 2
    three = Layout(3, "cpu", "cpu", batch)
    assert (three.partitions_parameters, three.partitions_gradients,
            three.partitions_optimizer) == (True, True, True)
    assert (three.world_size, three.data_parallel, three.sequence_parallel) == (8, 4, 2)
    assert three.describe() == ("ZeRO stage 3 (optimizer state, gradients, parameters partitioned "
                                "over 4 data-parallel ranks, optimizer state on cpu, parameters "
                                "on cpu)")
    one = Layout(1, "none", "none", batch)
    assert (one.partitions_parameters, one.partitions_gradients, one.partitions_optimizer) == \
        (False, False, True)
    assert Layout(0, "none", "none", batch).describe() == \
        "ZeRO stage 0 (nothing partitioned: every rank holds everything)"


def test_async_save_turns_on_deepspeeds_decoupled_writer_under_zero3_only(tmp_path):
    cfg = resolve_ds_config(recipe(tmp_path, zero={"stage": 3}, output={"async_save": True}),
                            2, 32)
    assert cfg["checkpoint"]["writer"] == {"type": "python", "decoupled": True}
    assert "checkpoint" not in resolve_ds_config(recipe(tmp_path, zero={"stage": 3}), 2, 32)
    for stage in (0, 1, 2):  # ZeRO-1/2: every rank would write the same model-states file
        r = recipe(tmp_path, zero={"stage": stage}, output={"async_save": True})
        with pytest.raises(RecipeError) as e:
            resolve_ds_config(r, 2, 32)
        assert len(e.value.problems) == 1
        assert e.value.problems[0].where == "output.async_save"
        assert f"needs zero.stage 3 (got {stage})" in str(e.value)
