"""A tiny mixture of experts that keeps one module per expert, as remote-code MoE models do
(DeepSeek-V2's modeling_deepseek.py, Mixtral's classes before transformers 5): Qwen3-MoE with
its fused experts module replaced by a list of MLPs, of which a forward calls only those some
token was routed to. Loaded with trust_remote_code by tests/distributed/test_moe.py, where it is
the block ZeRO-3 must gather whole (dpkit.moe.per_expert_blocks finds it)."""

import torch
from torch import nn
from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeForCausalLM,
    Qwen3MoeMLP,
    Qwen3MoeTopKRouter,
)


class PerExpertMoeConfig(Qwen3MoeConfig):
    model_type = "per_expert_moe"


class PerExpertMoeBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = Qwen3MoeTopKRouter(config)
        self.experts = nn.ModuleList(
            Qwen3MoeMLP(config, intermediate_size=config.moe_intermediate_size)
            for _ in range(config.num_experts))

    def forward(self, hidden_states):
        batch, seq, hidden = hidden_states.shape
        flat = hidden_states.reshape(-1, hidden)
        _, weights, chosen = self.gate(flat)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():  # data-dependent: the experts some token chose
            rows, slot = torch.where(chosen == e)
            out.index_add_(0, rows, self.experts[e](flat[rows]) * weights[rows, slot, None])
        return out.reshape(batch, seq, hidden)


class PerExpertMoeForCausalLM(Qwen3MoeForCausalLM):
    config_class = PerExpertMoeConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = PerExpertMoeBlock(config)
        self.post_init()
