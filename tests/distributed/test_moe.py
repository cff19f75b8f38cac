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
- expert parallelism over 2 ranks (DeepSpeed AutoEP) under ZeRO-1 and ZeRO-3, with checkpoints
  and the final model: the saved model and `dpkit export` of the last checkpoint load with
  from_pretrained and give the trained engine's logits (run_moe_recipes.py records them before
  the final save); the step-2 checkpoints resumed on one process without expert parallelism;
  the ZeRO-3 run again with rank 1 SIGKILLed at step 3 (the launch ends), started again and
  resumed bitwise.
Three launches: every 2-rank run, the last one killed; the killed run resumed, and the one
without leaf modules; then one process: the references and the resumes from 2 ranks.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MESSAGES, ROOT, TOKENIZER, read_metrics, torchrun, write_recipe

pytestmark = pytest.mark.distributed
DRIVER = ROOT / "tests" / "distributed" / "run_moe_recipes.py"  # + the engine's logits
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
    double = {}
    for stage in (0, 1, 2, 3):
        double[f"full_z{stage}"] = moe_recipe(tmp / f"full_z{stage}", stage)
        double[f"lora_z{stage}"] = {**moe_recipe(tmp / f"lora_z{stage}", stage), "peft": LORA}
    double["lora_z3"]["output"]["save_model"] = True  # gathered from ZeRO-3 and checked
    double["per_expert_z3"] = moe_recipe(tmp / "per_expert_z3", 3, per_expert)
    # expert parallelism last: AutoEP's process groups stay with the process. Checkpoints at
    # steps 2 and 4 (the end), and the final model saved.
    for stage in (1, 3):
        double[f"ep_z{stage}"] = ep = moe_recipe(tmp / f"ep_z{stage}", stage, expert_parallel=2)
        ep["output"].update(save_steps=2, save_model=True)
    # ep_z3 again, last: rank 1 SIGKILLed as step 3 starts, which ends the launch. The ranks
    # are started again (as `dpkit train` does after a dead rank: train.max_restarts), and it
    # resumes from its step-2 checkpoint (resume: auto); then the per-expert block without its
    # leaf declaration: it may end that launch (a collective mismatch aborts both ranks; a hang
    # ends at the 20 s collective timeout), after every other run has finished.
    double["ep_killed"] = {**moe_recipe(tmp / "ep_killed", 3, expert_parallel=2),
                           "resume": "auto"}
    double["ep_killed"]["output"].update(save_steps=2, save_model=True)
    double["no_leaf"] = moe_recipe(tmp / "no_leaf", 3, per_expert, zero3_leaf_modules=[])
    paths = {n: str(write_recipe(tmp / f"{n}.yaml", r)) for n, r in double.items()}
    killed = torchrun(2, list(paths.values())[:-1], script=DRIVER, timeout=420, check=False,
                      extra_env={"MOE_FAULT": "ep_killed.yaml=kill@step:3:1"})
    (tmp / "killed.out").write_text(f"exit {killed.returncode}\n{killed.stderr}")
    try:
        proc = torchrun(2, [paths["ep_killed"], paths["no_leaf"]], script=DRIVER,
                        timeout=300, check=False)
        (tmp / "launch.out").write_text(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    except subprocess.TimeoutExpired:
        (tmp / "launch.out").write_text("timed out (hung)")
    unfinished = [n for n in list(double)[:-1] if not (tmp / n / "summary.json").is_file()]
    assert not unfinished, (unfinished, (tmp / "launch.out").read_text()[-6000:])

    # One process: the references, and both expert-parallel runs' step-2 checkpoints resumed
    # without expert parallelism (world 2 -> 1, through the universal checkpoint).
    single = {"one": moe_recipe(tmp / "one", 0),
              "one_no_aux": {**moe_recipe(tmp / "one_no_aux", 0), "moe": {"aux_loss_coef": 0}},
              "one_lora": {**moe_recipe(tmp / "one_lora", 0), "peft": LORA},
              "one_per_expert": moe_recipe(tmp / "one_per_expert", 0, per_expert)}
    for stage in (1, 3):
        single[f"ep_z{stage}_on_one"] = {
            **moe_recipe(tmp / f"ep_z{stage}_on_one", stage),
            "resume": str(tmp / f"ep_z{stage}" / "checkpoints" / "step-00000002")}
    torchrun(1, [str(write_recipe(tmp / f"{n}.yaml", r)) for n, r in single.items()],
             script=DRIVER, timeout=300)
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


def test_expert_parallel_resumes_bitwise_after_sigkill(runs):
    out = (runs / "killed.out").read_text()
    assert "Signal 9 (SIGKILL)" in out, out[-6000:]  # rank 1 really died, and the launch ended
    log = (runs / "ep_killed" / "logs" / "rank0.log").read_text()
    assert f"resumed from {runs / 'ep_killed' / 'checkpoints' / 'step-00000002'} at step 2" in log
    assert steps(runs / "ep_killed") == steps(runs / "ep_z3")
    from safetensors.torch import load_file

    a, b = (load_file(runs / n / "model" / "model.safetensors") for n in ("ep_killed", "ep_z3"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", [1, 3])
def test_expert_parallel_checkpoint_resumes_on_one_process(runs, stage):
    """Two ranks with their experts split, then one process without expert parallelism: the
    universal checkpoint also holds the model's own layout (weights and Adam's moments)."""
    expected, got = steps(runs / f"ep_z{stage}")[2:], steps(runs / f"ep_z{stage}_on_one")
    assert len(got) == 2 and all(abs(a[0] - b[0]) <= TOL and abs(a[1] - b[1]) <= TOL
                                 for a, b in zip(expected, got)), (expected, got)
    log = (runs / f"ep_z{stage}_on_one" / "logs" / "rank0.log").read_text()
    assert "universal checkpoint" in log


def logits_of(model_dir: Path):
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(DRIVER.parent))
    from run_moe_recipes import BATCH

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=BATCH).logits


@pytest.mark.parametrize("stage", [1, 3])
def test_expert_parallel_final_model_answers_as_the_engine(runs, stage):
    """The final save gathers each rank's experts into the model's own layout: transformers
    loads it (no missing or unexpected weight: from_pretrained would warn and initialise them)
    and its logits are the trained engine's, which ran with its experts split over 2 ranks."""
    from safetensors.torch import load_file

    run = runs / f"ep_z{stage}"
    engine = torch.load(run / "engine_logits.pt")
    saved = load_file(run / "model" / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in saved or any(
        ".mlp.experts.0." in k for k in saved), sorted(saved)[:20]
    assert not any(".w1" in k or "router." in k for k in saved)
    assert (logits_of(run / "model") - engine).abs().max().item() <= TOL
    # ... and the engine's weights are the trained ones, not those it started from
    from dpkit.model import build_model
    from dpkit.recipe import load_recipe

    recipe = load_recipe(runs / f"ep_z{stage}.yaml")
    initial = build_model(recipe.model, recipe.train.seed, 0).float().eval()
    sys.path.insert(0, str(DRIVER.parent))
    from run_moe_recipes import BATCH

    with torch.no_grad():
        assert (initial(input_ids=BATCH).logits - engine).abs().max().item() > 100 * TOL


@pytest.mark.parametrize("stage", [1, 3])
def test_dpkit_export_of_an_expert_parallel_checkpoint(runs, tmp_path, stage):
    """`dpkit export` of the last checkpoint (step 4, the end) of an expert-parallel run:
    DeepSpeed's universal conversion gathers the experts; the export is the final model."""
    from safetensors.torch import load_file

    from dpkit.checkpoint import latest_complete
    from dpkit.export import export

    run = runs / f"ep_z{stage}"
    out = export(latest_complete(run), tmp_path / "export")
    assert (logits_of(out) - torch.load(run / "engine_logits.pt")).abs().max().item() <= TOL
    a, b = load_file(out / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
