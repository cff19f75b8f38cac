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


def configure(config, head: str, pad_token_id: int | None = None):
    """Set what a head needs in the config before the model is built: a score head is one
    number per row (`num_labels: 1`) and finds each row's end by `pad_token_id`."""
    if head == "sequence_classification":
        config.num_labels = 1
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
    return config
