"""MFU's FLOP formula against torch's own FLOP counter on a real tiny model."""

import pytest
import torch
from conftest import TINY_LLAMA
from torch.utils.flop_counter import FlopCounterMode

from dpkit.metrics import matmul_parameters, model_flops, peak_flops


def tiny(attn: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY_LLAMA, **overrides}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def counted(model, lengths: list[int]) -> int:
    """FLOPs torch counts for one forward+backward, one row at a time (no padding)."""
    with FlopCounterMode(display=False) as counter:
        for n in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n))
            model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("lengths", [[64], [17, 40, 96]])
def test_full_fine_tuning_flops_match_torch(lengths):
    model = tiny("eager")  # eager attention: torch counts its score/value matmuls as bmm
    total, trainable = matmul_parameters(model)
    ours = model_flops(total, trainable, model.config.num_hidden_layers,
                       model.config.hidden_size, lengths)
    assert ours == pytest.approx(counted(model, lengths), rel=0.02)


def test_lora_counts_no_weight_gradients_for_the_frozen_base():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("eager"), LoraConfig(r=4, target_modules="all-linear"))
    total, trainable = matmul_parameters(model)
    assert trainable < total / 10
    lengths = [48]
    ours = model_flops(total, trainable, model.config.num_hidden_layers,
                       model.config.hidden_size, lengths)
    assert ours == pytest.approx(counted(model, lengths), rel=0.05)
    full = model_flops(total, total, model.config.num_hidden_layers, model.config.hidden_size,
                       lengths)
    assert ours < 0.75 * full  # 6N would flatter LoRA's MFU


def test_tied_embeddings_count_as_the_output_head():
    untied, tied = tiny("eager"), tiny("eager", tie_word_embeddings=True)
    emb = untied.get_input_embeddings().weight.numel()
    assert matmul_parameters(untied)[0] == sum(p.numel() for p in untied.parameters()) - emb
    assert matmul_parameters(tied)[0] == sum(p.numel() for p in tied.parameters())


def test_no_peak_on_cpu():
    assert peak_flops(torch.device("cpu"), "bfloat16") is None
