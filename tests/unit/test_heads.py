"""Model heads (dpkit/heads.py): a score layer the model is built with starts from train.seed
alone — normal(0, initializer_range) from its own generator, written out here — whether the
model comes from an inline config or from a causal LM checkpoint; a checkpoint that already has
its score layer (a trained reward model) keeps it. The same under ZeRO-3's partitioned build is
checked on real ranks (tests/distributed/test_reward.py)."""

from __future__ import annotations

import torch
from conftest import TINY_LLAMA, TOKENIZER

from dpkit.model import build_model
from dpkit.recipe import ModelSection

HEAD = "sequence_classification"


def drawn(seed: int, shape, std: float = 0.02) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * std


def test_a_new_score_layer_is_drawn_from_the_seed_alone(tmp_path):
    inline = ModelSection(config=dict(TINY_LLAMA), tokenizer=str(TOKENIZER), dtype="float32")
    model = build_model(inline, 7, 0, head=HEAD, pad_token_id=1)
    assert torch.equal(model.score.weight, drawn(7, (1, 32)))
    assert model.config.num_labels == 1 and model.config.pad_token_id == 1

    causal = build_model(inline, 3, 0)  # a causal LM checkpoint: no score layer in it
    causal.save_pretrained(tmp_path / "causal")
    section = ModelSection(name_or_path=str(tmp_path / "causal"), tokenizer=str(TOKENIZER),
                           dtype="float32")
    loaded = build_model(section, 7, 0, head=HEAD, pad_token_id=1)
    assert torch.equal(loaded.score.weight, drawn(7, (1, 32)))
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight,
                       causal.model.layers[0].mlp.up_proj.weight)  # the rest is the checkpoint's
    other = build_model(section, 8, 0, head=HEAD, pad_token_id=1)
    assert not torch.equal(other.score.weight, loaded.score.weight)

    with torch.no_grad():  # a trained reward model's score layer is kept as saved
        loaded.score.weight.fill_(0.5)
    loaded.save_pretrained(tmp_path / "reward")
    again = build_model(section.model_copy(update={"name_or_path": str(tmp_path / "reward")}), 7,
                        0, head=HEAD, pad_token_id=1)
    assert torch.equal(again.score.weight, torch.full((1, 32), 0.5))
