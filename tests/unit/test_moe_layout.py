"""An expert-parallel model's weights back in the model's own layout (dpkit/moe_layout.py),
checked against DeepSpeed itself: a tiny transformers MoE model is handed to DeepSpeed AutoEP's
own layer replacement (as `deepspeed.initialize` does), and the plan must rebuild every weight of
the original model, bitwise, from the replaced model's tensors. Every AutoEP preset family with a
transformers class here: fused gate/up experts (Qwen3-MoE, Mixtral), shared experts with and
without their gate (Qwen2-MoE, DeepSeek-V2, whose first layer stays dense)."""

from __future__ import annotations

import copy

import pytest
import torch

from dpkit import moe, moe_layout

SIZES = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96,
         "max_position_embeddings": 64}
CONFIGS = {
    "qwen3_moe": {"moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "head_dim": 8},
    "qwen2_moe": {"moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "shared_expert_intermediate_size": 24},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v2": {"moe_intermediate_size": 16, "n_routed_experts": 4,
                    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
                    "kv_lora_rank": 16, "q_lora_rank": None, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 8, "topk_method": "greedy",
                    "n_group": 1, "topk_group": 1},
}


def model_of(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **SIZES, **CONFIGS[model_type])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # every weight distinct, so a swapped or misplaced one shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def autoep(model, ep_size: int = 1, ep_rank: int = 0):
    """`model` with its MoE blocks replaced by DeepSpeed AutoEP's layers holding rank
    `ep_rank`'s experts, as deepspeed.initialize replaces them."""
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_presets.base import AutoEPConfig

    moe.allow_autoep_with_transformers()
    replaced = copy.deepcopy(model)
    auto = AutoEP(replaced, AutoEPConfig(enabled=True, autoep_size=ep_size,
                                         preset_model=moe.autoep_preset(model.config)))
    auto.replace_moe_layers(auto.ep_parser(), ep_size=ep_size, ep_rank=ep_rank)
    return replaced


def tensors_of(model) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update(model.named_buffers())
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_the_plan_rebuilds_every_weight_from_autoeps_layers(model_type):
    model = model_of(model_type)
    expected = model.state_dict()
    live = tensors_of(autoep(model))
    assert not any(k.endswith((".gate_up_proj", ".down_proj")) for k in live)  # really replaced
    meta = moe_layout.meta_model(model.config)
    got = {}
    for group in moe_layout.plan(meta, moe.autoep_preset(model.config)):
        for name, make in group.outputs.items():
            got[name] = make({n: live[n] for n in group.inputs})
    assert got.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not different, different


def test_expert_parallel_ranks_hold_consecutive_experts():
    """The final save concatenates the ranks' experts in rank order: AutoEP's rank r holds
    experts r·E/EP … (r+1)·E/EP − 1."""
    model = model_of("qwen3_moe")
    whole = tensors_of(autoep(model))
    ranks = [tensors_of(autoep(model, 2, r)) for r in (0, 1)]
    for name in whole:
        if name.rsplit(".", 1)[-1] in moe_layout.EXPERTS:
            assert ranks[0][name].shape[0] == 2
            assert torch.equal(torch.cat([ranks[0][name], ranks[1][name]]), whole[name]), name


def test_a_weight_autoep_has_no_counterpart_for_is_refused():
    model = model_of("qwen3_moe")
    meta = moe_layout.meta_model(model.config)
    meta.model.layers[0].mlp.register_parameter(
        "extra", torch.nn.Parameter(torch.empty(2, device="meta")))
    with pytest.raises(RuntimeError, match="model.layers.0.mlp.extra: no counterpart"):
        moe_layout.plan(meta, "qwen3_moe")
