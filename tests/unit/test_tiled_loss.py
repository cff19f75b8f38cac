"""The tiled loss head equals the plain one (full logits, torch's cross-entropy): loss and
gradients within 1e-6 in fp32 (relative to the largest value compared: a weight gradient sums
over every token, and fp32 sums in another order differ in the last bits), on raw tensors and
through a real tiny model."""

import pytest
import torch
import torch.nn.functional as F

from dpkit.objectives.head import LossHead, plain_token_nll, shifted_labels, token_nll
from dpkit.objectives.sft import SFT, loss_sum

TOL = 1e-6


def close(a, b) -> bool:
    return float((a - b).abs().max()) <= TOL * max(1.0, float(b.abs().max()))


def _case(tokens=37, hidden=16, vocab=101, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, tokens, hidden, generator=g, dtype=torch.float64).float()
    head = torch.nn.Linear(hidden, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.3)
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g) * 0.1)
    labels = torch.randint(0, vocab, (2, tokens), generator=g)
    labels[0, :5] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return h, head, labels


def _grads(fn, h, head, labels, upstream):
    h = h.clone().requires_grad_(True)
    head.zero_grad()
    out = fn(h, head, labels)
    (out * upstream).sum().backward()
    params = [head.weight.grad.clone()] + ([head.bias.grad.clone()] if head.bias is not None
                                           else [])
    return out.detach(), h.grad, params


@pytest.mark.parametrize("tile", [1, 7, 64, 1000])
@pytest.mark.parametrize("softcap,bias", [(None, False), (30.0, False), (None, True)])
def test_tiled_equals_plain_loss_and_gradients(tile, softcap, bias):
    h, head, labels = _case(bias=bias)
    # a non-uniform upstream gradient: what a preference loss sends into per-token log-probs
    upstream = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    ref = _grads(lambda a, m, y: plain_token_nll(a, m, y, softcap), h, head, labels, upstream)
    got = _grads(lambda a, m, y: token_nll(a, m, y, tile, softcap), h, head, labels, upstream)
    assert close(got[0], ref[0]) and close(got[1], ref[1])
    assert float(got[0][labels == -100].abs().max()) == 0.0
    for a, b in zip(got[2], ref[2]):
        assert close(a, b)
    # the sum is SFT's loss: check it against torch's reduction="sum" directly
    plain_sum = F.cross_entropy((h @ head.weight.T + (head.bias if bias else 0)).reshape(
        -1, head.out_features) if softcap is None else
        (torch.tanh((h @ head.weight.T) / softcap) * softcap).reshape(-1, head.out_features),
        labels.reshape(-1), ignore_index=-100, reduction="sum")
    assert abs(float(got[0].sum()) - float(plain_sum.detach())) <= TOL * float(plain_sum)


