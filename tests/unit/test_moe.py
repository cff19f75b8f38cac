"""Mixtures of experts without ranks (docs/moe.md): which blocks ZeRO-3 must gather whole, the
router loss taken from the model's own output, validate's refusals, and the planner's counts
(total vs active parameters, expert weights per rank under expert parallelism, FLOPs from active
parameters, the all-to-all traffic). Multi-rank training: tests/distributed/test_moe.py."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch
from conftest import MESSAGES, ROOT, TOKENIZER, write_recipe

from dpkit import moe
from dpkit.shipped import HUB_CONFIGS

TINY = {"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 64,
        "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "vocab_size": 256, "max_position_embeddings": 64}


def tiny_model(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY))


def per_expert_model():
    sys.path.insert(0, str(ROOT / "tests" / "distributed" / "per_expert_moe"))
    from modeling_per_expert_moe import PerExpertMoeConfig, PerExpertMoeForCausalLM

    sizes = {k: v for k, v in TINY.items() if k != "model_type"}
    return PerExpertMoeForCausalLM(PerExpertMoeConfig(**sizes))


# ----------------------------------------------------------------------- ZeRO-3 leaf modules
def test_blocks_with_one_module_per_expert_are_found_and_fused_ones_are_not():
    assert moe.per_expert_blocks(per_expert_model()) == ["PerExpertMoeBlock"]
    assert moe.per_expert_blocks(tiny_model()) == []  # transformers 5: one module of 3-D weights
    from transformers import AutoConfig, AutoModelForCausalLM

    for hub_id in ("mistralai/Mixtral-8x7B-v0.1", "deepseek-ai/DeepSeek-V2-Lite"):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(HUB_CONFIGS /
                                                                                hub_id))
        assert moe.per_expert_blocks(model) == [], hub_id


def test_leaf_classes_automatic_named_or_none():
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES

    classes, line = moe.leaf_classes(per_expert_model(), None)
    assert classes == [*DEFAULT_LEAF_MODULE_CLASSES, "PerExpertMoeBlock"] and "one module" in line
    assert moe.leaf_classes(tiny_model(), None)[0] is None  # DeepSpeed's own list stays
    assert moe.leaf_classes(tiny_model(), ["Qwen3MoeSparseMoeBlock"])[0] == \
        ["Qwen3MoeSparseMoeBlock"]
    assert moe.leaf_classes(per_expert_model(), [])[0] == []  # turned off, DeepSpeed's too
    ds = {"zero_optimization": {"stage": 3}}
    moe.declare_leaves(ds, ["PerExpertMoeBlock"])
    assert ds["zero_optimization"]["leaf_module"] == {"classes": ["PerExpertMoeBlock"]}
    # DeepSpeed's own application of the config marks exactly those modules
    from deepspeed.runtime.zero.leaf_module_config import DeepSpeedZeroLeafModuleConfig
    from deepspeed.utils.z3_leaf_module import apply_zero_leaf_module_config

    model = per_expert_model()
    marked = apply_zero_leaf_module_config(model, DeepSpeedZeroLeafModuleConfig(
        **ds["zero_optimization"]["leaf_module"]))
    assert [type(m).__name__ for m in marked] == ["PerExpertMoeBlock"] * TINY["num_hidden_layers"]


# -------------------------------------------------------------------------- the router loss
def test_router_loss_is_the_models_own_and_only_in_training_forwards():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: the model masks it out of its loss
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    aux, line = moe.aux_loss_for(model, model.config, None)
    assert aux.coef == 0.001 and "router_aux_loss_coef" in line  # the model's own weight
    model.train()
    model(input_ids=ids, attention_mask=mask)  # no output_router_logits: the hook asks for it
    got = aux.take(torch.device("cpu"))
    assert got.requires_grad and torch.allclose(got, expected.float(), atol=1e-6)
    assert float(aux.take(torch.device("cpu"))) == 0.0  # taken: nothing left
    with torch.no_grad():  # a reference or eval forward: not kept, the output untouched
        out = model(input_ids=ids)
    model.eval()
    model(input_ids=ids)
    assert out.aux_loss is None and aux.kept == []
    assert moe.aux_loss_for(model, model.config, 0.0)[0] is None


def test_a_model_without_a_router_loss_gets_none():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(HUB_CONFIGS / "deepseek-ai/DeepSeek-V2-Lite")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    aux, line = moe.aux_loss_for(model, config, 0.5)
    assert aux is None and "computes no load-balancing loss" in line


# ------------------------------------------------------------------------------ validate
def validate(tmp_path, extra: dict, *overrides: str) -> tuple[int, list[str]]:
    from dpkit.cli import main

    recipe = {"model": {"config": dict(TINY, vocab_size=2048), "tokenizer": str(TOKENIZER),
                        "dtype": "float32"},
              "data": {"sources": [{"path": str(MESSAGES), "format": "messages"}],
                       "max_seq_len": 64},
              "train": {"global_batch_size": 4}, "zero": {"stage": 2},
              "output": {"dir": str(tmp_path / "run"), "save_model": False}}
    for section, values in extra.items():
        recipe.setdefault(section, {}).update(values)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(write_recipe(tmp_path / "r.yaml", recipe)),
                     "--nproc-per-node", "2", *overrides])
    return code, [line for line in err.getvalue().splitlines() if line.strip()]


@pytest.mark.parametrize("extra,key,words", [
    ({"moe": {"expert_parallel": 2}, "peft": {"r": 4}}, "moe.expert_parallel", "LoRA"),
    ({"moe": {"expert_parallel": 4}}, "moe.expert_parallel", "does not divide the world size"),
    ({"moe": {"expert_parallel": 2}, "zero": {"offload_optimizer": "cpu"}},
     "moe.expert_parallel", "offload"),
    ({"train": {"sequence_parallel": 2}, "zero": {"stage": 3}}, "train.sequence_parallel",
     "slice"),
    ({"moe": {"zero3_leaf_modules": ["Qwen3MoeSparseMoeBlok"]}}, "moe.zero3_leaf_modules",
     "Qwen3MoeSparseMoeBlock"),
    ({"peft": {"r": 4, "dropout": 0.0, "target_parameters": ["experts.gate_proj"]}},
     "peft.target_parameters", "experts.down_proj, experts.gate_up_proj"),
    ({"peft": {"r": 4, "target_parameters": ["experts.down_proj"]}}, "peft",
     "peft.dropout: 0"),
])
def test_what_moe_cannot_take_is_refused_in_one_line(tmp_path, extra, key, words):
    code, lines = validate(tmp_path, extra)
    assert code == 2 and len(lines) == 1, lines
    assert key in lines[0] and words in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_expert_parallelism_on_a_dense_model_is_refused(tmp_path):
    from conftest import TINY_LLAMA

    code, lines = validate(tmp_path, {"moe": {"expert_parallel": 2},
                                      "model": {"config": dict(TINY_LLAMA)}})
    assert code == 2 and len(lines) == 1 and "not a mixture-of-experts model" in lines[0], lines


def test_lora_on_experts_and_expert_parallelism_validate(tmp_path):
    assert validate(tmp_path, {"peft": {"r": 4, "dropout": 0.0, "target_parameters": [
        "experts.gate_up_proj", "experts.down_proj"]}})[0] == 0
    assert validate(tmp_path, {"moe": {"expert_parallel": 2}, "zero": {"stage": 3}})[0] == 0
    # the final save gathers the experts back into the model's layout (dpkit/moe_layout.py)
    assert validate(tmp_path, {"moe": {"expert_parallel": 2}, "zero": {"stage": 1},
                               "output": {"save_model": True}})[0] == 0


# ------------------------------------------------------------------------------- planning
@pytest.fixture(scope="module")
def qwen3():
    from transformers import AutoConfig

    from dpkit.plan.shape import model_shape

    return model_shape(AutoConfig.from_pretrained(HUB_CONFIGS / "Qwen/Qwen3-30B-A3B"))


def test_total_and_active_parameters(qwen3):
    h, moe_i, layers, experts = 2048, 768, 48, 128
    per_expert = 3 * h * moe_i  # gate and up [2·768, 2048], down [2048, 768]
    assert (qwen3.experts, qwen3.experts_per_token, qwen3.moe_layers) == (128, 8, 48)
    assert qwen3.expert_params == layers * experts * per_expert
    assert qwen3.active == qwen3.total - layers * (experts - 8) * per_expert
    assert qwen3.largest_expert_layer == experts * per_expert


def test_flops_count_active_parameters(qwen3):
    from dpkit.plan.time import matmul_params

    embedding = 151936 * 2048  # a lookup, not a matmul (untied: the head is one)
    assert matmul_params(qwen3)[0] == qwen3.active - embedding
    # the MFU metric counts the same on a model
    from transformers import AutoConfig

    from dpkit.metrics import matmul_parameters

    model = tiny_model()
    dense = sum(p.numel() for n, p in model.named_parameters() if "experts" not in n
                and n != "model.embed_tokens.weight")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert matmul_parameters(model) == (dense + experts // 2, dense + experts // 2)
    del AutoConfig


def test_expert_parallelism_keeps_a_share_of_the_experts_per_rank(qwen3):
    from dpkit.plan.memory import Setup, estimate

    X, P = qwen3.expert_params, qwen3.total
    for ep in (1, 2, 8):
        b = estimate(qwen3, Setup(0, "none", "none", 8, 8, 2, 1, 1024, expert_parallel=ep))
        assert b.elements("params", "weights") == P - X + X // ep  # ZeRO-0: replicated
        z3 = estimate(qwen3, Setup(3, "none", "none", 8, 8, 2, 1, 1024, expert_parallel=ep))
        assert z3.elements("params", "partition") == -(-P // 8)  # partitions stay 1/n
        assert z3.elements("optim", "adam") == 2 * -(-P // 8)


def test_all_to_all_traffic(qwen3):
    from dpkit.plan.time import Job, all_to_all_bytes

    job = Job(qwen3, 3, "none", "none", 8, 8, micro_batch=2, grad_accum=3, seq_len=1024,
              dtype_bytes=2, expert_parallel=8)
    tokens = 2 * 3 * 1024
    assert all_to_all_bytes(job) == 4 * 48 * tokens * 8 * 2048 * 2 * 7 / 8
    from dataclasses import replace

    assert all_to_all_bytes(replace(job, expert_parallel=1)) == 0


def test_plan_prints_total_and_active_and_which_options_fit(monkeypatch, capsys):
    from huggingface_hub import constants

    from dpkit.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["plan", "Qwen/Qwen3-30B-A3B", "--gpus-per-node", "8", "--gpu-memory",
                 "80GB", "--seq-len", "1024", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "30.53B parameters (3.35B active: 8 of 128 experts per token in 48 layers" in out
    table = [r.split() for r in out.splitlines() if r.endswith("yes") or "  no (" in r]
    rows = {(int(r[0]), int(r[2])): r[-1] == "yes" for r in table if r[1] == "none"}
    assert set(rows) == {(s, ep) for s in range(4) for ep in (1, 2, 4, 8)}
    assert not any(rows[(s, 1)] for s in (0, 1, 2)) and rows[(3, 1)]  # 16 B × 30.5B / 8 GPUs
    assert "GiB sent all-to-all per GPU per step" in out


# ------------------------------------------------------------------ resuming expert parallelism
@pytest.mark.parametrize("saved,wanted,refused", [
    ((2, 2, 1), (2, 2, 1), None),   # as it was written: DeepSpeed's own checkpoint load
    ((2, 2, 3), (1, 1, 3), None),   # without expert parallelism: the universal checkpoint
    ((2, 2, 1), (1, 2, 3), None),   # ... on any world and stage
    ((1, 2, 1), (1, 1, 1), None),   # no expert parallelism at all: not this check's business
    ((2, 2, 1), (2, 4, 1), "only as it was written"),  # DeepSpeed's re-sharding: untested
    ((2, 4, 1), (4, 4, 1), "only as it was written"),
    ((1, 2, 1), (2, 2, 1), "only as it was written"),  # nothing converts into AutoEP's layout
    ((2, 2, 0), (1, 1, 0), "only from ZeRO 1-3"),      # no partitions to convert from
])
def test_which_expert_parallel_resumes_are_taken(tmp_path, saved, wanted, refused):
    import json
    from dataclasses import asdict
    from types import SimpleNamespace

    from dpkit import checkpoint as C

    ep, world, stage = saved
    state = C.TrainState(step=2, tokens_seen=0, world_size=world, zero_stage=stage, seed=0,
                         steps_per_epoch=4, expert_parallel=ep)
    (tmp_path / "dpkit.json").write_text(json.dumps(asdict(state)))
    ep, world, stage = wanted
    problem = C.expert_parallel_problem(
        tmp_path, SimpleNamespace(expert_parallel=ep, world_size=world, stage=stage))
    if refused is None:
        assert problem is None
    else:
        assert len(problem.problems) == 1 and problem.problems[0].where == "moe.expert_parallel"
        assert refused in str(problem), str(problem)


def test_old_checkpoints_read_as_without_expert_parallelism(tmp_path):
    import json

    from dpkit import checkpoint as C

    (tmp_path / "dpkit.json").write_text(json.dumps(
        {"step": 2, "tokens_seen": 0, "world_size": 2, "zero_stage": 1, "seed": 0,
         "steps_per_epoch": 4}))  # written before expert_parallel was stored
    assert C.read_state(tmp_path).expert_parallel == 1


def test_the_planner_agrees_with_ms_swifts_published_qwen3_moe_runs():
    """scripts/plan_published_check.py: ms-swift's Qwen3-30B-A3B full fine-tuning on 16 A800
    80GB at 8K packed tokens ran out of memory under ZeRO-2 and ran under ZeRO-3 (docs/plan.md)."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    from plan_published_check import ms_swift_qwen3_moe

    need = ms_swift_qwen3_moe(16)
    assert need[2] > 80 > need[3], need


def test_an_expert_parallel_resume_it_cannot_take_is_refused_by_validate(tmp_path):
    """Before any rank starts: a checkpoint written with expert parallelism 2 on 2 ranks under
    ZeRO-1, resumed with it under ZeRO-3 (DeepSpeed's re-sharding, untested here)."""
    import json
    from dataclasses import asdict

    from dpkit import checkpoint as C

    ckpt = tmp_path / "old" / "checkpoints" / "step-00000002"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "dpkit.json").write_text(json.dumps(asdict(C.TrainState(
        step=2, tokens_seen=0, world_size=2, zero_stage=1, seed=0, steps_per_epoch=4,
        expert_parallel=2))))
    (ckpt / C.MARKER).write_text("2\n")
    code, lines = validate(tmp_path, {"moe": {"expert_parallel": 2}, "zero": {"stage": 3}},
                           f"resume={ckpt}")
    assert code == 2 and len(lines) == 1, lines
    assert "moe.expert_parallel" in lines[0] and "only as it was written" in lines[0], lines[0]
    # without expert parallelism it is taken (the universal checkpoint's model layout)
    assert validate(tmp_path, {"zero": {"stage": 3}}, f"resume={ckpt}")[0] == 0
