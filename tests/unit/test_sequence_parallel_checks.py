"""Sequence parallelism before launch and in the batch: refusals with one line naming the
numbers, the batch line for every data-parallel × sequence-parallel split, the slicing of a
micro-batch (labels shifted before the split), and the plan's memory model for it."""

from dataclasses import replace

import pytest
import torch
from conftest import tiny_recipe, write_recipe

from dpkit.cli import main
from dpkit.data import collate
from dpkit.data.load import Example, target_tokens
from dpkit.parallel.sequence import shard


def validate(tmp_path, capsys, nproc, sp, **sections):
    r = tiny_recipe(tmp_path / "run", train={"global_batch_size": 8, "micro_batch_size": 1,
                                             "sequence_parallel": sp}, **sections)
    code = main(["validate", str(write_recipe(tmp_path / "r.yaml", r)), "--nproc-per-node",
                 str(nproc)])
    out, err = capsys.readouterr()
    return code, out, err


def test_heads_not_divisible_is_one_line_naming_both_numbers(tmp_path, capsys):
    code, _, err = validate(tmp_path, capsys, 3, 3)  # the tiny Llama has 4 heads, 2 kv heads
    assert code == 2
    assert err.strip() == ("error: train.sequence_parallel: 3 does not divide the model's 4 "
                           "attention heads — use one of [2, 4] (or 1)"), err
    assert not (tmp_path / "run").exists()


def test_world_not_divisible_and_unsupported_attention(tmp_path, capsys):
    code, _, err = validate(tmp_path, capsys, 3, 2)
    assert code == 2 and "train.sequence_parallel: 2 does not divide the world size 3" in err
    code, _, err = validate(tmp_path, capsys, 2, 2, model={"attn_implementation": "eager"})
    assert code == 2 and "model.attn_implementation: eager does not work with sequence" in err
    code, _, err = validate(tmp_path, capsys, 2, 2, zero={"stage": 0})
    assert code == 2 and "zero.stage: 0 is not supported with sequence parallelism" in err


@pytest.mark.parametrize("nproc,sp,expected", [
    (4, 2, ("global batch 8 = micro 1 × accumulation 4 × data-parallel 2 (world 4 / "
            "sequence-parallel 2); each row's sequence split over 2 ranks")),
    (4, 4, "micro 1 × accumulation 8 × data-parallel 1 (world 4 / sequence-parallel 4)"),
    (2, 1, "global batch 8 = micro 1 × accumulation 4 × world 2\n")])
def test_validate_explains_the_split(tmp_path, capsys, nproc, sp, expected):
    code, out, err = validate(tmp_path, capsys, nproc, sp)
    assert code == 0, err
    assert expected in out, out
    assert ("padded to a multiple of" in out) == (sp > 1)


@pytest.mark.parametrize("packed", [False, True])
def test_slices_shift_labels_before_the_split(packed):
    rows = [Example(list(range(10, 17)), [-100, -100, 12, 13, 14, 15, 16]),
            Example(list(range(20, 24)), [-100, 21, 22, 23])]
    if packed:
        rows = [Example(rows[0].input_ids + rows[1].input_ids,
                        rows[0].labels + [-100] + rows[1].labels[1:], list(range(7)) +
                        list(range(4)))]
    batch = collate(rows, pad_id=0)
    sp = 4
    slices = [shard(batch, sp, r) for r in range(sp)]
    width = batch["input_ids"].shape[1]
    padded = width + (-width) % sp
    assert all(s["input_ids"].shape[1] == padded // sp for s in slices)
    joined = torch.cat([s["shift_labels"] for s in slices], dim=1)
    # position i predicts token i + 1: the shift crosses slice boundaries
    assert torch.equal(joined[:, :width - 1], batch["labels"][:, 1:])
    assert (joined[:, width - 1:] == -100).all()
    assert sum(int((s["shift_labels"] != -100).sum()) for s in slices) == target_tokens(batch)
    positions = torch.cat([s["position_ids"] for s in slices], dim=1)
    assert torch.equal(positions[:, :width][batch["attention_mask"].bool()],
                       (batch["position_ids"] if packed else
                        torch.arange(width).expand(len(rows), -1))[batch["attention_mask"].bool()])
    # every slice knows the whole sequence's rows; only the first reports their lengths
    assert all(torch.equal(s["cu_seq_lens"], slices[0]["cu_seq_lens"]) for s in slices)
    assert slices[0]["row_lengths"] == [7, 4] and slices[1]["row_lengths"] == []


def test_plan_models_sequence_parallel_and_the_tiled_loss():
    from transformers import AutoConfig

    from dpkit.plan.long import max_seq_len
    from dpkit.plan.memory import GiB, Setup, activation_bytes, estimate, model_shape
    from dpkit.plan.recommend import Hardware

    shape = model_shape(AutoConfig.for_model(
        "llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256))
    base = Setup(3, "none", "none", 8, 8, 2, 1, 16384, gradient_checkpointing=True)
    full, tiled = activation_bytes(shape, base), activation_bytes(shape, replace(base,
                                                                                loss_tile=1024))
    # full logits: 16k tokens × 128k vocabulary × (4 + 2·2) bytes = 16 GiB; the tiled loss
    # holds one tile's and the fp32 weight gradient
    assert full - tiled > 14 * GiB
    split = activation_bytes(shape, replace(base, loss_tile=1024, sequence_parallel=8))
    assert split < tiled / 2  # the tile and the head's fp32 weight gradient do not shrink
    hw = Hardware(8, 8, 80 * GiB)
    lengths = [max_seq_len(shape, s, hw) for s in (base, replace(base, loss_tile=1024),
                                                   replace(base, loss_tile=1024,
                                                           sequence_parallel=8))]
    assert 0 < lengths[0] < lengths[1] < lengths[2], lengths
    assert estimate(shape, replace(base, seq_len=lengths[1])).gpu_total > 0
    # a micro-batch of at most one tile is computed through the full logits (head.token_nll)
    short = replace(base, seq_len=1024)
    assert activation_bytes(shape, replace(short, loss_tile=1024)) == activation_bytes(shape, short)
    # two 512-token tiles of a trained 128k-vocabulary head hold more than the full logits (the
    # head's fp32 weight gradient, 2 GiB): `auto` keeps the full logits there, tiles at 16k
    forced, auto = (activation_bytes(shape, replace(short, loss_tile=512, loss_auto=a))
                    for a in (False, True))
    assert forced > activation_bytes(shape, short) == auto
    assert activation_bytes(shape, replace(base, loss_tile=1024, loss_auto=True)) == tiled