def test_tiled_sft_loss_through_a_model_equals_full_logits():
    """A real tiny Llama: SFT's tiled loss and every parameter gradient equal the full-logits
    loss_sum (the path dpkit used before), packed keywords included; the output layer sees only
    the labelled positions."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    ids = torch.randint(0, 300, (3, 21))
    labels = ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    class R:  # the recipe keys LossHead.for_run reads
        class compute:
            loss, loss_tile_tokens = "auto", 8

    head, line = LossHead.for_run(R, model, cfg)
    assert head.tiled, line
    sft = SFT()
    sft.head = head

    def run(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}

    seen = []  # positions each call of the output layer scores
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[:-1].numel()))
    ref_loss, ref = run(lambda: loss_sum(model, batch))
    got_loss, got = run(lambda: sft.loss(model, batch).loss)
    assert abs(got_loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert all(close(got[n], ref[n]) for n in ref)
    assert shifted_labels(batch)[:, -1].eq(-100).all()
    # the full path scores every position; the loss head only those with a label (no prompt;
    # the model's own call of its head gets no position: logits_to_keep is empty)
    assert seen == [ids.numel(), 0, int(shifted_labels(batch).ne(-100).sum())], seen


def test_full_choice_and_rescaled_logits_fall_back():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)

    class R:
        class compute:
            loss, loss_tile_tokens = "full", 8

    assert not LossHead.for_run(R, model, cfg)[0].tiled
    R.compute.loss = "auto"
    cfg.logit_scale = 0.5
    head, line = LossHead.for_run(R, model, cfg)
    assert not head.tiled and "logit_scale" in line


def test_auto_tiles_only_where_tiles_hold_less(monkeypatch):
    """compute.loss: auto. A trained head's fp32 weight gradient (4·hidden bytes per vocabulary
    entry) costs as much as 4·hidden/(8+2b) tokens of full logits, so short micro-batches keep
    the full logits; a frozen head (LoRA) tiles as soon as there are two tiles. The numbers are
    the same either way."""
    from dpkit.objectives import head as H

    calls = []
    real = H._TiledNLL.apply
    monkeypatch.setattr(H._TiledNLL, "apply", lambda *a: calls.append(1) or real(*a))
    h, head, labels = _case(tokens=37, hidden=16)  # 74 tokens, fp32, hidden 16
    # tiled per vocab entry: 8 × 16 + 4 × 16 = 192 bytes; full: 16 per token → 13 tokens
    assert H.tiling_threshold(8, 16, 4, head_trained=True) == 13
    assert H.tiling_threshold(8, 16, 4, head_trained=False) == 9
    assert H.tiling_threshold(32, 16, 4, head_trained=True) == 37
    ref = plain_token_nll(h, head, labels)
    for tile, frozen, tiles in ((8, False, True), (70, False, False), (70, True, True),
                                (74, True, False)):
        head.weight.requires_grad_(not frozen)
        calls.clear()
        got = token_nll(h, head, labels, tile, always=False)
        assert bool(calls) is tiles, (tile, frozen)
        assert close(got.detach(), ref.detach())
    head.weight.requires_grad_(True)
    calls.clear()
    token_nll(h, head, labels, 70, always=True)  # compute.loss: tiled, past one tile
    assert calls


@pytest.mark.parametrize("width, lora, tiles", [
    (30, False, False),  # 60 tokens: at most one 64-token tile, full logits
    (36, False, False),  # 72 tokens: two tiles, but a trained head's tiles hold more below 73
    (40, False, True),   # 80 tokens: tiles hold less
    (33, True, True),    # a frozen head (LoRA) tiles from the second tile on
])
def test_planner_tiles_preference_pairs_where_the_run_does(tmp_path, monkeypatch, width, lora,
                                                            tiles):
    """dpkit plan counts a micro-batch of N pairs as 2N rows through the tiled loss; the
    objective, with the head a run hands it, must then tile exactly those micro-batches (before,
    pairs always built the full logits while the planner counted tiles)."""
    from types import SimpleNamespace

    from conftest import tiny_recipe

    from dpkit.data.preference import PairExample
    from dpkit.model import build_model
    from dpkit.objectives import build_objective
    from dpkit.objectives import head as H
    from dpkit.plan.memory import Knobs, tiled_loss
    from dpkit.plan.recommend import Hardware, recipe_shape, setup_for
    from dpkit.recipe import recipe_from_dict

    pairs = "dpkit:data/self_instruct_seed.preference.jsonl"
    r = tiny_recipe(tmp_path / "run", data={"sources": [{"path": pairs, "format": "preference"}],
                                            "max_seq_len": width},
                    train={"micro_batch_size": 1}, compute={"loss_tile_tokens": 64})
    r["objective"] = "orpo"
    if lora:
        r["peft"] = {"r": 4}
    recipe = recipe_from_dict(r)
    planned = tiled_loss(recipe_shape(recipe), setup_for(recipe, 2, "none", "none",
                                                         Hardware(1, 1, 80 << 30), 1, Knobs()))
    model = build_model(recipe.model, 0, 0)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    objective = build_objective(recipe)
    objective.setup(SimpleNamespace(loss_head=H.LossHead.for_run(recipe, model,
                                                                 model.config)[0]))
    calls = []
    real = H._TiledNLL.apply
    monkeypatch.setattr(H._TiledNLL, "apply", lambda *a: calls.append(1) or real(*a))
    ids = list(range(5, 5 + width))
    labels = [-100] * 4 + ids[4:]  # a full-length pair: the width the planner assumes
    batch = objective.collate([PairExample(ids, labels, ids[::-1], labels)], 0)
    assert batch["input_ids"].shape == (2, width)
    objective.loss(model, batch).loss.backward()
    assert planned is tiles and bool(calls) is tiles
