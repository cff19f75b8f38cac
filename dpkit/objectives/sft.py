"""Supervised fine-tuning: next-token cross-entropy on the target tokens (prompt tokens and
padding carry label -100), summed; the loop divides by the global count of target tokens.

The loss goes through the run's `LossHead` (dpkit/objectives/head.py): tiled by default, never
holding the full logits. Batches may be sequence-parallel shards (dpkit/parallel/sequence.py),
which carry `shift_labels` (shifted before the split) and are counted as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpkit.data.load import IGNORE, target_tokens
from dpkit.objectives.base import LossOut, Objective
from dpkit.objectives.head import LossHead, shifted_labels


def model_inputs(batch: dict) -> dict:
    """The forward keywords for a collated batch, padded or packed."""
    if "position_ids" in batch:  # packed: rows from the restarting position ids, no mask
        # The boundaries also go as flash-attention keywords: dpkit's per-row attention and
        # flash_attention_2 use them directly; sdpa/eager build their mask from the positions.
        return {"position_ids": batch["position_ids"], "attention_mask": None,
                "cu_seq_lens_q": batch["cu_seq_lens"], "cu_seq_lens_k": batch["cu_seq_lens"],
                "max_length_q": batch["max_length"], "max_length_k": batch["max_length"]}
    return {"attention_mask": batch["attention_mask"]}


def forward_logits(engine, batch: dict) -> torch.Tensor:
    # use_cache=False is load-bearing for packing: with the cache on, transformers 5 ignores
    # the restarting positions and rows attend to each other (see dpkit/data/packing.py).
    return engine(input_ids=batch["input_ids"], use_cache=False, **model_inputs(batch)).logits


def loss_sum(engine, batch: dict) -> torch.Tensor:
    """Sum (not mean) of next-token losses over the batch's target tokens, in fp32, through the
    full logits (the reference the tiled head is tested against)."""
    logits = forward_logits(engine, batch).float()
    targets = shifted_labels(batch)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def count_targets(batch: dict) -> int:
    if "shift_labels" in batch:
        return int((batch["shift_labels"] != IGNORE).sum())
    return target_tokens(batch)


class SFT(Objective):
    name = "sft"
    unit = "target tokens"

    def __init__(self):
        self.head = LossHead()  # full logits until setup() knows the model

    def setup(self, run) -> None:
        self.head = run.loss_head

    def count(self, batch: dict) -> int:
        return count_targets(batch)

    def loss(self, engine, batch: dict) -> LossOut:
        inputs = {"input_ids": batch["input_ids"], **model_inputs(batch)}
        return LossOut(self.head.loss_sum(engine, inputs, shifted_labels(batch)))
