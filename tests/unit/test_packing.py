"""Packing: packed loss equals unpacked loss on real rows (the silent trap), row boundaries and
positions, and length grouping keeps each step's rows."""

import pytest
import torch
from conftest import MESSAGES, TINY_LLAMA, TOKENIZER

from dpkit.attention import NAME, implementation_for, register
from dpkit.data import (IGNORE, collate, epoch_order, load_datasets, step_micro_batches,
                        target_tokens)
from dpkit.model import load_tokenizer
from dpkit.data.packing import pack, row_lengths
from dpkit.recipe import DataSection, ModelSection
from dpkit.objectives.sft import loss_sum


@pytest.fixture(scope="module")
def rows():
    tok = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))
    section = DataSection(sources=[{"path": str(MESSAGES), "format": "messages"}], max_seq_len=128)
    train, _, _ = load_datasets(section, tok, seed=0)
    return train[:12], tok.pad_token_id


def model(attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    if attn == NAME:
        register()
    cfg = dict(TINY_LLAMA)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager", NAME])
def test_packed_loss_equals_unpacked(rows, attn):
    examples, pad = rows
    m = model(attn)
    with torch.no_grad():
        unpacked = sum(float(loss_sum(m, collate([ex], pad))) for ex in examples)
        packed_seqs = pack(examples, max_len=400, seed=0)
        assert len(packed_seqs) < len(examples)  # rows really share sequences
        packed = float(loss_sum(m, collate(packed_seqs, pad)))
        # The trap this guards against: without the restarting positions rows see each other.
        leaky = collate(packed_seqs, pad)
        del leaky["position_ids"]
        crossed = float(loss_sum(m, leaky))
    assert packed == pytest.approx(unpacked, rel=1e-5)
    assert abs(crossed - unpacked) > 1e-3


def test_row_attention_gradients_equal_masked_sdpa(rows):
    """dpkit's per-row attention computes what sdpa under transformers' block mask computes:
    same loss and same gradient for every parameter, on real packed rows."""
    examples, pad = rows
    batch = collate(pack(examples, max_len=400, seed=0), pad)
    grads = {}
    for attn in ("sdpa", NAME):
        m = model(attn).train()
        loss = loss_sum(m, batch)
        loss.backward()
        grads[attn] = (float(loss.detach()), {n: p.grad.clone() for n, p in m.named_parameters()})
    assert grads[NAME][0] == pytest.approx(grads["sdpa"][0], rel=1e-6)
    for name, g in grads["sdpa"][1].items():
        torch.testing.assert_close(grads[NAME][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_flattened_micro_batch_computes_the_padded_one(rows):
    """A micro-batch of packed sequences laid end to end in one row (what train does with
    per-row attention) gives the padded micro-batch's loss and gradients, with no padding."""
    examples, pad = rows
    seqs = pack(examples, max_len=300, seed=0)
    assert len(seqs) >= 3
    padded, flat = collate(seqs[:3], pad), collate(seqs[:3], pad, flatten=True)
    assert flat["input_ids"].shape == (1, sum(len(s.input_ids) for s in seqs[:3]))
    assert padded["input_ids"].numel() > flat["input_ids"].numel()  # there was padding
    assert target_tokens(flat) == target_tokens(padded)
    assert row_lengths(flat) == row_lengths(padded)
    results = []
    for batch in (padded, flat):
        m = model(NAME).train()
        loss = loss_sum(m, batch)
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in m.parameters()]))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_row_attention_without_boundaries_keywords(rows):
    """A model that passes only position ids to its attention (not the forward's flash keywords)
    still gets rows apart; unpacked right-padded rows (eval) need no mask at all."""
    examples, pad = rows
    m, ref = model(NAME), model("sdpa")
    packed = collate(pack(examples, max_len=400, seed=0), pad)
    unpacked = collate(examples[:4], pad)

    def same_logits_on_real_tokens(batch, **inputs):
        with torch.no_grad():
            got = m(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
            want = ref(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)

    same_logits_on_real_tokens(packed, position_ids=packed["position_ids"])
    same_logits_on_real_tokens(unpacked, attention_mask=unpacked["attention_mask"])


def test_row_attention_only_where_rows_need_nothing_but_causality():
    from transformers import AutoConfig

    llama = AutoConfig.for_model("llama")
    assert implementation_for("sdpa", True, llama, 2048) == NAME
    assert implementation_for("sdpa", False, llama, 2048) == "sdpa"        # not packed
    assert implementation_for("eager", True, llama, 2048) == "eager"       # what was asked
    windowed = AutoConfig.for_model("mistral", sliding_window=1024)
    assert implementation_for("sdpa", True, windowed, 2048) == "sdpa"      # window would bite
    assert implementation_for("sdpa", True, windowed, 1024) == NAME        # window never bites


def test_build_model_switches_packed_sdpa_to_rows_and_saves_sdpa(tmp_path):
    import json

    from dpkit.model import build_model

    section = ModelSection(config=dict(TINY_LLAMA), tokenizer=str(TOKENIZER), dtype="float32")
    assert build_model(section, 0, 2).config._attn_implementation == "sdpa"
    m = build_model(section, 0, 2, packed_len=256)
    assert m.config._attn_implementation == NAME
    m.save_pretrained(tmp_path)  # a saved model must load anywhere, without dpkit
    assert NAME not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text()).get("_attn_implementation") != NAME


def test_pack_keeps_every_row_once_and_masks_row_starts(rows):
    examples, pad = rows
    packed = pack(examples, max_len=300, seed=3)
    assert all(len(p.input_ids) <= 300 for p in packed)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    trained = sum(sum(t != IGNORE for t in p.labels) for p in packed)
    assert trained == sum(sum(t != IGNORE for t in e.labels[1:]) for e in examples)
    for p in packed:
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0]
        assert all(p.labels[i] == IGNORE for i in starts)
    batch = collate(packed, pad)
    assert sorted(row_lengths(batch)) == sorted(len(e.input_ids) for e in examples)


@pytest.mark.parametrize("world, micro", [(1, 8), (2, 2), (4, 1)])
def test_length_grouping_keeps_each_steps_rows(world, micro):
    n, lengths = 37, [(i * 7919) % 101 for i in range(37)]
    accum = 8 // (micro * world)
    order = epoch_order(n, 1, 0)
    for step in range(-(-n // 8)):
        got = [step_micro_batches(n, 1, 0, step, r, world, micro, accum, lengths)
               for r in range(world)]
        flat = sorted(i for per_rank in got for mb in per_rank for i in mb)
        assert flat == sorted(order[step * 8:(step + 1) * 8])
    # Less padding than the same steps without grouping.
    def padding(plan):
        return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb)
                   for per_rank in plan for mb in per_rank if mb)
    steps = range(-(-n // 8))
    grouped = sum(padding([step_micro_batches(n, 1, 0, s, r, world, micro, accum, lengths)
                           for r in range(world)]) for s in steps)
    plain = sum(padding([step_micro_batches(n, 1, 0, s, r, world, micro, accum)
                         for r in range(world)]) for s in steps)
    several = world * accum > 1  # one micro-batch per step leaves nothing to group
    assert grouped < plain if several and micro > 1 else grouped <= plain
