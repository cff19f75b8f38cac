"""Greedy generations from the training engine, under every ZeRO stage and with LoRA.

Under ZeRO 0-2 every rank holds the whole model: it generates directly. Under ZeRO-3 each rank
holds a slice of every parameter, and a plain `model.generate` on the engine all-gathers each
layer's parameters in every forward pass — once per generated token, the reason most kits skip
generation under ZeRO-3. Here the parameters are gathered ONCE per eval (DeepSpeed's
`unwrap_model_for_generation`: `GatheredParameters` over the module, with ZeRO-3's per-module
fetch hooks lifted while it lasts), so generating is as fast as on one GPU; they are partitioned
again afterwards. The cost is the whole model in each rank's memory for that time — set
`eval.num_prompts: 0` (and no `eval.prompts`) for a model that does not fit one device.

Every rank takes part (the gather is a collective); each generates its share of the prompts
(one at a time, unpadded: exactly what `model.generate` on one process gives) and rank 0
collects all completions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from dpkit.data import formats
from dpkit.data.tokenize import IGNORE


@dataclass
class Prompt:
    text: str
    """As shown in samples.jsonl, the report and the model card."""
    ids: list[int]
    """What the model is given (template and special tokens included)."""


# ------------------------------------------------------------------------------------ prompts
def render_prompt(text: str, source, tokenizer, first_row=None) -> list[int]:
    """A user's prompt rendered by the source's data format the way its training rows are (so
    the model is asked in the format it learns: see `Format.prompt` in dpkit/data/formats.py).
    `first_row()`: the source's first row (read on demand, by formats that need its layout)."""
    if first_row is None:
        def first_row():
            from dpkit.data.load import load_source

            return load_source(source, "data.sources[0]")[0]

    rendered, plain = formats.get(source.format).prompt(text, source, tokenizer, first_row)
    # Tokenized as dpkit/data/tokenize.encode_batch tokenizes a training row: plain text gets the
    # tokenizer's special tokens (bos), a chat template's rendering carries its own.
    return list(tokenizer(rendered, add_special_tokens=plain)["input_ids"])


def row_prompt(example, tokenizer) -> Prompt:
    """The prompt part of a tokenized row: its tokens before the first trained one (the alpaca
    prompt, the conversation up to the assistant's turn). A row trained on every token (`text`
    data) is continued from its first half. An example of another shape (a preference pair)
    names the row to show with `sample_row()`: (ids, labels)."""
    if hasattr(example, "sample_row"):
        ids_all, labels = example.sample_row()
    else:
        ids_all, labels = example.input_ids, example.labels
    first = next((i for i, label in enumerate(labels) if label != IGNORE), len(labels))
    if first < 2:
        first = max(1, len(labels) // 2)
    ids = list(ids_all[:first])
    return Prompt(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids)


def choose_prompts(section, source, tokenizer, eval_rows: list) -> list[Prompt]:
    """The recipe's prompts rendered by `source`'s format, else the first `num_prompts` eval
    rows' prompts."""
    if section.prompts:
        return [Prompt(p, render_prompt(p, source, tokenizer)) for p in section.prompts]
    return [row_prompt(ex, tokenizer) for ex in eval_rows[:section.num_prompts]]


# --------------------------------------------------------------------------------- generating
@contextmanager
def full_weights(engine, layout):
    """The whole model on every rank for the duration: gathered once where parameters are
    partitioned (ZeRO-3; `layout`: dpkit/layout.py)."""
    if layout.partitions_parameters:
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        # An eval forward just before may have left parameters prefetched for a backward pass
        # that never comes (in flight): wait for them and release everything, then gather.
        engine.empty_partition_cache()
        with unwrap_model_for_generation(engine):
            yield engine.module
    else:
        yield engine.module


@contextmanager
def plain_attention(module):
    """Packed training may run with dpkit's row-by-row attention (dpkit/attention.py), which has
    no notion of a KV cache: generate with sdpa, then switch back."""
    from dpkit.attention import NAME as ROWS

    config = getattr(module, "config", None)
    chosen = getattr(config, "_attn_implementation", None)
    if chosen != ROWS:
        yield
        return
    target = module.get_base_model() if hasattr(module, "get_base_model") else module
    target.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        target.set_attn_implementation(ROWS)


def greedy(module, ids: list[int], max_new_tokens: int, eos_id: int | None, pad_id: int | None,
           device) -> list[int]:
    """One prompt, unpadded: the completion's token ids (eos included when reached)."""
    inputs = torch.tensor([ids], device=device)
    out = module.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                          max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                          eos_token_id=eos_id, pad_token_id=pad_id)
    return out[0, inputs.shape[1]:].tolist()


def generate(engine, prompts: list[Prompt], env, layout, max_new_tokens: int,
             eos_id: int | None, pad_id: int | None) -> list[list[int]] | None:
    """Completion ids of every prompt on rank 0 (None on the others). Collective: every rank
    must call it, with the same prompts."""
    mine = {}
    module = engine.module
    was_training = module.training
    with full_weights(engine, layout) as model, plain_attention(model), torch.no_grad():
        model.eval()
        for i in range(env.rank, len(prompts), env.world_size):
            mine[i] = greedy(model, prompts[i].ids, max_new_tokens, eos_id, pad_id, env.device)
    module.train(was_training)
    return _collect(mine, len(prompts), env)


def _collect(mine: dict[int, list[int]], n: int, env) -> list[list[int]] | None:
    """Rank 0 gets every rank's completions (a gather of small Python objects)."""
    if env.world_size == 1 or not torch.distributed.is_initialized():
        return [mine[i] for i in range(n)]
    parts = [None] * env.world_size if env.is_main else None
    torch.distributed.gather_object(mine, parts, dst=0)
    if not env.is_main:
        return None
    merged = {i: c for part in parts for i, c in part.items()}
    return [merged[i] for i in range(n)]

