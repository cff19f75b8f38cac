"""Mixture-of-experts fine-tuning on real ranks (docs/moe.md): 2 ranks equal one process.

A tiny Qwen3-MoE (transformers 5 fuses each layer's 4 experts, top-2, into one module of 3-D
weights) trains with the router's load-balancing loss on, at a coefficient large enough to move
the weights (a run without it differs, below), on 13 rows: the 4th step holds 1 row, so on 2
ranks three of its four micro-batches are empty and the router loss must be averaged over the
micro-batches that hold rows, exactly as one process does. Every 2-rank run uses the same
micro-batches (micro 1) as its one-process reference, so per-step losses and router losses agree
within 1e-5 (fp32):
- ZeRO 0, 1, 2, 3, full fine-tuning and LoRA (attention layers, and the experts' 3-D weights
  through PEFT's `target_parameters`; the adapter is saved and checked);
- a block that keeps one module per expert (remote code: tests/distributed/per_expert_moe/)
  under ZeRO-3, declared a leaf module automatically; the same run with `moe.zero3_leaf_modules:
  []` is shown to hang, crash on a collective mismatch or differ (so the test can fail);
- expert parallelism over 2 ranks (DeepSpeed AutoEP) under ZeRO-1 and ZeRO-3, and a resume of the
  ZeRO-1 one from its step-2 checkpoint, bitwise equal to the run.
Two launches: the references (1 process), then every 2-rank run, the one without leaf modules
last.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MESSAGES, ROOT, TOKENIZER, read_metrics, torchrun, write_recipe

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"
TOL = 1e-5
STEPS = 4  # 13 rows, global batch 4: the last step has 1 row
TINY_MOE = {"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 64,
            "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "vocab_size": 2048, "max_position_embeddings": 512}
AUX = 0.5  # the router loss's weight: large enough that getting its scale wrong shows
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}


def moe_recipe(out: Path, stage: int, model: dict | None = None, **moe) -> dict:
    return {
        "model": model or {"config": dict(TINY_MOE), "tokenizer": str(TOKENIZER),
                           "dtype": "float32"},
        # every row keeps targets at 16 tokens, so all 13 are trained on
        "data": {"sources": [{"path": str(MESSAGES), "format": "messages", "max_rows": 13}],
                 "max_seq_len": 16, "completion_only_loss": False},
        "train": {"global_batch_size": 4, "micro_batch_size": 1, "lr": 1e-2,
                  "lr_schedule": "constant", "collective_timeout_s": 20},
        "zero": {"stage": stage},
        "moe": {"aux_loss_coef": AUX, **moe},
        "output": {"dir": str(out), "save_model": False},
        "eval": {"num_prompts": 0},
    }


def per_expert_model(directory: Path) -> dict:
    """The remote-code model with one module per expert (8 experts, top-2), saved with its code."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "distributed" / "per_expert_moe"))
    from modeling_per_expert_moe import PerExpertMoeConfig, PerExpertMoeForCausalLM

    PerExpertMoeConfig.register_for_auto_class()
    PerExpertMoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    sizes = {k: v for k, v in TINY_MOE.items() if k != "model_type"}
    torch.manual_seed(0)
    PerExpertMoeForCausalLM(PerExpertMoeConfig(**{**sizes, "num_experts": 8})).save_pretrained(
        directory)
    return {"name_or_path": str(directory), "tokenizer": str(TOKENIZER), "dtype": "float32",
            "trust_remote_code": True}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("moe")
    per_expert = per_expert_model(tmp / "per_expert_model")
    single = {"one": moe_recipe(tmp / "one", 0),
              "one_no_aux": {**moe_recipe(tmp / "one_no_aux", 0), "moe": {"aux_loss_coef": 0}},
              "one_lora": {**moe_recipe(tmp / "one_lora", 0), "peft": LORA},
              "one_per_expert": moe_recipe(tmp / "one_per_expert", 0, per_expert)}
    double = {}
    for stage in (0, 1, 2, 3):
        double[f"full_z{stage}"] = moe_recipe(tmp / f"full_z{stage}", stage)
        double[f"lora_z{stage}"] = {**moe_recipe(tmp / f"lora_z{stage}", stage), "peft": LORA}
    double["lora_z3"]["output"]["save_model"] = True  # gathered from ZeRO-3 and checked
    double["per_expert_z3"] = moe_recipe(tmp / "per_expert_z3", 3, per_expert)
    # expert parallelism last: AutoEP's process groups stay with the process
    for stage in (1, 3):
        double[f"ep_z{stage}"] = moe_recipe(tmp / f"ep_z{stage}", stage, expert_parallel=2)
    double["ep_z1"]["output"]["save_steps"] = 2
    double["ep_z1_resumed"] = {**moe_recipe(tmp / "ep_z1_resumed", 1, expert_parallel=2),
                               "resume": str(tmp / "ep_z1" / "checkpoints" / "step-00000002")}
    # Last in the same launch, the per-expert block without its leaf declaration: it may end
    # the launch (a collective mismatch aborts both ranks; a hang ends at the 20 s collective
    # timeout), after every other run has finished.
    double["no_leaf"] = moe_recipe(tmp / "no_leaf", 3, per_expert, zero3_leaf_modules=[])
    torchrun(1, [str(write_recipe(tmp / f"{n}.yaml", r)) for n, r in single.items()],
             script=DRIVER, timeout=300)
    try:
        proc = torchrun(2, [str(write_recipe(tmp / f"{n}.yaml", r)) for n, r in double.items()],
                        script=DRIVER, timeout=420, check=False)
        (tmp / "launch.out").write_text(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    except subprocess.TimeoutExpired:
        (tmp / "launch.out").write_text("timed out (hung)")
    unfinished = [n for n in list(double)[:-1] if not (tmp / n / "summary.json").is_file()]
    assert not unfinished, (unfinished, (tmp / "launch.out").read_text()[-6000:])
    return tmp


def steps(run_dir: Path) -> list[tuple[float, float]]:
    """(loss, router loss) of every step."""
    return [(m["loss"], m["aux_loss"]) for m in read_metrics(run_dir) if "loss" in m]


def assert_same(a: list, b: list, tol: float = TOL) -> None:
    assert len(a) == len(b) == STEPS, (a, b)
    for (la, xa), (lb, xb) in zip(a, b):
        assert math.isfinite(la) and abs(la - lb) <= tol and abs(xa - xb) <= tol, (a, b)


def test_the_router_loss_is_logged_and_changes_training(runs):
    with_aux, without = steps(runs / "one"), [m["loss"] for m in read_metrics(runs / "one_no_aux")
                                              if "loss" in m]
    assert all(math.isfinite(x) and x > 0 for _, x in with_aux)  # k = 2 when balanced
    assert "aux_loss" not in read_metrics(runs / "one_no_aux")[0]
    assert with_aux[0][0] == without[0]  # the same first forward ...
    assert max(abs(a - b) for (a, _), b in zip(with_aux[1:], without[1:])) > 100 * TOL  # ... then
    log = (runs / "one" / "logs" / "rank0.log").read_text()
    assert f"load-balancing loss × {AUX:g} (moe.aux_loss_coef)" in log


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_full_fine_tuning_on_two_ranks_equals_one_process(runs, stage):
    assert_same(steps(runs / "one"), steps(runs / f"full_z{stage}"))
    summary = json.loads((runs / f"full_z{stage}" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["grad_accum"] == 2


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_lora_on_experts_on_two_ranks_equals_one_process(runs, stage):
    assert_same(steps(runs / "one_lora"), steps(runs / f"lora_z{stage}"))
    log = (runs / f"lora_z{stage}" / "logs" / "rank0.log").read_text()
    assert "experts.down_proj, experts.gate_up_proj" in log


def test_lora_adapter_on_experts_is_saved_whole(runs):
    from safetensors.torch import load_file

    saved = load_file(runs / "lora_z3" / "model" / "adapter_model.safetensors")
    # one rank-4 adapter per expert, stacked: A [r·experts, in], B [out, r·experts]
    layer = "base_model.model.model.layers.1.mlp.experts"
    a = {k: tuple(v.shape) for k, v in saved.items() if k.startswith(layer)}
    assert a == {f"{layer}.base_layer.lora_A.weight": (16, 32),  # gate_up_proj [4, 64, 32]
                 f"{layer}.base_layer.lora_B.weight": (64, 16),
                 f"{layer}.lora_A.weight": (16, 32),  # down_proj [4, 32, 32]
                 f"{layer}.lora_B.weight": (32, 16)}, a
    assert all(saved[k].any() for k in a if "lora_B" in k)  # trained


def test_per_expert_block_is_a_leaf_under_zero3_and_equals_one_process(runs):
    assert_same(steps(runs / "one_per_expert"), steps(runs / "per_expert_z3"))
    log = (runs / "per_expert_z3" / "logs" / "rank0.log").read_text()
    assert "ZeRO-3 leaf modules ['PerExpertMoeBlock']" in log
    ds = json.loads((runs / "per_expert_z3" / "ds_config.json").read_text())
    assert "PerExpertMoeBlock" in ds["zero_optimization"]["leaf_module"]["classes"]


def test_per_expert_block_without_leaf_hangs_or_differs(runs):
    out = (runs / "launch.out").read_text()
    if (runs / "no_leaf" / "summary.json").is_file():  # it finished: its numbers must be wrong
        got = steps(runs / "no_leaf")
        reference = steps(runs / "one_per_expert")
        assert any(abs(a[0] - b[0]) > TOL for a, b in zip(got, reference)), (got, reference)
    else:
        assert ("timed out" in out or "mismatch" in out.lower()
                or "Timeout" in out or "Connection reset" in out), out[-3000:]
        assert "no ZeRO-3 leaf modules" in (runs / "no_leaf" / "logs" / "rank0.log").read_text()


@pytest.mark.parametrize("stage", [1, 3])
def test_expert_parallel_on_two_ranks_equals_one_process(runs, stage):
    assert_same(steps(runs / "one"), steps(runs / f"ep_z{stage}"))
    log = (runs / f"ep_z{stage}" / "logs" / "rank0.log").read_text()
    assert "experts split over 2 ranks (DeepSpeed AutoEP" in log
    ds = json.loads((runs / f"ep_z{stage}" / "ds_config.json").read_text())
    assert ds["expert_parallel"] == {"enabled": True, "autoep_size": 2,
                                     "preset_model": "qwen3_moe"}


def test_expert_parallel_resumes_bitwise(runs):
    run, resumed = steps(runs / "ep_z1"), steps(runs / "ep_z1_resumed")
    assert resumed == run[2:], (run, resumed)
