"""What a run shows on real ranks: metrics against independent counts, per-rank memory and logs,
TensorBoard read back with tensorboard's own reader, and NaN losses caught at their step."""

import math

import pytest
import torch
from conftest import ROOT, read_metrics, tiny_recipe, torchrun, write_recipe

from dpkit.checkpoint import checkpoints_dir
from dpkit.data import epoch_order, load_datasets
from dpkit.export import consolidated_state_dict
from dpkit.model import load_tokenizer
from dpkit.recipe import load_recipe

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    train = {"max_steps": 4, "global_batch_size": 8, "micro_batch_size": 2}
    paths = {
        # M: metrics + TensorBoard. SKIP: NaN at step 3 on rank 0, skipped (fp32 ZeRO-2).
        "M": tiny_recipe(tmp / "M", train={**train, "max_steps": 2},
                         data={"eval_fraction": 0.1},
                         output={"report_to": ["tensorboard"], "save_model": False}),
        "SKIP": tiny_recipe(tmp / "SKIP", train={**train, "nan_policy": "skip"},
                            output={"save_steps": 1, "save_model": False}),
        "STOP": tiny_recipe(tmp / "STOP", train=train, output={"save_steps": 2}),
    }
    files = {name: write_recipe(tmp / f"{name}.yaml", r) for name, r in paths.items()}
    fault = {"DPKIT_FAULT": "nan@step:3:0"}
    torchrun(2, [str(files["M"]), str(files["SKIP"])], script=DRIVER, extra_env=fault)
    stop = torchrun(2, [str(files["STOP"])], module="dpkit.train", extra_env=fault, check=False)
    return tmp, stop


def test_metrics_match_independent_counts(runs):
    tmp, _ = runs
    recipe = load_recipe(tmp / "M" / "recipe.yaml")
    tokenizer = load_tokenizer(recipe.model)
    train, _, _ = load_datasets(recipe.data, tokenizer, recipe.train.seed)
    order = epoch_order(len(train), recipe.train.seed, 0)
    steps = [m for m in read_metrics(tmp / "M") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        rows = [train[i] for i in order[(m["step"] - 1) * 8:m["step"] * 8]]
        assert m["samples"] == 8
        assert m["tokens"] == sum(len(r.input_ids) for r in rows)
        assert m["target_tokens"] == sum(sum(t != -100 for t in r.labels[1:]) for r in rows)
        assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["step_time_s"])
        assert m["samples_per_s"] == pytest.approx(8 / m["step_time_s"])
        parts = m["data_s"] + m["forward_backward_s"] + m["optimizer_s"]
        assert parts == pytest.approx(m["step_time_s"], rel=1e-6)
        assert m["mfu"] is None and m["flops"] > 0  # no peak FLOP/s known for a CPU
        assert len(m["memory_rss_mb"]) == 2 and min(m["memory_rss_mb"]) > 100  # per rank
    assert any("eval_loss" in m for m in read_metrics(tmp / "M"))


def test_per_rank_logs(runs):
    tmp, _ = runs
    for rank in (0, 1):
        text = (tmp / "M" / "logs" / f"rank{rank}.log").read_text()
        assert "global batch 8" in text and "step 2: loss" in text


def test_tensorboard_events_read_back(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = runs
    run_logs = tmp / "M" / "tensorboard" / "M"  # accelerate: <logging_dir>/<run name>
    assert list(run_logs.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run_logs))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    expected = [m["loss"] for m in read_metrics(tmp / "M") if "loss" in m]
    assert losses == pytest.approx(expected, rel=1e-6)
    assert "eval_loss" in acc.Tags()["scalars"]


def test_nan_stops_at_its_step_naming_the_last_checkpoint(runs):
    tmp, stop = runs
    assert stop.returncode != 0
    ckpt = checkpoints_dir(tmp / "STOP") / "step-00000002"
    assert (f"error: loss is nan at step 3 (train.nan_policy is stop); last complete checkpoint: "
            f"{ckpt}") in stop.stderr
    assert [m["step"] for m in read_metrics(tmp / "STOP") if "loss" in m] == [1, 2]


def test_nan_skip_leaves_the_weights_unchanged(runs):
    tmp, _ = runs
    steps = {m["step"]: m for m in read_metrics(tmp / "SKIP") if "loss" in m}
    assert math.isnan(steps[3]["loss"]) and steps[3]["skipped"] is True
    assert steps[3]["skipped_steps"] == 1 and steps[4]["skipped"] is False
    assert math.isfinite(steps[4]["loss"])
    root = checkpoints_dir(tmp / "SKIP")
    before = consolidated_state_dict(root / "step-00000002")
    after = consolidated_state_dict(root / "step-00000003")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    later = consolidated_state_dict(root / "step-00000004")
    assert not all(torch.equal(before[k], later[k]) for k in before)  # step 4 did train
