"""The model heads a method trains: one home for "which transformers Auto class".

A method's declaration names its head (`MethodSpec.head`, dpkit/methods/): `causal_lm` (next-token
logits: supervised, preference methods) or `sequence_classification` (one score per row: reward
models). Everything that builds or loads a model — training, LoRA, preflight, the planner,
export, the Hub push, lm-eval — asks here, never names an Auto class itself. A saved model's
head is read back from its config's `architectures`.
"""

from __future__ import annotations

import transformers

CLASSES = {"causal_lm": "AutoModelForCausalLM",
           "sequence_classification": "AutoModelForSequenceClassification"}


def auto_class(head: str = "causal_lm"):
    """The transformers Auto class that builds `head` on any architecture it knows."""
    return getattr(transformers, CLASSES[head])


def of_recipe(recipe) -> str:
    from dpkit.methods import spec

    return spec(recipe).head


def of_config(config) -> str:
    """The head a saved model was trained with, from its config's `architectures`."""
    names = getattr(config, "architectures", None) or []
    return "sequence_classification" if any(n.endswith("ForSequenceClassification")
                                            for n in names) else "causal_lm"


def of_adapter(adapter_dir) -> str:
    """The head a LoRA adapter was trained on, from its PEFT task type."""
    import json
    from pathlib import Path

    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return "sequence_classification" if config.get("task_type") == "SEQ_CLS" else "causal_lm"


SCORE = "score"
"""The attribute of transformers' sequence-classification models built on a causal LM (their
`GenericForSequenceClassification` and the model-specific ones alike) holding the score layer."""


def score_layer(model):
    """The score layer (hidden → one number per token) of a sequence-classification model, under
    a PEFT wrapper too (then PEFT's trained copy, `ModulesToSaveWrapper`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = getattr(base, SCORE, None)
    if layer is None:
        raise ValueError(f"{type(base).__name__} has no `{SCORE}` layer: dpkit trains sequence "
                         "classification on models built on a causal LM")
    return layer


def seed_new_head(model, head: str, seed: int) -> None:
    """Give a score layer the model was just built with (an inline config, or a causal LM
    checkpoint loaded for sequence classification: transformers creates it) weights drawn from
    `seed` alone — normal(0, initializer_range) from its own generator, no bias — so it starts the
    same under every ZeRO stage and world size. transformers initialises it from the global
    random stream, which ZeRO-3's partitioned build (zero.Init) consumes in another order. Call
    on every rank: under ZeRO-3 the layer is gathered, written on rank 0 and partitioned again."""
    if head != "sequence_classification":
        return
    import torch

    layer = score_layer(model)
    if type(layer) is not torch.nn.Linear:  # a quantized layer (QLoRA) keeps transformers' init
        return
    params = list(layer.parameters())
    std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
    gathered = _gathered(params)
    with gathered, torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        layer.weight.copy_(torch.randn(tuple(layer.weight.shape), generator=generator,
                                       dtype=torch.float32) * std)
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()


def _gathered(params):
    """ZeRO-3's whole parameters for a write on rank 0 (a plain context elsewhere)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        from contextlib import nullcontext

        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)


def configure(config, head: str, pad_token_id: int | None = None):
    """Set what a head needs in the config before the model is built: a score head is one
    number per row (`num_labels: 1`) and finds each row's end by `pad_token_id`."""
    if head == "sequence_classification":
        config.num_labels = 1
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
    return config


def base_for_adapter(base, adapter_dir, **options):
    """The base model a LoRA adapter is merged into, built with the adapter's head: a score head
    gets one label and the pad token of the tokenizer saved with the adapter (a causal LM
    checkpoint alone would give transformers' default of two labels and no pad token).
    `options` go to `from_pretrained` (dtype, revision, trust_remote_code)."""
    head = of_adapter(adapter_dir)
    if head == "sequence_classification":
        from transformers import AutoConfig, AutoTokenizer

        remote = {k: options[k] for k in ("revision", "trust_remote_code") if k in options}
        pad = AutoTokenizer.from_pretrained(adapter_dir).pad_token_id
        options = {**options, "config": configure(AutoConfig.from_pretrained(base, **remote),
                                                  head, pad)}
    return auto_class(head).from_pretrained(base, **options)
