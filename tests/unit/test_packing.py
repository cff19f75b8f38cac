"""Packing: packed loss equals unpacked loss on real rows (the silent trap), row boundaries and
positions, and length grouping keeps each step's rows."""

import pytest
import torch
from conftest import MESSAGES, TINY_LLAMA, TOKENIZER

from dpkit.data import IGNORE, collate, epoch_order, load_datasets, step_micro_batches
from dpkit.model import load_tokenizer
from dpkit.packing import pack, row_lengths
from dpkit.recipe import DataSection, ModelSection
from dpkit.step import loss_sum


@pytest.fixture(scope="module")
def rows():
    tok = load_tokenizer(ModelSection(config={"model_type": "llama"}, tokenizer=str(TOKENIZER)))
    section = DataSection(sources=[{"path": str(MESSAGES), "format": "messages"}], max_seq_len=128)
    train, _, _ = load_datasets(section, tok, seed=0)
    return train[:12], tok.pad_token_id


def model(attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_LLAMA)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
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
