"""Every architecture family of the recipe library trains on 2 real CPU ranks.

For each family one library recipe is turned into a tiny run: the model is the family's shipped
config.json (dpkit/resources/hub_configs) with its sizes shrunk (hidden 64, 2 layers, the bundled 2048-token
tokenizer's vocabulary) but every architectural switch kept (tied or untied embeddings, GQA or MHA,
head_dim, biases, rope scaling, Gemma-2's soft-capping and sliding window, Phi-3's longrope and
fused projections; a mixture of experts' routing, shrunk to 4 experts, 2 per token, and
DeepSeek-V2's latent attention); the data is the bundled Self-Instruct rows in the recipe's own
format (with its column mapping, and with the chat template the recipe uses); ZeRO stage and LoRA settings are the
recipe's. All runs share ONE 2-rank launch (tests/distributed/run_recipes.py). Each trains 2 steps
on the same 4 rows (2 epochs of one global batch), so the second loss must be lower.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import ALPACA, MESSAGES, ROOT, TOKENIZER, read_metrics, torchrun, write_recipe

from dpkit.recipe import load_recipe

pytestmark = pytest.mark.distributed

DRIVER = ROOT / "tests" / "distributed" / "run_recipes.py"
from dpkit.shipped import HUB_CONFIGS  # noqa: E402
FAMILIES = {  # model_type -> the recipe it trains (a spread of ZeRO stages, formats and LoRA)
    "llama": "recipes/llama-3.2-1b/instruct-full-zero0.yaml",  # alpaca, tied, llama3 rope
    "qwen2": "recipes/qwen2.5-7b/chat-full-zero1.yaml",  # messages + ChatML, qkv bias, untied
    "mistral": "recipes/mistral-7b/dolly-full-zero3-offload.yaml",  # column-mapped, ZeRO-3
    "gemma2": "recipes/gemma-2-2b/dolly-full-zero1.yaml",  # soft-capping, sliding window
    "phi3": "recipes/phi-3.5-mini/chat-lora-zero2.yaml",  # LoRA on fused qkv/gate_up, longrope
    # mixtures of experts (docs/moe.md): LoRA on the experts' 3-D weights, router loss on
    "qwen3_moe": "recipes/qwen3-30b-a3b/dolly-lora-zero3.yaml",
    "mixtral": "recipes/mixtral-8x7b/dolly-lora-zero3.yaml",
    "deepseek_v2": "recipes/deepseek-v2-lite/dolly-lora-zero2.yaml",  # MLA, shared experts
}
ROWS = 4  # = the global batch: each epoch is one step over the same rows


def shrink(config: dict, tokenizer) -> dict:
    """The shipped config with small sizes; every architectural choice kept."""
    c = {k: v for k, v in config.items() if k not in (
        "architectures", "auto_map", "_name_or_path", "torch_dtype", "transformers_version")}
    mha = c.get("num_key_value_heads", c["num_attention_heads"]) == c["num_attention_heads"]
    c.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4 if mha else 2, vocab_size=len(tokenizer),
             max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
             eos_token_id=tokenizer.eos_token_id)
    if "head_dim" in c:
        c["head_dim"] = 16
    if c.get("pad_token_id") is not None:
        c["pad_token_id"] = tokenizer.eos_token_id
    if c["model_type"] == "gemma2":
        c.update(query_pre_attn_scalar=16, sliding_window=32)  # rows are longer: both kinds used
    if c["model_type"] == "qwen2":
        c.update(max_window_layers=2, sliding_window=512)
    if "num_experts_per_tok" in c:  # a mixture of experts: 4 small experts, 2 per token
        c.update({k: 4 for k in ("num_experts", "num_local_experts", "n_routed_experts")
                  if k in c}, num_experts_per_tok=2)
        c.update({k: v for k, v in (("moe_intermediate_size", 32), ("n_shared_experts", 1))
                  if k in c})
    if c["model_type"] == "deepseek_v2":  # multi-head latent attention, small
        c.update(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
        c["rope_scaling"] = {**c["rope_scaling"], "original_max_position_embeddings": 128}
    if c["model_type"] == "phi3":  # longrope: one factor per rotary frequency (head_dim / 2)
        rs = c["rope_scaling"]
        c["rope_scaling"] = {"type": rs["type"], "long_factor": rs["long_factor"][::6],
                             "short_factor": rs["short_factor"][::6]}
        c.update(original_max_position_embeddings=128, sliding_window=512)
    return c


def tiny_tokenizer(recipe, out: Path) -> Path:
    """The bundled tokenizer; for a chat recipe with the chat template the recipe trains with."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    shipped = HUB_CONFIGS / recipe.model.tokenizer_path / "tokenizer_config.json"
    if any(s.format == "messages" for s in recipe.data.sources):
        tok.chat_template = json.loads(shipped.read_text())["chat_template"]
    tok.save_pretrained(out)
    return out


def tiny_data(source, out: Path) -> dict:
    """ROWS bundled rows in the recipe source's format, under the recipe's column names."""
    rows = [json.loads(line) for line in
            (MESSAGES if source.format == "messages" else ALPACA).read_text().splitlines()[:ROWS]]
    renamed = [{source.column(k): v for k, v in row.items()} for row in rows]
    out.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    return {"path": str(out), "format": source.format, "columns": dict(source.columns)}


def tiny_recipe(family: str, path: str, tmp: Path) -> dict:
    recipe = load_recipe(ROOT / path)
    assert recipe.model.name_or_path is not None
    config = json.loads((HUB_CONFIGS / recipe.model.name_or_path / "config.json").read_text())
    assert config["model_type"] == family
    tok_dir = tiny_tokenizer(recipe, tmp / f"{family}-tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    raw = {
        "model": {"config": shrink(config, tokenizer), "tokenizer": str(tok_dir),
                  "dtype": "float32", "attn_implementation": recipe.model.attn_implementation,
                  "gradient_checkpointing": recipe.model.gradient_checkpointing},
        "data": {"sources": [tiny_data(recipe.data.sources[0], tmp / f"{family}.jsonl")],
                 "max_seq_len": 128, "completion_only_loss": recipe.data.completion_only_loss},
        "train": {"global_batch_size": ROWS, "micro_batch_size": 1, "epochs": 2, "lr": 1e-3,
                  "lr_schedule": "constant", "seed": 0},
        # the recipe's ZeRO stage; CPU offload needs DeepSpeed's CPU Adam op, not this test's job
        "zero": {"stage": recipe.zero.stage},
        "output": {"dir": str(tmp / family), "save_model": False},
    }
    if recipe.peft is not None:
        raw["peft"] = {**recipe.peft.model_dump(mode="json"), "dropout": 0.0}
    return raw


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("families")
    paths = [str(write_recipe(tmp / f"{family}.yaml", tiny_recipe(family, path, tmp)))
             for family, path in FAMILIES.items()]
    torchrun(2, paths, script=DRIVER, timeout=240)
    return tmp


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_under_its_recipes_zero_stage(runs, family):
    steps = [m for m in read_metrics(runs / family) if "loss" in m]
    losses = [m["loss"] for m in steps]
    assert len(losses) == 2, steps
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[1] < losses[0], f"{family}: the same rows twice, yet {losses}"
    summary = json.loads((runs / family / "summary.json").read_text())
    assert summary.get("world_size", 2) == 2
