"""The plan against what real DeepSpeed engines hold: 2 CPU ranks, ZeRO 0-3, bf16 and fp32, LoRA.

One torchrun launch runs every scenario (tests/distributed/plan_measure.py counts the elements
each engine holds per rank); each count must match dpkit's plan for the same model, world size
and resolved DeepSpeed config within 2%. Transient peaks sampled during backward (gradients in
flight, ZeRO-3's gathered parameters) are bounds in the plan: measured ≤ planned.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpkit.plan.memory import Setup, estimate, model_shape
from dpkit.model import load_model_config
from dpkit.plan.recommend import DTYPE_BYTES, knobs, resolved_ds_config, variant
from dpkit.recipe import recipe_from_dict

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORLD, MICRO, SEQ = 2, 2, 32
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "max_position_embeddings": 64}
# (ZeRO stage, dtype, LoRA rank, reduce_bucket_size or None for dpkit's "auto")
SCENARIOS = [(stage, dtype, 0, None) for dtype in ("bfloat16", "float32")
             for stage in (0, 1, 2, 3)]
SCENARIOS += [(2, "bfloat16", 4, None), (3, "bfloat16", 4, None)]  # LoRA rank 4, all linears
# dpkit's buckets (>= 5e7) hold all of this tiny model's gradients; a model larger than its
# bucket reduces during backward, which this 4096-element bucket reproduces.
SCENARIOS += [(2, "bfloat16", 0, 4096)]


def recipe(stage, dtype):
    return recipe_from_dict({
        "model": {"config": TINY, "tokenizer": "unused", "dtype": dtype},
        "data": {"sources": [{"path": "unused.jsonl"}], "max_seq_len": SEQ},
        "train": {"global_batch_size": MICRO * WORLD, "micro_batch_size": MICRO},
        "zero": {"stage": stage},
        "output": {"dir": "unused"}})


def planned(stage, dtype, lora_rank, bucket=None):
    r = recipe(stage, dtype)
    shape = model_shape(load_model_config(r.model), lora_rank=lora_rank)
    ds = resolved_ds_config(variant(r, stage, "none", "none"), WORLD, shape.hidden)
    if bucket is not None:
        ds["zero_optimization"]["reduce_bucket_size"] = bucket
    setup = Setup(stage, "none", "none", WORLD, WORLD, DTYPE_BYTES[dtype], MICRO, SEQ,
                  knobs=knobs(ds))
    return ds, estimate(shape, setup)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan_measured")
    scenarios = []
    for stage, dtype, lora, bucket in SCENARIOS:
        ds, _ = planned(stage, dtype, lora, bucket)
        scenarios.append({"name": f"{stage}-{dtype}-{lora}-{bucket}", "model_config": TINY, "dtype": dtype,
                          "ds_config": ds, "lora_rank": lora, "micro_batch": MICRO,
                          "seq_len": SEQ})
    (tmp / "scenarios.json").write_text(json.dumps(scenarios))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(ROOT / ".torch_extensions"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(WORLD), str(ROOT / "tests/distributed/plan_measure.py"),
           str(tmp / "scenarios.json"), str(tmp / "measured.json")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {r["name"]: r["ranks"] for r in json.loads((tmp / "measured.json").read_text())}


def close(measured, plan, rel=0.02):
    return abs(measured - plan) <= rel * plan


@pytest.mark.parametrize("stage,dtype,lora,bucket", SCENARIOS,
                         ids=[f"zero{s}-{d}{'-lora' if r else ''}{f'-bucket{k}' if k else ''}"
                              for s, d, r, k in SCENARIOS])
def test_engine_holds_what_the_plan_says(measured, stage, dtype, lora, bucket):
    _, plan = planned(stage, dtype, lora, bucket)
    ranks = measured[f"{stage}-{dtype}-{lora}-{bucket}"]
    assert len(ranks) == WORLD
    # The plan is for the fullest rank: compare it with the largest count over the ranks.
    m = {key: max(r[key] for r in ranks) for key in ranks[0]}
    # parameters
    if stage < 3:
        assert close(m["params.weights"], plan.elements("params", "weights")), m
    else:
        assert close(m["params.partition"], plan.elements("params", "partition")), m
        assert m["params.persistent"] == plan.elements("params", "persistent"), m
        assert 0 < m["params.gathered"] <= plan.elements("params", "gathered"), m
    # gradients
    if stage <= 1:
        assert close(m["grads.peak"], plan.elements("grads", "full")), m
    else:
        # ZeRO-2 buffers the whole gradient of a parameter straddling the partition edge
        held = plan.elements("grads", "partition") + plan.elements("grads", "partition boundary")
        assert close(m["grads.partition"], held), m
        assert m["grads.in_flight"] <= plan.elements("grads", "in flight"), m
    # optimizer states and the fp32 gradients the optimizer steps on
    assert close(m["optim.adam"], plan.elements("optim", "adam")), m
    assert close(m["optim.master"], plan.elements("optim", "master")), m
    assert close(m["step.fp32_grads"], plan.elements("step", "fp32 grads")), m
    if stage >= 1:
        assert m["comm"] <= plan.elements("comm"), m
